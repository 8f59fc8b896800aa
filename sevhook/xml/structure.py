"""Readable explanations of why an element fails its schema.

libxml2's RELAX NG messages ("Invalid sequence in interleave") do not say what to change, so the
structure of <launchSecurity> and <sevhook:attestation> is also described here, and an invalid
element is walked against that description to name each offending attribute, child or value.
The schemas stay the authority: this walk only runs after RELAX NG has rejected an element, and the
tests check that it finds a problem exactly when the schemas do."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from lxml import etree

from sevhook.xml.models import SEVHOOK_NS

# A value check returns None when the text is acceptable, else what is expected instead.
Check = Callable[[str], "str | None"]

_XSD_SPACE = " \t\n\r"
UINT_MAX = 0xFFFF_FFFF


def _collapse(text: str) -> str:
    """XSD whitespace collapse (tokens, numbers and yes/no values are compared after it)."""
    return " ".join(part for part in re.split(f"[{_XSD_SPACE}]+", text) if part)


def pattern(regex: str, expected: str) -> Check:
    compiled = re.compile(regex)
    return lambda text: None if compiled.fullmatch(text) else expected


def choice(*values: str) -> Check:
    expected = " or ".join(f"'{v}'" for v in values)
    return lambda text: None if _collapse(text) in values else expected


def unsigned_int(expected: str, digits_only: bool = False) -> Check:
    # xs:unsignedInt's lexical space (from nonNegativeInteger) includes "+5" and "-0"; libvirt's digits-only
    # variant is matched by libxml2 against the text as written, before whitespace is collapsed.
    lexical = re.compile(r"[0-9]+" if digits_only else r"\+?[0-9]+|-0+")

    def check(text: str) -> str | None:
        value = text if digits_only else _collapse(text)
        if lexical.fullmatch(value) and abs(int(value)) <= UINT_MAX:
            return None
        return expected

    return check


def decimal_range(low_exclusive: float, high_inclusive: float, expected: str) -> Check:
    lexical = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)")

    def check(text: str) -> str | None:
        value = _collapse(text)
        if lexical.fullmatch(value) and low_exclusive < float(value) <= high_inclusive:
            return None
        return expected

    return check


def any_text(_text: str) -> str | None:
    return None


HEXUINT = pattern(r"(0x)?[0-9a-f]+", "lowercase hexadecimal digits with an optional 0x prefix, e.g. 0x0033")
YES_NO = choice("yes", "no")
ABS_PATH = pattern(r"(/|[a-zA-Z]:\\)[^\n\r]+", "an absolute path")
UINT = unsigned_int("a decimal number from 0 to 4294967295")


@dataclass(frozen=True)
class Shape:
    """What an element may hold. `text` set: a leaf whose text must pass the check; `text` None:
    only the listed children (plus whitespace)."""

    attributes: dict[str, tuple[Check, bool]] = field(default_factory=dict)  # name -> (check, required)
    children: dict[str, Shape] = field(default_factory=dict)
    required: frozenset[str] = frozenset()
    text: Check | None = None
    namespace: str | None = None  # of the children's names
    prefix: str = ""  # how messages spell the namespace (e.g. "sevhook:")


def leaf(check: Check = any_text) -> Shape:
    return Shape(text=check)


EMPTY = Shape()

_SEV_COMMON = {"cbitpos": leaf(UINT), "reducedPhysBits": leaf(UINT), "policy": leaf(HEXUINT)}

LAUNCH_SECURITY_SHAPES: dict[str, Shape] = {
    "sev": Shape(
        attributes={"type": (any_text, True), "kernelHashes": (YES_NO, False)},
        children={
            **_SEV_COMMON,
            "handle": leaf(unsigned_int("a decimal number from 0 to 4294967295 (digits only)", digits_only=True)),
            "dhCert": leaf(),
            "session": leaf(),
        },
        required=frozenset({"policy"}),
    ),
    "sev-snp": Shape(
        attributes={
            "type": (any_text, True),
            "kernelHashes": (YES_NO, False),
            "authorKey": (YES_NO, False),
            "vcek": (YES_NO, False),
        },
        children={
            **_SEV_COMMON,
            "guestVisibleWorkarounds": leaf(),
            "idBlock": leaf(),
            "idAuth": leaf(),
            "hostData": leaf(),
        },
        required=frozenset({"policy"}),
    ),
    "s390-pv": Shape(attributes={"type": (any_text, True)}),
    "tdx": Shape(
        attributes={"type": (any_text, True)},
        children={
            "policy": leaf(HEXUINT),
            "mrConfigId": leaf(),
            "mrOwner": leaf(),
            "mrOwnerConfig": leaf(),
            "quoteGenerationService": Shape(attributes={"path": (ABS_PATH, False)}),
        },
    ),
}
LAUNCH_SECURITY_TYPES = tuple(LAUNCH_SECURITY_SHAPES)

_ID = pattern(
    r"[A-Za-z0-9][A-Za-z0-9._:@\-]{0,127}",
    "1 to 128 characters from A-Z a-z 0-9 . _ : @ -, starting with a letter or digit",
)
_SOCKET_PATH = pattern(r"/[^\n\r]+", "an absolute path, e.g. /run/sevhook/NAME.qmp")
_FILE_PATH = pattern(r"/[^\n\r]+", "an absolute path")

ATTESTATION_SHAPE = Shape(
    attributes={
        "timeout": (decimal_range(0, 3600, "a number of seconds greater than 0 and at most 3600, e.g. 30"), False),
        "resume": (YES_NO, False),
    },
    children={
        "broker": Shape(
            attributes={
                "url": (
                    pattern(r"https?://[^ \t\n\r/?#]+([/?#][^ \t\n\r]*)?", "an http:// or https:// URL without spaces"),
                    True,
                ),
                "ca-file": (_FILE_PATH, False),
                "token-file": (_FILE_PATH, False),
            }
        ),
        "guest": Shape(attributes={"id": (_ID, True), "launch": (_ID, False)}),
        "monitor": Shape(attributes={"socket": (_SOCKET_PATH, True)}),
    },
    required=frozenset({"broker", "guest"}),  # no <monitor>: `sevhook start` attests it
    namespace=SEVHOOK_NS,
    prefix="sevhook:",
)


def element_text(element: etree._Element) -> str:
    """The element's text as libvirt reads it (XPath string(): comments dropped, text around them joined)."""
    if len(element) == 0:
        return element.text or ""
    return "".join(element.itertext(tag=etree.Element))


