"""The hook's entry point. libvirtd runs every hook script for every QEMU guest, five times per
start and stop, so for a guest sevhook does not manage this exits 0 after a byte search of the
domain XML, before importing anything beyond the interpreter's own start-up modules. Only a domain
that mentions both <launchSecurity and sevhook's namespace goes on to the full hook (runner)."""

import gc
import sys

# The same URI as sevhook.xml.models.SEVHOOK_NS (a test keeps them equal); not imported from there
# because that module pulls in dataclasses and the policy code.
SEVHOOK_NS = b"http://sevhook.org/xmlns/libvirt/1.0"
LAUNCH_SECURITY = b"<launchSecurity"


def concerns_sevhook(domain_xml: bytes) -> bool:
    """Cheap, conservative pre-filter: False means the hook certainly has nothing to do."""
    return LAUNCH_SECURITY in domain_xml and SEVHOOK_NS in domain_xml


def main(argv=None) -> int:  # noqa: ANN001  (typing is not imported on the hot path)
    """`NAME OP SUBOP EXTRA` with the domain XML on stdin, as libvirtd calls hooks."""
    args = sys.argv[1:] if argv is None else list(argv)
    domain_xml = sys.stdin.buffer.read()  # read it all even when unused: libvirtd writes it
    if not concerns_sevhook(domain_xml):
        return 0
    from sevhook.hook.runner import run  # noqa: PLC0415

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
