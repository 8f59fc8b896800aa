"""Every fixture produces exactly the problems written at its top (`<!-- expect: LINE: LEVEL: MESSAGE -->`),
valid fixtures have no errors, invalid ones at least one, and the models carry what the XML says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sevhook.sev.policy import SevPolicyFlag
from sevhook.xml import DomainXmlError, load_domain, validate_file
from sevhook.xml.models import (
    S390PvLaunchSecurity,
    SevLaunchSecurity,
    SevSnpLaunchSecurity,
    TdxLaunchSecurity,
)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
VALID = sorted((FIXTURES / "valid").glob("*.xml"))
INVALID = sorted((FIXTURES / "invalid").glob("*.xml"))
EXPECT = re.compile(r"<!-- expect: (\d+): (error|warning): (.*?) -->")


def expected(path: Path) -> list[tuple[int, str, str]]:
    return [(int(line), level, message) for line, level, message in EXPECT.findall(path.read_text())]


def found(path: Path) -> list[tuple[int, str, str]]:
    problems = validate_file(path)
    assert all(p.file == str(path) for p in problems)
    return [(p.line, p.level, p.message) for p in problems]


def test_there_are_fixtures_for_every_type_and_rule() -> None:
    assert len(VALID) >= 20 and len(INVALID) >= 60


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_valid_fixture_has_exactly_its_expected_warnings(path: Path) -> None:
    want = expected(path)
    assert all(level == "warning" for _, level, _ in want)
    assert found(path) == want
    assert bool(want) == path.name.startswith("warn-")


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_fixture_is_rejected_with_exactly_its_expected_messages(path: Path) -> None:
    want = expected(path)
    assert any(level == "error" for _, level, _ in want), "an invalid fixture must expect an error"
    assert found(path) == want


def _domain(name: str):
    return load_domain(FIXTURES / "valid" / name).require_valid()


def test_sev_model() -> None:
    domain = _domain("sev.xml")
    assert (domain.name, domain.type, domain.vcpus) == ("guest", "kvm", 2)
    assert domain.uuid == "6f2d0e3c-8a4b-4c1e-9d57-0b1a2c3d4e5f"
    assert domain.emulator == "/usr/bin/qemu-system-x86_64"
    assert domain.os.firmware == "efi"
    ls = domain.launch_security
    assert isinstance(ls, SevLaunchSecurity)
    assert (
        ls.policy.value == 0x33
        and ls.policy.flags == SevPolicyFlag.NODBG | SevPolicyFlag.NOKS | SevPolicyFlag.DOMAIN | SevPolicyFlag.SEV
    )
    assert (ls.cbitpos, ls.reduced_phys_bits, ls.dh_cert, ls.session, ls.kernel_hashes) == (47, 1, None, None, None)
    assert domain.attestation is None


def test_policy_is_read_as_hex_even_without_prefix() -> None:
    ls = _domain("sev-policy-without-prefix.xml").launch_security
    assert isinstance(ls, SevLaunchSecurity) and ls.policy.value == 0x33


def test_sev_es_model_and_loader() -> None:
    domain = _domain("sev-es.xml")
    assert isinstance(domain.launch_security, SevLaunchSecurity) and domain.launch_security.policy.es
    assert domain.os.loader == "/usr/share/OVMF/OVMF_CODE_4M.fd" and domain.os.loader_type == "pflash"
    assert domain.os.firmware is None


def test_owner_blobs_are_kept_verbatim() -> None:
    path = FIXTURES / "valid" / "sev-owner-session-wrapped.xml"
    ls = load_domain(path).require_valid().launch_security
    assert isinstance(ls, SevLaunchSecurity) and ls.dh_cert is not None and ls.session is not None
    assert "\n" in ls.dh_cert and ls.dh_cert in path.read_text()  # exactly the text libvirt writes to dh_cert.base64


def test_kernel_hashes_model() -> None:
    domain = _domain("sev-kernel-hashes.xml")
    assert isinstance(domain.launch_security, SevLaunchSecurity) and domain.launch_security.kernel_hashes is True
    assert domain.os.kernel == "/var/lib/libvirt/boot/vmlinuz"
    assert domain.os.initrd == "/var/lib/libvirt/boot/initrd.img"
    assert domain.os.cmdline == "console=ttyS0 root=/dev/vda1"


def test_attestation_model() -> None:
    attestation = _domain("sev-attested.xml").attestation
    assert attestation is not None
    assert attestation.broker.url == "https://kbs.example.org:8443/sevhook"
    assert attestation.broker.ca_file == "/etc/sevhook/kbs-ca.pem"
    assert attestation.broker.token_file == "/etc/sevhook/host.token"
    assert (attestation.guest_id, attestation.launch_id) == ("guest-7f3a", "9d1c2b7e-4a51-4f0e-8c1d-2b3a4c5d6e7f")
    assert attestation.socket == "/run/sevhook/guest.qmp"
    assert (attestation.timeout, attestation.resume) == (45.0, True)


def test_attestation_defaults() -> None:
    attestation = _domain("sev-attested-minimal.xml").attestation
    assert attestation is not None
    assert (attestation.timeout, attestation.resume, attestation.launch_id) == (30.0, True, None)
    assert attestation.broker.ca_file is None and attestation.broker.token_file is None



def test_attestation_without_monitor_is_sevhook_starts_mode() -> None:
    """No <sevhook:monitor>: valid, no socket, and no warning about a monitor or a missing session."""
    path = FIXTURES / "valid" / "sev-attested-start-mode.xml"
    assert validate_file(path) == []
    attestation = _domain(path.name).attestation
    assert attestation is not None
    assert attestation.socket is None and attestation.guest_id == "web1" and attestation.timeout == 60.0


def test_snp_model() -> None:
    ls = _domain("sev-snp.xml").launch_security
    assert isinstance(ls, SevSnpLaunchSecurity)
    assert ls.policy.value == 0x30000 and ls.policy.reserved_bit17_set
    assert (ls.cbitpos, ls.kernel_hashes, ls.author_key, ls.vcek) == (51, False, False, True)
    assert all(blob for blob in (ls.guest_visible_workarounds, ls.id_block, ls.id_auth, ls.host_data))


def test_s390_and_tdx_models() -> None:
    assert isinstance(_domain("s390-pv.xml").launch_security, S390PvLaunchSecurity)
    tdx = _domain("tdx.xml").launch_security
    assert isinstance(tdx, TdxLaunchSecurity)
    assert tdx.policy == 0x10000000 and tdx.quote_generation_socket == "/var/run/tdx-qgs/qgs.socket"
    assert tdx.mr_config_id and tdx.mr_owner and tdx.mr_owner_config
    assert _domain("tdx-minimal.xml").launch_security == TdxLaunchSecurity()


def test_models_are_immutable() -> None:
    domain = _domain("sev.xml")
    with pytest.raises(AttributeError):
        domain.name = "other"  # type: ignore[misc]


def test_require_valid_fails_closed_with_every_error() -> None:
    document = load_domain(FIXTURES / "invalid" / "attestation-child-without-namespace.xml")
    assert not document.valid
    with pytest.raises(DomainXmlError) as caught:
        document.require_valid()
    assert len(caught.value.problems) == 2 and "needs a <sevhook:guest> element" in str(caught.value)


def test_blob_errors_keep_the_rest_of_the_model() -> None:
    """A bad blob is an error, but the rest of the domain is still modelled (e.g. for the QEMU argv)."""
    document = load_domain(FIXTURES / "invalid" / "sev-session-wrong-size.xml")
    assert not document.valid
    assert isinstance(document.domain.launch_security, SevLaunchSecurity)


def test_source_may_be_str_or_bytes_with_a_name() -> None:
    text = (FIXTURES / "valid" / "warn-sev-key-sharing.xml").read_text()
    from_text = load_domain(text, filename="inline.xml")
    from_bytes = load_domain(text.encode())
    assert [p.file for p in from_text.problems] == ["inline.xml"]
    assert [p.file for p in from_bytes.problems] == ["<bytes>"]
    assert from_text.domain == from_bytes.domain


def test_require_sev() -> None:
    path = FIXTURES / "valid" / "no-launch-security.xml"
    assert load_domain(path).valid
    problems = load_domain(path, require_sev=True).errors
    assert [(p.line, p.message) for p in problems] == [
        (
            1,
            "the domain has no <launchSecurity> and --require-sev is set: "
            "add <launchSecurity type='sev'> with a <policy>",
        )
    ]
