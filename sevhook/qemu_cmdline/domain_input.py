"""Which problems of a domain XML stop the translation, as libvirt decides.

libvirt refuses a domain that breaks its schema, a policy it cannot read and SNP blobs of the
wrong length; it passes everything else to QEMU verbatim (its own tests use a dhCert that is not a
certificate and a session of the wrong length). sevhook's stricter rules are therefore warnings
here, and errors only under --strict."""

from __future__ import annotations

import re
from dataclasses import dataclass

from lxml import etree

from sevhook.errors import SevhookError
from sevhook.xml import load_domain
from sevhook.xml.models import SEVHOOK_NS, Domain, LaunchSecurity
from sevhook.xml.parsing import Source, parse_document, read_source
from sevhook.xml.problems import ERROR, Problem
from sevhook.xml.schemas import rng_valid

# libvirt's own error texts for values it refuses (sevhook.xml keeps libvirt's wording), and the
# architecture check (libvirt refuses: that QEMU binary has no such object).
LIBVIRT_REFUSALS = re.compile(
    r"failed to get launch security policy|Unexpected length of|<launchSecurity type='[^']+'> needs an \S+ guest"
)


@dataclass(frozen=True)
class CmdlineInput:
    """A domain ready to translate, with what to tell the user on stderr."""

    domain: Domain
    launch_security: LaunchSecurity
    warnings: tuple[Problem, ...]  # sevhook warnings, and errors libvirt lets through


class DomainRefused(SevhookError):
    """The domain cannot be translated; the message lists every blocking problem."""


@dataclass(frozen=True)
class _Layout:
    """Where the launch security and sevhook metadata are, and whether they pass their schemas."""

    schema_valid: bool
    spans: tuple[tuple[int, int], ...]  # (first line, last line) of each checked element

    def covers(self, line: int) -> bool:
        return any(first <= line <= last for first, last in self.spans)


def _span(element: etree._Element) -> tuple[int, int]:
    lines = [e.sourceline for e in element.iter() if e.sourceline]
    return (min(lines), max(lines)) if lines else (0, 0)


def _layout(data: bytes, filename: str) -> _Layout:
    root = parse_document(data, filename).getroot()
    elements = root.findall("launchSecurity")
    metadata = root.find("metadata")
    if metadata is not None:
        elements += [c for c in metadata if isinstance(c.tag, str) and etree.QName(c).namespace == SEVHOOK_NS]
    valid = len(root.findall("launchSecurity")) <= 1
    for element in elements:
        schema = "launchsecurity" if element.tag == "launchSecurity" else "sevhook-metadata"
        valid = valid and rng_valid(schema, element)  # type: ignore[arg-type]
    return _Layout(valid, tuple(_span(e) for e in elements))


def load_for_cmdline(source: Source, filename: str | None = None, strict: bool = False) -> CmdlineInput:
    """Load a domain for translation; DomainRefused (exit 1) when libvirt would refuse it too."""
    data, name = read_source(source, filename)
    document = load_domain(data, name)
    errors = [p for p in document.problems if p.level == ERROR]
    listing = "\n".join(str(p) for p in errors)
    layout = _layout(data, name) if errors else _Layout(True, ())
    if not layout.schema_valid:
        raise DomainRefused(f"{name} is not schema-valid domain XML; libvirt would refuse it too:\n{listing}")
    refused = [p for p in errors if not layout.covers(p.line) or LIBVIRT_REFUSALS.match(p.message)]
    if refused:
        raise DomainRefused(f"{name}: libvirt refuses this domain too:\n" + "\n".join(str(p) for p in refused))
    model = document.domain.launch_security
    if model is None:
        if errors:
            raise DomainRefused(f"{name}: <launchSecurity> cannot be read:\n{listing}")
        raise DomainRefused(f"{name}: the domain has no <launchSecurity>: there is nothing to translate")
    if strict and errors:
        raise DomainRefused(
            f"{name} has problems that libvirt lets through and --strict refuses:\n{listing}\n"
            "fix them, or drop --strict to translate as libvirt would"
        )
    return CmdlineInput(document.domain, model, document.problems)