def _name(tag: str, shape_namespace: str | None, prefix: str) -> str:
    qname = etree.QName(tag)
    local = str(qname.localname)
    if qname.namespace == shape_namespace:
        return prefix + local
    if qname.namespace:
        return f"{{{qname.namespace}}}{local}"
    return local


def _text_excerpt(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 40 else text[:37] + "..."


def _list(names: list[str], prefix: str = "") -> str:
    return ", ".join(f"{prefix}{n}" for n in names) if names else "none"


def explain(element: etree._Element, shape: Shape, display: str, prefix: str = "") -> list[tuple[int, str]]:  # noqa: PLR0912, PLR0915  (a branch per rule)
    """(line, message) for everything in `element` that `shape` does not allow."""
    line = element.sourceline or 1
    found: list[tuple[int, str]] = []
    allowed_attributes = sorted(shape.attributes)
    for attr_name, value in element.attrib.items():
        local = etree.QName(attr_name)
        if local.namespace or local.localname not in shape.attributes:
            if allowed_attributes:
                hint = f"allowed attributes: {_list(allowed_attributes)}"
            else:
                hint = "it takes no attributes"
            found.append((line, f"<{display}> does not take attribute '{attr_name}': remove it ({hint})"))
            continue
        check, _required = shape.attributes[local.localname]
        expected = check(value)
        if expected:
            found.append(
                (line, f"<{display}> attribute {local.localname}='{_text_excerpt(value)}' is invalid: use {expected}")
            )
    for attr_name, (_check, required) in shape.attributes.items():
        if required and attr_name not in element.attrib:
            found.append((line, f"<{display}> needs the attribute {attr_name}='...'"))

    children = [child for child in element if isinstance(child.tag, str)]
    if shape.text is not None:
        if children:
            found.append(
                (
                    children[0].sourceline or line,
                    f"<{display}> must contain only text, not <{children[0].tag}>: remove the element",
                )
            )
        else:
            text = element_text(element)
            expected = shape.text(text)
            if expected:
                found.append((line, f"<{display}> value '{_text_excerpt(text)}' is invalid: use {expected}"))
        return found

    stray_texts = [element.text] + [child.tail for child in element]
    if any(t and t.strip(_XSD_SPACE) for t in stray_texts):
        text = next(t for t in stray_texts if t and t.strip(_XSD_SPACE))
        found.append(
            (
                line,
                f"<{display}> contains the text '{_text_excerpt(text)}': "
                "only child elements are allowed here; remove it",
            )
        )

    seen: dict[str, int] = {}
    allowed_children = sorted(shape.children)
    for child in children:
        qname = etree.QName(child.tag)
        child_line = child.sourceline or line
        child_display = _name(child.tag, shape.namespace, shape.prefix or prefix)
        if qname.namespace != shape.namespace or qname.localname not in shape.children:
            if qname.localname in shape.children:
                found.append(
                    (
                        child_line,
                        f"<{display}> does not allow <{child_display}>: write <{shape.prefix}{qname.localname}> "
                        f"(the element must be in the namespace {shape.namespace})",
                    )
                )
                continue
            if allowed_children:
                hint = f"allowed: {_list(allowed_children, shape.prefix)}"
            else:
                hint = "it takes no child elements"
            found.append((child_line, f"<{display}> does not allow <{child_display}>: remove it ({hint})"))
            continue
        if qname.localname in seen:
            found.append(
                (
                    child_line,
                    f"<{child_display}> appears twice in <{display}> (also on line {seen[qname.localname]}): keep one",
                )
            )
            continue
        seen[qname.localname] = child_line
        found.extend(explain(child, shape.children[qname.localname], child_display, shape.prefix))
    for missing in sorted(shape.required - seen.keys()):
        found.append((line, f"<{display}> needs a <{shape.prefix}{missing}> element"))
    return found


def explain_launch_security(element: etree._Element) -> list[tuple[int, str]]:
    """Why <launchSecurity> is invalid, by type; libvirt's own wording where libvirt has one."""
    line = element.sourceline or 1
    raw_type = element.get("type")
    if raw_type is None:
        return [(line, f"<launchSecurity> needs a type attribute: one of {', '.join(LAUNCH_SECURITY_TYPES)}")]
    kind = _collapse(raw_type)
    if kind not in LAUNCH_SECURITY_SHAPES:
        message = f"Invalid value for attribute 'type' in element 'launchSecurity': '{raw_type}'."
        if kind == "sev-es":
            message += (
                " SEV-ES is type='sev' with policy bit 2 (0x4) set: write type='sev' and e.g. <policy>0x0007</policy>"
            )
        else:
            message += f" Use one of {', '.join(LAUNCH_SECURITY_TYPES)}"
        return [(line, message)]
    found = explain(element, LAUNCH_SECURITY_SHAPES[kind], f"launchSecurity type='{kind}'")
    return [(line_, _libvirt_wording(kind, message)) for line_, message in found]


def _libvirt_wording(kind: str, message: str) -> str:
    """Lead with libvirt's own error text where libvirt has one, so both tools read alike."""
    if message.endswith("needs a <policy> element"):
        example = "0x00030000" if kind == "sev-snp" else "0x0033"
        return f"failed to get launch security policy: add <policy>, e.g. <policy>{example}</policy>"
    for child, libvirt_name in (("cbitpos", "cbitpos"), ("reducedPhysBits", "reduced-phys-bits")):
        if message.startswith(f"<{child}> value "):
            return f"Invalid format for launch security {libvirt_name}: {message}"
    return message


def explain_attestation(element: etree._Element) -> list[tuple[int, str]]:
    return explain(element, ATTESTATION_SHAPE, "sevhook:attestation", "sevhook:")
