"""Our schemas accept what libvirt accepts: every valid fixture and libvirt's own launch-security test
inputs pass our RELAX NG, our XSD and libvirt's installed schema (Debian 12's libvirt 9.0, which predates
the sev-snp and tdx types: there the rejection is asserted, and shown to be about that type alone).
Our launchsecurity.rng also plugs into libvirt's grammar, both by externalRef and by include."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from lxml import etree

from sevhook.xml import schemas
from sevhook.xml.models import SEVHOOK_NS

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
VALID = sorted((FIXTURES / "valid").glob("*.xml"))
LIBVIRT_SCHEMA = Path("/usr/share/libvirt/schemas/domain.rng")
TYPES_NEWER_THAN_DEBIAN_LIBVIRT = {"sev-snp", "tdx"}  # sev-snp arrived in libvirt 10.5, tdx later; Debian 12 has 9.0
SAFE = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)


@pytest.fixture(scope="module")
def libvirt_rng() -> etree.RelaxNG:
    assert LIBVIRT_SCHEMA.exists(), f"{LIBVIRT_SCHEMA} is missing: install libvirt-daemon (scripts/run test does)"
    return etree.RelaxNG(file=str(LIBVIRT_SCHEMA))


def golden_inputs(shared: Path) -> list[Path]:
    golden = shared / "libvirt-golden"
    files = sorted(golden.glob("*.xml")) + sorted((golden / "genericxml2xmlindata").glob("*.xml"))
    assert len(files) >= 7, f"libvirt's golden inputs are missing under {golden}"
    return files


def _parse(path: Path) -> etree._ElementTree:
    return etree.parse(str(path), SAFE)


def _our_parts(tree: etree._ElementTree) -> list[tuple[str, etree._Element]]:
    root = tree.getroot()
    parts = [("launchsecurity", e) for e in root.iter("launchSecurity")]
    return parts + [("sevhook-metadata", e) for e in root.iter(f"{{{SEVHOOK_NS}}}attestation")]


def _assert_ours_accept(path: Path) -> None:
    for name, element in _our_parts(_parse(path)):
        assert schemas.rng_valid(name, element), f"{path}: our {name}.rng rejects line {element.sourceline}"  # type: ignore[arg-type]
        assert schemas.xsd_valid(name, element), f"{path}: our {name}.xsd rejects line {element.sourceline}"  # type: ignore[arg-type]


def _launch_security_type(tree: etree._ElementTree) -> str | None:
    element = tree.getroot().find("launchSecurity")
    return None if element is None else element.get("type")


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_valid_fixture_is_accepted_by_our_rng_and_xsd(path: Path) -> None:
    assert _our_parts(_parse(path)) or path.name == "no-launch-security.xml"
    _assert_ours_accept(path)


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_valid_fixture_against_libvirt_installed_schema(path: Path, libvirt_rng: etree.RelaxNG) -> None:
    tree = _parse(path)
    kind = _launch_security_type(tree)
    if kind not in TYPES_NEWER_THAN_DEBIAN_LIBVIRT:
        assert libvirt_rng.validate(tree), f"libvirt's schema rejects {path.name}: {libvirt_rng.error_log}"
        return
    # Debian's libvirt 9.0 schema predates this type: it must reject the document, and only because of it.
    assert not libvirt_rng.validate(tree), f"Debian's libvirt schema now accepts type='{kind}': drop this special case"
    without = copy.deepcopy(tree)
    launch_security = without.getroot().find("launchSecurity")
    assert launch_security is not None
    without.getroot().remove(launch_security)
    assert libvirt_rng.validate(without), (
        f"{path.name} is rejected by libvirt 9.0's schema for more than its type='{kind}': {libvirt_rng.error_log}"
    )


def test_libvirt_golden_inputs_are_accepted_by_all_three_schemas(shared: Path, libvirt_rng: etree.RelaxNG) -> None:
    for path in golden_inputs(shared):
        tree = _parse(path)
        assert _our_parts(tree), f"{path} has no <launchSecurity>"
        _assert_ours_accept(path)
        assert libvirt_rng.validate(tree), f"libvirt's own schema rejects its own test input {path}"


def _combined(grammar: str) -> etree.RelaxNG:
    document = etree.fromstring(grammar, base_url=str(schemas.schema_path("launchsecurity", "rng")))
    return etree.RelaxNG(document)


@pytest.fixture(scope="module", params=["externalRef", "include"])
def libvirt_with_our_launch_security(request: pytest.FixtureRequest) -> etree.RelaxNG:
    """libvirt's installed domain grammar with its launchSecurity replaced by ours."""
    ours = schemas.schema_path("launchsecurity", "rng")
    if request.param == "externalRef":
        replacement = f'<externalRef href="{ours}"/>'
        extra = ""
    else:
        replacement = '<ref name="sevhookLaunchSecurity"/>'
        extra = f'<include href="{ours}"><start combine="choice"><notAllowed/></start></include>'
    body = f'<include href="{LIBVIRT_SCHEMA}"><define name="launchSecurity">{replacement}</define></include>' + extra
    return _combined(f'<grammar xmlns="http://relaxng.org/ns/structure/1.0">{body}</grammar>')


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_our_schema_plugs_into_libvirt_grammar(path: Path, libvirt_with_our_launch_security: etree.RelaxNG) -> None:
    assert libvirt_with_our_launch_security.validate(_parse(path)), str(libvirt_with_our_launch_security.error_log)


def test_plugged_in_grammar_still_rejects_a_bad_launch_security(
    libvirt_with_our_launch_security: etree.RelaxNG,
) -> None:
    for name in ("ls-type-sev-es.xml", "sev-policy-missing.xml", "snp-dhcert.xml", "tdx-session.xml"):
        assert not libvirt_with_our_launch_security.validate(_parse(FIXTURES / "invalid" / name)), name


def test_schemas_validate_standalone_documents() -> None:
    """Each schema is usable on its own, on a document whose root is its element."""
    ls = etree.fromstring("<launchSecurity type='sev'><policy>0x0033</policy></launchSecurity>")
    assert schemas.relaxng("launchsecurity").validate(etree.ElementTree(ls))
    assert schemas.xsd("launchsecurity").is_valid(etree.ElementTree(ls))
    meta = etree.fromstring(
        f"<a:attestation xmlns:a='{SEVHOOK_NS}'><a:broker url='https://kbs/'/><a:guest id='g'/>"
        "<a:monitor socket='/run/sevhook/g.qmp'/></a:attestation>"
    )
    assert schemas.relaxng("sevhook-metadata").validate(etree.ElementTree(meta))
    assert schemas.xsd("sevhook-metadata").is_valid(etree.ElementTree(meta))
