"""The SEV attestation report: layout, PEK signature over the first 0x34 bytes, tamper detection."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from sevhook.errors import FormatError, SevhookError, VerificationError
from sevhook.sev.attestation import REPORT_SIZE, SIGNED_SIZE, AttestationReport
from sevhook.sev.certs import SevCertificate, Usage


@pytest.fixture(scope="module")
def pek() -> tuple[ec.EllipticCurvePrivateKey, SevCertificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    return key, SevCertificate.generate(Usage.PEK, key.public_key(), 0, 22)


def test_sign_and_verify(pek) -> None:
    key, cert = pek
    report = AttestationReport(bytes(range(16)), bytes(range(32)), 0x30005).sign(key)
    raw = report.to_bytes()
    assert len(raw) == REPORT_SIZE
    assert raw[:16] == bytes(range(16)) and raw[0x30:0x34] == (0x30005).to_bytes(4, "little")
    assert raw[0x34:0x3C] == b"\x02\x10\0\0\x02\0\0\0"
    parsed = AttestationReport.parse(raw)
    assert parsed == report
    parsed.verify(cert)


def test_any_altered_byte_is_detected(pek) -> None:
    key, cert = pek
    raw = AttestationReport(bytes(16), bytes(32), 1).sign(key).to_bytes()
    for index in [*range(SIGNED_SIZE + 8), 0x40, 0x60, 0x88, 0x90, 0xCF]:
        altered = raw[:index] + bytes([raw[index] ^ 0x01]) + raw[index + 1 :]
        with pytest.raises(VerificationError):
            AttestationReport.parse(altered).verify(cert)


def test_another_platform_is_refused(pek) -> None:
    other = ec.generate_private_key(ec.SECP384R1())
    report = AttestationReport(bytes(16), bytes(32), 1).sign(other)
    with pytest.raises(VerificationError, match="does not verify"):
        report.verify(pek[1])
    with pytest.raises(VerificationError, match="expected the PEK"):
        report.verify(SevCertificate.generate(Usage.OCA, other.public_key()))


def test_build_is_unsigned_and_checks_sizes(pek) -> None:
    report = AttestationReport.build(bytes(16), bytes(32), 7)
    with pytest.raises(VerificationError):
        report.verify(pek[1])
    report.sign(pek[0]).verify(pek[1])
    with pytest.raises(FormatError, match="mnonce is 16 bytes"):
        AttestationReport.build(bytes(15), bytes(32), 7)


def test_bad_sizes() -> None:
    with pytest.raises(FormatError, match="exactly 208"):
        AttestationReport.parse(bytes(100))


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_parse(data: bytes) -> None:
    try:
        assert AttestationReport.parse(data).to_bytes() == data
    except SevhookError:
        pass
