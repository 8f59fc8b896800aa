"""Load a domain XML document: safe parse, schema validation of <launchSecurity> and the sevhook
metadata, the rules beyond the schema, and the immutable models.

    doc = load_domain("guest.xml")
    doc.problems            # every error and warning, with file and line
    doc.domain              # the Domain model (launch_security is None when it is invalid)
    doc.require_valid()     # the Domain, or DomainXmlError listing the errors (fail closed)
"""

from __future__ import annotations

from dataclasses import dataclass

from lxml import etree

from sevhook.xml import launch_security as launch_security_rules
from sevhook.xml import metadata as metadata_rules
from sevhook.xml import structure
from sevhook.xml.launch_security import DomainContext
from sevhook.xml.models import SEVHOOK_NS, Attestation, Domain, LaunchSecurity, OsInfo
from sevhook.xml.parsing import Source, parse_document, read_source
from sevhook.xml.problems import ERROR, WARNING, DomainXmlError, Level, Problem
from sevhook.xml.schemas import SchemaName, rng_errors


@dataclass(frozen=True)
class DomainDocument:
    """A loaded domain: its model, every problem found, and the name it was read under."""

    filename: str
    domain: Domain
    problems: tuple[Problem, ...]

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.level == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.level == WARNING]

    @property
    def valid(self) -> bool:
        return not self.errors

    def require_valid(self) -> Domain:
        """The model, or DomainXmlError with every error: for callers that must fail closed."""
        if self.errors:
            raise DomainXmlError(self.errors)
        return self.domain


