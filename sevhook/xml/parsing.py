"""Safe parsing of untrusted domain XML with lxml.

Domain XML reaches sevhook from admins, from libvirt's hook stdin and from guest owners, so the
parser is closed to every XML expansion trick: no DTD loading, no entity resolution, no network,
libxml2's default depth and size limits (huge_tree off), and any DOCTYPE is refused outright because
domain XML never needs one. Documents above virsh's own 10 MiB limit are refused before parsing."""

from __future__ import annotations

import os
import re

from lxml import etree

from sevhook.errors import UsageError
from sevhook.files import read_input_file
from sevhook.xml.problems import ERROR, DomainXmlError, Problem

MAX_DOCUMENT_BYTES = 10 * 1024 * 1024  # virsh reads domain XML files up to 10 MiB

Source = str | bytes | os.PathLike[str]

# Whitespace, an XML declaration, comments and processing instructions, then a DOCTYPE: found before
# the parser sees the document, so no entity is ever declared, let alone expanded or fetched.
_DOCTYPE_IN_PROLOG = re.compile(rb"(?:\s|<\?.*?\?>|<!--.*?-->)*<!DOCTYPE", re.DOTALL)
PROLOG_SCAN_BYTES = 64 * 1024  # a DOCTYPE further in is still refused after parsing, entities unexpanded
_DOCTYPE_MESSAGE = (
    "the document declares a DOCTYPE (DTD); domain XML never uses DTDs or entities and sevhook "
    "does not expand them: remove the <!DOCTYPE ...> declaration"
)


def safe_parser() -> etree.XMLParser:
    """The one lxml parser configuration for XML sevhook did not write (domain XML, domain
    capabilities, passthrough blocks): no entities, DTDs or network, no huge trees. A fresh parser
    per document, because lxml parsers are not thread-safe and keep per-parse state."""
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_blank_text=False,
        collect_ids=False,
    )


def _refuse(filename: str, line: int, message: str) -> DomainXmlError:
    return DomainXmlError([Problem(ERROR, filename, line, message)])


def read_source(source: Source, filename: str | None = None) -> tuple[bytes, str]:
    """The document's bytes and the name to report it under. A str is a path unless it looks like
    XML (starts with '<' after whitespace); bytes are always the document itself."""
    if isinstance(source, bytes):
        return source, filename or "<bytes>"
    if isinstance(source, str) and source.lstrip().startswith("<"):
        return source.encode("utf-8"), filename or "<string>"
    name = filename or str(source)
    try:
        size = os.stat(source).st_size
    except FileNotFoundError as exc:
        raise UsageError(f"{name}: no such file: check the path") from exc
    except OSError:
        size = 0  # unreadable: read_input_file says why
    if size > MAX_DOCUMENT_BYTES:
        raise _refuse(name, 1, _too_large(size))
    return read_input_file(source, MAX_DOCUMENT_BYTES, ""), name


def _too_large(size: int) -> str:
    return (
        f"the document is {size} bytes, larger than the {MAX_DOCUMENT_BYTES} bytes virsh accepts for "
        "domain XML: this is not a domain definition; pass the domain's XML file (virsh dumpxml NAME)"
    )


def parse_document(data: bytes, filename: str) -> etree._ElementTree:
    """Parse bytes into a tree, refusing oversized, malformed and DTD-bearing documents with one
    DomainXmlError naming file and line."""
    if len(data) > MAX_DOCUMENT_BYTES:
        raise _refuse(filename, 1, _too_large(len(data)))
    if not data.strip():
        raise _refuse(filename, 1, "the document is empty: pass a domain XML file (virsh dumpxml NAME)")
    if _DOCTYPE_IN_PROLOG.match(data.removeprefix(b"\xef\xbb\xbf")[:PROLOG_SCAN_BYTES]):
        raise _refuse(filename, _doctype_line(data) or 1, _DOCTYPE_MESSAGE)
    parser = safe_parser()
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        doctype_line = _doctype_line(data)
        if doctype_line:  # entity trouble behind a DOCTYPE the prolog scan did not reach
            raise _refuse(filename, doctype_line, _DOCTYPE_MESSAGE) from exc
        line = exc.lineno or 1
        reason = (exc.msg or "malformed XML").split(", line ")[0].strip()
        if "depth" in reason.lower() or "nested" in reason.lower():
            reason = "elements are nested too deeply (libxml2 allows 256 levels); a domain XML never is"
        raise _refuse(filename, line, f"not well-formed XML: {reason}: fix the XML syntax") from exc
    except (ValueError, UnicodeError) as exc:
        raise _refuse(filename, 1, f"not well-formed XML: {exc}: fix the XML syntax") from exc
    if root is None:
        raise _refuse(filename, 1, "the document has no root element: pass a domain XML file")
    tree = root.getroottree()
    if tree.docinfo.doctype or tree.docinfo.internalDTD is not None:
        raise _refuse(filename, _doctype_line(data) or 1, _DOCTYPE_MESSAGE)
    if root.tag != "domain":
        raise _refuse(
            filename,
            root.sourceline or 1,
            f"the root element is <{_display_tag(root.tag)}>, not <domain>: pass a libvirt domain XML file",
        )
    return tree


def _doctype_line(data: bytes) -> int | None:
    """The line of the first DOCTYPE outside comments, None when there is none (one linear scan)."""
    position = data.find(b"<!")
    while position >= 0:
        if data.startswith(b"<!DOCTYPE", position):
            return data[:position].count(b"\n") + 1
        if data.startswith(b"<!--", position):
            end = data.find(b"-->", position + 4)
            if end < 0:
                return None
            position = end + 3
        else:
            position += 2
        position = data.find(b"<!", position)
    return None


def _display_tag(tag: object) -> str:
    if not isinstance(tag, str):
        return "?"
    qname = etree.QName(tag)
    return f"{{{qname.namespace}}}{qname.localname}" if qname.namespace else qname.localname
