"""The same arguments as a `<qemu:commandline>` block, for domains that hand SEV to QEMU through
libvirt's passthrough arguments instead of `<launchSecurity>`.

QEMU merges a second `-machine` into the first, so `-machine confidential-guest-support=lsec0`
works beside the machine type libvirt writes. libvirt does not write dhCert/session files for
passthrough arguments: they must exist (sevhook cmdline --write-files) in a directory that
outlives the domain's id, readable by the QEMU user."""

from __future__ import annotations

from lxml import etree

from sevhook.errors import FormatError
from sevhook.xml.models import QEMU_NS
from sevhook.xml.parsing import safe_parser

_QEMU = f"{{{QEMU_NS}}}"


def commandline_element(argv: list[str]) -> etree._Element:
    block = etree.Element(_QEMU + "commandline", nsmap={"qemu": QEMU_NS})
    for arg in argv:
        etree.SubElement(block, _QEMU + "arg", value=arg)
    return block


def commandline_xml(argv: list[str]) -> str:
    """`<qemu:commandline xmlns:qemu=...>` with one `<qemu:arg value=.../>` per argv element."""
    return etree.tostring(commandline_element(argv), pretty_print=True, encoding="unicode")


def args_from_commandline(xml: str | bytes) -> list[str]:
    """The argv a `<qemu:commandline>` block passes (in a domain or on its own), in order."""
    try:
        root = etree.fromstring(xml.encode() if isinstance(xml, str) else xml, safe_parser())
    except etree.XMLSyntaxError as exc:
        raise FormatError(f"line {exc.lineno}: not XML ({exc.msg})") from exc
    blocks = [root] if root.tag == _QEMU + "commandline" else root.findall(_QEMU + "commandline")
    return [arg.get("value", "") for block in blocks for arg in block.findall(_QEMU + "arg")]