class _Collector:
    """Gathers problems for one document, keyed to element lines."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.problems: list[Problem] = []

    def at(self, level: Level, line: int, message: str) -> None:
        self.problems.append(Problem(level, self.filename, line, message))

    def report(self, level: Level, element: etree._Element | None, message: str) -> None:
        self.at(level, (element.sourceline if element is not None else None) or 1, message)


def _os_info(root: etree._Element) -> tuple[OsInfo, etree._Element | None, etree._Element | None, str | None]:
    os_element = root.find("os")
    if os_element is None:
        return OsInfo(), None, None, None
    loader = os_element.find("loader")
    kernel = os_element.find("kernel")
    type_element = os_element.find("type")
    info = OsInfo(
        firmware=os_element.get("firmware"),
        loader=((loader.text or "").strip() or None) if loader is not None else None,
        loader_type=loader.get("type") if loader is not None else None,
        kernel=(kernel.text or "").strip() if kernel is not None else None,
        initrd=(os_element.findtext("initrd") or "").strip() or None,
        cmdline=os_element.findtext("cmdline"),
    )
    return info, os_element, kernel, type_element.get("arch") if type_element is not None else None


def _integer(
    root: etree._Element, collector: _Collector, text: str | None, element: etree._Element | None, what: str
) -> int | None:
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        collector.report(
            ERROR, element if element is not None else root, f"{what} '{text.strip()}' is not a whole number: fix it"
        )
        return None


def _schema_problems(collector: _Collector, element: etree._Element, name: SchemaName) -> bool:
    """Validate against the standalone schema; on failure report readable reasons. True when valid."""
    errors = rng_errors(name, element)
    if not errors:
        return True
    if name == "launchsecurity":
        explained = structure.explain_launch_security(element)
    else:
        explained = structure.explain_attestation(element)
    if not explained:  # the description missed a case: fall back to libxml2's words rather than say nothing
        explained = [(line, f"schema: {message}") for line, message in errors[:3]]
    for line, message in explained:
        collector.at(ERROR, line, message)
    return False


def _attestation(root: etree._Element, collector: _Collector) -> tuple[Attestation | None, etree._Element | None]:
    metadata = root.find("metadata")
    if metadata is None:
        return None, None
    ours = [child for child in metadata if isinstance(child.tag, str) and etree.QName(child).namespace == SEVHOOK_NS]
    if not ours:
        return None, None
    model: Attestation | None = None
    chosen: etree._Element | None = None
    for element in ours:
        local = etree.QName(element).localname
        if local != "attestation":
            collector.report(
                ERROR,
                element,
                f"<metadata> holds <sevhook:{local}>, but the sevhook namespace has one element, "
                "<sevhook:attestation>: rename or remove it",
            )
            continue
        if chosen is not None:
            collector.report(
                ERROR,
                element,
                f"a second <sevhook:attestation> in <metadata> (the first is on line {chosen.sourceline}): keep one",
            )
            continue
        chosen = element
        if _schema_problems(collector, element, "sevhook-metadata"):
            model = metadata_rules.build(element)
    return model, chosen


def _analyse(tree: etree._ElementTree, filename: str, require_sev: bool,
             decode_certificates: bool) -> DomainDocument:
    root = tree.getroot()
    collector = _Collector(filename)
    os_info, os_element, kernel_element, arch = _os_info(root)
    name = root.findtext("name")
    if name is None or not name.strip():
        collector.report(ERROR, root, "the domain has no <name>: add <name>GUEST</name>")
    vcpu_element = root.find("vcpu")
    vcpus = _integer(root, collector, vcpu_element.text if vcpu_element is not None else None, vcpu_element, "<vcpu>")
    domain_id = _integer(root, collector, root.get("id"), root, "<domain id=...>")
    launch_security: LaunchSecurity | None = None
    ls_elements = root.findall("launchSecurity")
    ls_element = ls_elements[0] if ls_elements else None
    for extra in ls_elements[1:]:
        collector.report(
            ERROR, extra, f"a second <launchSecurity> (the first is on line {ls_elements[0].sourceline}): keep one"
        )
    if ls_element is not None and _schema_problems(collector, ls_element, "launchsecurity"):
        ctx = DomainContext(os=os_info, os_element=os_element, kernel_element=kernel_element, arch=arch,
                            decode_certificates=decode_certificates)
        launch_security = launch_security_rules.build(ls_element, ctx, collector.report)
    if ls_element is None and require_sev:
        collector.report(
            ERROR,
            root,
            "the domain has no <launchSecurity> and --require-sev is set: add <launchSecurity type='sev'> "
            "with a <policy>",
        )
    attestation, attestation_element = _attestation(root, collector)
    if attestation is not None and attestation_element is not None:
        metadata_rules.check(attestation, attestation_element, root, launch_security, ls_element, collector.report)
    emulator = root.findtext("devices/emulator")
    domain = Domain(
        name=(name or "").strip(),
        type=root.get("type", ""),
        uuid=(root.findtext("uuid") or "").strip() or None,
        id=domain_id,
        emulator=emulator.strip() if emulator else None,
        vcpus=vcpus if vcpus is not None else 1,
        os=os_info,
        launch_security=launch_security,
        attestation=attestation,
    )
    problems = sorted(collector.problems, key=lambda p: (p.line, p.level != ERROR))
    return DomainDocument(filename=filename, domain=domain, problems=tuple(problems))


def load_domain(source: Source, filename: str | None = None, *, require_sev: bool = False,
                decode_certificates: bool = True) -> DomainDocument:
    """Read and check one domain XML document (a path, the XML as str, or bytes).

    decode_certificates=False skips decoding <dhCert>'s certificate (usage, algorithm, key on P-384),
    which imports cryptography, for callers that know the firmware has already accepted it (the hook
    once QEMU is past LAUNCH_START); its base64, size and version are still checked.

    Raises UsageError when a path cannot be read and DomainXmlError when the document is not domain
    XML at all; everything else is a Problem in the returned document."""
    data, name = read_source(source, filename)
    return _analyse(parse_document(data, name), name, require_sev, decode_certificates)


def validate_file(path: Source, *, require_sev: bool = False) -> list[Problem]:
    """Every problem in one file; a document that is not domain XML at all is one error Problem.
    Raises UsageError when the file cannot be read."""
    try:
        return list(load_domain(path, require_sev=require_sev).problems)
    except DomainXmlError as exc:
        return list(exc.problems)
