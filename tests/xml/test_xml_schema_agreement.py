"""RELAX NG and XSD say the same thing, and the readable explanations find a problem exactly when
they do: on every fixture and on thousands of generated <launchSecurity> and <sevhook:attestation>
variants, valid and broken."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from sevhook.xml import schemas, structure
from sevhook.xml.models import SEVHOOK_NS

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
ALL_FIXTURES = sorted(FIXTURES.glob("*/*.xml"))
SAFE = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)


def _elements(path: Path) -> list[tuple[str, etree._Element]]:
    try:
        root = etree.parse(str(path), SAFE).getroot()
    except etree.XMLSyntaxError:
        return []
    found = [("launchsecurity", e) for e in root.iter("launchSecurity")]
    found += [("sevhook-metadata", e) for e in root.iter(f"{{{SEVHOOK_NS}}}attestation")]
    return found


def _verdicts(name: str, element: etree._Element) -> tuple[bool, bool, bool]:
    explain = structure.explain_launch_security if name == "launchsecurity" else structure.explain_attestation
    return (
        schemas.rng_valid(name, element),  # type: ignore[arg-type]
        schemas.xsd_valid(name, element),  # type: ignore[arg-type]
        not explain(element),
    )


@pytest.mark.parametrize("path", ALL_FIXTURES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_rng_xsd_and_explanations_agree_on_fixture(path: Path) -> None:
    for name, element in _elements(path):
        rng, xsd, explained = _verdicts(name, element)
        assert rng == xsd == explained, (
            f"{path.name} line {element.sourceline}: rng={rng} xsd={xsd} explain={explained}"
        )


# ---- generated variants -------------------------------------------------------------------------
# Mostly well-formed variants with occasional mutations, so that both verdicts are well represented.


def _rarely(draw: st.DrawFn, one_in: int = 8) -> bool:
    return draw(st.integers(0, one_in - 1)) == 0


def _value(draw: st.DrawFn, good: list[str], bad: list[str], one_in: int = 8) -> str:
    return draw(st.sampled_from(bad if _rarely(draw, one_in) else good))


UINT_GOOD = ["0", "47", "+47", " 51 ", "-0", "4294967295", "007", "1"]
UINT_BAD = ["4294967296", "-1", "abc", "", "0x2f", "4 7"]
DIGITS_GOOD = ["0", "12", "4294967295", "0000000001"]
DIGITS_BAD = [" 5 ", "+5", "4294967296", "", "-0"]
HEX_GOOD = ["0x33", "33", "0x0001", "0x00030000", "ffffffffffffffff", "0x7"]
HEX_BAD = ["0X33", "0x", "", " 0x33", "0x33 ", "0xG", "-1"]
TEXT_GOOD = ["", "AAAA", "AQAB/+==", " some text "]
YES_NO_GOOD = ["yes", "no", " yes", "no "]
YES_NO_BAD = ["true", "", "YES", "y es"]
PATH_GOOD = ["/run/qgs.sock", "C:\\qgs", "//x"]
PATH_BAD = ["qgs.sock", "", "/"]

LS_SHAPES: dict[str, tuple[dict[str, tuple[list[str], list[str]] | None], list[str], set[str]]] = {
    "sev": (
        {
            "cbitpos": (UINT_GOOD, UINT_BAD),
            "reducedPhysBits": (UINT_GOOD, UINT_BAD),
            "policy": (HEX_GOOD, HEX_BAD),
            "handle": (DIGITS_GOOD, DIGITS_BAD),
            "dhCert": (TEXT_GOOD, TEXT_GOOD),
            "session": (TEXT_GOOD, TEXT_GOOD),
        },
        ["kernelHashes"],
        {"policy"},
    ),
    "sev-snp": (
        {
            "cbitpos": (UINT_GOOD, UINT_BAD),
            "reducedPhysBits": (UINT_GOOD, UINT_BAD),
            "policy": (HEX_GOOD, HEX_BAD),
            "guestVisibleWorkarounds": (TEXT_GOOD, TEXT_GOOD),
            "idBlock": (TEXT_GOOD, TEXT_GOOD),
            "idAuth": (TEXT_GOOD, TEXT_GOOD),
            "hostData": (TEXT_GOOD, TEXT_GOOD),
        },
        ["kernelHashes", "authorKey", "vcek"],
        {"policy"},
    ),
    "s390-pv": ({}, [], set()),
    "tdx": (
        {
            "policy": (HEX_GOOD, HEX_BAD),
            "mrConfigId": (TEXT_GOOD, TEXT_GOOD),
            "mrOwner": (TEXT_GOOD, TEXT_GOOD),
            "mrOwnerConfig": (TEXT_GOOD, TEXT_GOOD),
            "quoteGenerationService": None,
        },
        [],
        set(),
    ),
}
ALL_CHILDREN = sorted({name for children, _, _ in LS_SHAPES.values() for name in children} | {"kernel"})
ALL_ATTRIBUTES = ["kernelHashes", "authorKey", "vcek", "path", "bogus"]


@st.composite
def launch_security(draw: st.DrawFn) -> etree._Element:
    element = etree.Element("launchSecurity")
    kind = draw(st.sampled_from(sorted(LS_SHAPES)))
    children, attributes, required = LS_SHAPES[kind]
    if not _rarely(draw, 20):
        element.set("type", draw(st.sampled_from([kind, kind, f" {kind} "])))
    elif _rarely(draw, 2):
        element.set("type", draw(st.sampled_from(["sev-es", "", "SEV", "sme"])))
    for name in draw(st.lists(st.sampled_from(attributes), unique=True)) if attributes else []:
        element.set(name, _value(draw, YES_NO_GOOD, YES_NO_BAD))
    if _rarely(draw, 15):
        element.set(draw(st.sampled_from(ALL_ATTRIBUTES)), "yes")
    names = draw(st.permutations(sorted(children)))
    chosen = [
        n for n in names if (n in required and not _rarely(draw, 15)) or (n not in required and draw(st.booleans()))
    ]
    if _rarely(draw, 12):
        chosen.insert(draw(st.integers(0, len(chosen))), draw(st.sampled_from(ALL_CHILDREN)))
    element.text = "x" if _rarely(draw, 25) else "\n  "
    for name in chosen:
        child = etree.SubElement(element, name)
        shape = children.get(name)
        if name == "quoteGenerationService":
            if draw(st.booleans()):
                child.set("path", _value(draw, PATH_GOOD, PATH_BAD))
            child.text = draw(st.sampled_from([None, " ", None, "x"] if _rarely(draw) else [None, " "]))
        else:
            good, bad = shape if shape else (TEXT_GOOD, UINT_BAD)
            child.text = _value(draw, good, bad)
            if _rarely(draw, 25):
                etree.SubElement(child, "nested")
        child.tail = "x" if _rarely(draw, 40) else "\n  "
    return element


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(launch_security())
def test_rng_xsd_and_explanations_agree_on_generated_launch_security(element: etree._Element) -> None:
    rng, xsd, explained = _verdicts("launchsecurity", element)
    assert rng == xsd == explained, etree.tostring(element).decode()


NS = f"{{{SEVHOOK_NS}}}"
URL_GOOD = ["https://kbs.example.org/", "http://127.0.0.1:8000", "https://h/p?q#f", "https://[::1]:8443/x"]
URL_BAD = ["ftp://x", "https://", "https://a b", "", "kbs.example.org"]
ABS_GOOD = ["/etc/sevhook/ca.pem", "//x", "/run/sevhook/g.qmp"]
ABS_BAD = ["relative.pem", "/", "", " /x"]
ID_GOOD = ["guest-1", "g", "x" * 128, "uuid:9d1c2b7e@broker", "A.B_C"]
ID_BAD = ["-bad", "a b", "x" * 129, "", "é"]
TIMEOUT_GOOD = ["30", "0.5", "3600", "+5", " 30 ", "5.", ".5", "0030"]
TIMEOUT_BAD = ["0", "3600.1", "-1", "1e3", "abc", ""]
ATTESTATION_CHILDREN: dict[str, list[tuple[str, list[str], list[str], bool]]] = {
    "broker": [
        ("url", URL_GOOD, URL_BAD, True),
        ("ca-file", ABS_GOOD, ABS_BAD, False),
        ("token-file", ABS_GOOD, ABS_BAD, False),
    ],
    "guest": [("id", ID_GOOD, ID_BAD, True), ("launch", ID_GOOD, ID_BAD, False)],
    "monitor": [("socket", ABS_GOOD, ABS_BAD, True)],
}


@st.composite
def attestation(draw: st.DrawFn) -> etree._Element:
    element = etree.Element(f"{NS}attestation", nsmap={"sevhook": SEVHOOK_NS})
    if draw(st.booleans()):
        element.set("timeout", _value(draw, TIMEOUT_GOOD, TIMEOUT_BAD))
    if draw(st.booleans()):
        element.set("resume", _value(draw, YES_NO_GOOD, YES_NO_BAD))
    if _rarely(draw, 20):
        element.set("retries", "3")
    names = [n for n in draw(st.permutations(sorted(ATTESTATION_CHILDREN))) if not _rarely(draw, 20)]
    if _rarely(draw, 15):
        names.append(draw(st.sampled_from(["broker", "secret", "guest"])))
    element.text = "x" if _rarely(draw, 30) else "\n  "
    for name in names:
        tag = name if _rarely(draw, 30) else f"{NS}{name}"
        child = etree.SubElement(element, tag)
        for attribute, good, bad, required in ATTESTATION_CHILDREN.get(name, []):
            if (required and not _rarely(draw, 20)) or (not required and draw(st.booleans())):
                child.set(attribute, _value(draw, good, bad, 20))
        child.text = "x" if _rarely(draw, 30) else draw(st.sampled_from([None, " "]))
        child.tail = "\n  "
    return element


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(attestation())
def test_rng_xsd_and_explanations_agree_on_generated_attestation(element: etree._Element) -> None:
    rng, xsd, explained = _verdicts("sevhook-metadata", element)
    assert rng == xsd == explained, etree.tostring(element).decode()
