"""The hook's entry point. libvirtd runs every hook script for every QEMU guest, five times per
start and stop, so for a guest sevhook does not manage this exits 0 after a byte search of the
domain XML, before importing anything beyond the interpreter's own start-up modules. Every other
domain goes on to the full hook (runner), which parses it and decides."""

import gc
import sys

# The same URI as sevhook.xml.models.SEVHOOK_NS and the same limit as
# sevhook.xml.parsing.MAX_DOCUMENT_BYTES (a test keeps them equal); not imported from there because
# those modules pull in dataclasses, lxml and the policy code.
SEVHOOK_NS = b"http://sevhook.org/xmlns/libvirt/1.0"
MAX_DOCUMENT_BYTES = 10 * 1024 * 1024
PLAIN_ENCODINGS = (b"utf-8", b"utf8", b"us-ascii", b"ascii")
# Ways a document can hold sevhook's namespace without its bytes appearing verbatim: a character
# reference in the xmlns attribute, or an entity a DOCTYPE declares (the full parse refuses DOCTYPEs).
INDIRECT_SPELLINGS = (b"&#", b"<!DOCTYPE")


def concerns_sevhook(domain_xml: bytes) -> bool:
    """The pre-filter's contract: False only for a document that cannot carry sevhook metadata.

    That is one in UTF-8 (or ASCII) that names sevhook's namespace nowhere and spells nothing
    indirectly (no character reference, no DOCTYPE). Anything else goes to the full parse, which
    refuses metadata on a guest without SEV launch security, so the pre-filter must not look for
    <launchSecurity>: the decision is the parser's, and the pre-filter only skips what it can prove
    irrelevant."""
    if SEVHOOK_NS in domain_xml:
        return True
    if any(spelling in domain_xml for spelling in INDIRECT_SPELLINGS):
        return True
    return not _is_plain_utf8(domain_xml)


def _is_plain_utf8(domain_xml: bytes) -> bool:
    """Whether a parser reads the document as UTF-8 (or ASCII), so that the namespace's ASCII bytes
    would appear in it: not UTF-16/32 (BOM or NULs), not EBCDIC (no ASCII '<' first), and no XML
    declaration naming another encoding."""
    head = domain_xml[:1024].removeprefix(b"\xef\xbb\xbf")
    if not head.strip():
        return True
    if b"\x00" in head[:4] or not head.lstrip().startswith(b"<"):
        return False
    if not head.startswith(b"<?xml"):
        return True
    declaration = head.partition(b"?>")[0]
    if b"encoding" not in declaration:
        return True
    value = declaration.partition(b"encoding")[2].lstrip().removeprefix(b"=").lstrip()
    quote = value[:1]
    if quote not in (b"'", b'"'):
        return False
    return value[1:].partition(quote)[0].lower() in PLAIN_ENCODINGS


def main(argv=None) -> int:  # noqa: ANN001  (typing is not imported on the hot path)
    """`NAME OP SUBOP EXTRA` with the domain XML on stdin, as libvirtd calls hooks."""
    args = sys.argv[1:] if argv is None else list(argv)
    # Read it all even when unused (libvirtd writes it), but never more than a domain XML can be.
    domain_xml = sys.stdin.buffer.read(MAX_DOCUMENT_BYTES + 1)
    if len(domain_xml) > MAX_DOCUMENT_BYTES:
        name = args[0] if args else "?"
        print(f"sevhook: {name}: load: the domain XML on stdin is larger than {MAX_DOCUMENT_BYTES} bytes, "
              "the most virsh accepts; pass the domain's XML as libvirt formats it", file=sys.stderr)
        return 1
    if not concerns_sevhook(domain_xml):
        return 0
    from sevhook.hook.runner import run

    return run(args, domain_xml)


def run_process() -> None:
    """The installed script's body: main() in a process of its own, then exit with its status.

    Such a process lives for one call, so the cyclic garbage collector has nothing worth freeing:
    its passes over the objects the full hook's imports create are turned off, and what is left is
    frozen before exit, so the interpreter's last collection does not walk every module either
    (together about 10 ms of an attestation). Not for callers in a longer-lived process."""
    gc.disable()
    status = main()
    gc.freeze()
    sys.exit(status)


if __name__ == "__main__":
    run_process()
