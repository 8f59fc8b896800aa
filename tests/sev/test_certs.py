"""SEV and AMD certificate formats: real certificates parse and re-serialise byte for byte, their
signatures verify, any altered byte of a signed region is caught, and garbage gives FormatError."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sevhook.errors import FormatError, SevhookError, VerificationError
from sevhook.sev.certs import (
    SEV_CERT_SIZE,
    SIGNED_END,
    Algorithm,
    AmdCertificate,
    SevCertificate,
    Usage,
    parse_ca_bundle,
)

GENERATIONS = ("naples", "rome", "milan", "genoa", "turin")
README_KEY_IDS = {
    "naples": ("1bb987c359494606b174945601c9ea5b", "e139970cfc464377ae61b289e2f9e96e"),
    "rome": ("e6002122fb58419399d15fee7b131351", "c6cbcf145b3146f498e40ecb4ad4fded"),
    "milan": ("94c38e4177d0479292a7ae671d083fb6", "73478c05cc174bfeb06e718fa75dc3c8"),
    "genoa": ("9f9d4a8fe761456599f6946c4c010f3a", "acbb4ad21acc436fb3e932f812cd01b0"),
    "turin": ("d05c3a8bde484904b49552422ceb3942", "15051693f7304d65a527b4a7f3f7cb77"),
}


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


@pytest.fixture(scope="module")
def naples_certs(naples: Path) -> dict[str, SevCertificate]:
    return {name: SevCertificate.parse((naples / f"{name}.cert").read_bytes()) for name in ("pdh", "pek", "oca", "cek")}


@pytest.fixture(scope="module")
def naples_ca(vectors: Path) -> tuple[AmdCertificate, AmdCertificate]:
    roots = vectors / "amd-roots"
    return (AmdCertificate.parse((roots / "naples_ask.cert").read_bytes()),
            AmdCertificate.parse((roots / "naples_ark.cert").read_bytes()))


@pytest.mark.parametrize("name", ["pdh", "pek", "oca", "cek"])
def test_real_naples_certificates_round_trip(naples: Path, name: str) -> None:
    raw = (naples / f"{name}.cert").read_bytes()
    assert SevCertificate.parse(raw).to_bytes() == raw


def test_real_naples_certificate_fields(naples_certs: dict[str, SevCertificate]) -> None:
    pdh, pek, oca, cek = (naples_certs[n] for n in ("pdh", "pek", "oca", "cek"))
    assert (pdh.usage, pdh.algorithm, pdh.api_major, pdh.api_minor) == (Usage.PDH, Algorithm.ECDH_SHA256, 0, 16)
    assert (pek.usage, pek.algorithm) == (Usage.PEK, Algorithm.ECDSA_SHA256)
    assert (oca.usage, cek.usage, cek.api_minor) == (Usage.OCA, Usage.CEK, 14)
    assert [s.usage for s in pek.signatures] == [Usage.OCA, Usage.CEK]
    assert (cek.signatures[0].usage, cek.signatures[0].algorithm) == (Usage.ASK, Algorithm.RSA_SHA256)
    assert pdh.signatures[1].is_empty and oca.signatures[1].is_empty
    assert pdh.public_key().curve.name == "secp384r1"


def test_real_naples_signatures_verify(naples_certs, naples_ca) -> None:
    ask, _ark = naples_ca
    pdh, pek, oca, cek = (naples_certs[n] for n in ("pdh", "pek", "oca", "cek"))
    assert cek.verify_signed_by(ask).usage == Usage.ASK
    assert pek.verify_signed_by(cek).usage == Usage.CEK
    assert pek.verify_signed_by(oca).usage == Usage.OCA
    assert oca.verify_signed_by(oca).usage == Usage.OCA
    assert pdh.verify_signed_by(pek).usage == Usage.PEK


def test_wrong_signer_is_named(naples_certs) -> None:
    with pytest.raises(VerificationError, match="no signature by OCA"):
        naples_certs["pdh"].verify_signed_by(naples_certs["oca"])


@pytest.mark.parametrize("generation", GENERATIONS)
def test_amd_roots_of_every_generation(vectors: Path, generation: str) -> None:
    ark_raw = (vectors / "amd-roots" / f"{generation}_ark.cert").read_bytes()
    ask_raw = (vectors / "amd-roots" / f"{generation}_ask.cert").read_bytes()
    ark, ask = AmdCertificate.parse(ark_raw), AmdCertificate.parse(ask_raw)
    assert ark.to_bytes() == ark_raw and ask.to_bytes() == ask_raw
    assert (ark.key_id.hex(), ask.key_id.hex()) == README_KEY_IDS[generation]
    assert ark.certifying_id == ark.key_id and ask.certifying_id == ark.key_id
    assert (ark.usage, ask.usage) == (Usage.ARK, Usage.ASK)
    bits = 2048 if generation == "naples" else 4096
    assert ark.modulus_size == bits and len(ark_raw) == 64 + 3 * bits // 8
    assert ark.signing_algorithm == (Algorithm.RSA_SHA256 if bits == 2048 else Algorithm.RSA_SHA384)
    ark.verify_signed_by(ark)
    ask.verify_signed_by(ark)
    assert parse_ca_bundle(ask_raw + ark_raw) == (ask, ark)


def test_ask_of_another_generation_is_rejected(vectors: Path) -> None:
    milan_ark = AmdCertificate.parse((vectors / "amd-roots" / "milan_ark.cert").read_bytes())
    rome_ask = AmdCertificate.parse((vectors / "amd-roots" / "rome_ask.cert").read_bytes())
    with pytest.raises(VerificationError, match="certified by key id e6002122"):
        rome_ask.verify_signed_by(milan_ark)


def test_unsigned_naples_ark_quirk(vectors: Path, naples: Path) -> None:
    bad = (naples / "ark.cert.bad").read_bytes()
    ark = AmdCertificate.parse(bad)
    assert len(bad) == 576 and not ark.is_signed and ark.to_bytes() == bad
    full = AmdCertificate.parse(bad + (naples / "ark.cert.sig").read_bytes())
    assert full.to_bytes() == (vectors / "amd-roots" / "naples_ark.cert").read_bytes()
    with pytest.raises(VerificationError, match="no signature"):
        ark.verify_signed_by(ark)
    # the unsigned ARK still carries the key that signed the Naples ASK
    AmdCertificate.parse((vectors / "amd-roots" / "naples_ask.cert").read_bytes()).verify_signed_by(ark)


def test_unsigned_form_is_refused_for_any_other_root(vectors: Path) -> None:
    rome = (vectors / "amd-roots" / "rome_ark.cert").read_bytes()
    with pytest.raises(FormatError, match="needs 1600"):
        AmdCertificate.parse(rome[:-512])


@pytest.mark.parametrize("name,signer",
                         [("pdh", "pek"), ("pek", "oca"), ("pek", "cek"), ("oca", "oca"), ("cek", "ask")])
def test_flipping_any_signed_byte_is_detected(naples: Path, naples_certs, naples_ca, name: str, signer: str) -> None:
    raw = (naples / f"{name}.cert").read_bytes()
    signer_cert = naples_ca[0] if signer == "ask" else naples_certs[signer]
    for index in range(SIGNED_END):
        with pytest.raises((FormatError, VerificationError)):
            altered = SevCertificate.parse(_flip(raw, index))
            if signer == name:  # self-signed: the altered certificate is its own signer
                altered.verify_signed_by(altered)
            else:
                altered.verify_signed_by(signer_cert)


@pytest.mark.parametrize("name,offset", [("pdh", 0x41C), ("pek", 0x41C), ("pek", 0x624), ("cek", 0x41C)])
def test_flipping_signature_bytes_is_detected(naples: Path, naples_certs, naples_ca, name: str, offset: int) -> None:
    raw = (naples / f"{name}.cert").read_bytes()
    signers = {("pdh", 0x41C): naples_certs["pek"], ("pek", 0x41C): naples_certs["oca"],
               ("pek", 0x624): naples_certs["cek"], ("cek", 0x41C): naples_ca[0]}
    for index in (offset, offset + 17, offset + 71, offset + 72, offset + 100, offset + 143):
        with pytest.raises(VerificationError):
            SevCertificate.parse(_flip(raw, index)).verify_signed_by(signers[(name, offset)])


@pytest.mark.parametrize("generation", GENERATIONS)
def test_flipping_any_byte_of_a_signed_ask_is_detected(vectors: Path, generation: str) -> None:
    ark = AmdCertificate.parse((vectors / "amd-roots" / f"{generation}_ark.cert").read_bytes())
    raw = (vectors / "amd-roots" / f"{generation}_ask.cert").read_bytes()
    for index in range(len(raw)):
        with pytest.raises((FormatError, VerificationError)):
            AmdCertificate.parse(_flip(raw, index)).verify_signed_by(ark)


def test_generate_and_sign_ecdsa() -> None:
    oca_key, pek_key, cek_key = (ec.generate_private_key(ec.SECP384R1()) for _ in range(3))
    oca = SevCertificate.generate(Usage.OCA, oca_key.public_key()).sign(Usage.OCA, oca_key)
    pek = SevCertificate.generate(Usage.PEK, pek_key.public_key(), 0, 22).sign(Usage.OCA, oca_key)
    assert pek.signatures[1].is_empty
    pek = pek.sign(Usage.CEK, cek_key)
    cek = SevCertificate.generate(Usage.CEK, cek_key.public_key())
    reparsed = SevCertificate.parse(pek.to_bytes())
    assert reparsed == pek and len(pek.to_bytes()) == SEV_CERT_SIZE
    reparsed.verify_signed_by(oca)
    reparsed.verify_signed_by(cek)
    oca.verify_signed_by(oca)
    assert reparsed.public_key().public_numbers() == pek_key.public_key().public_numbers()
    with pytest.raises(FormatError, match="no empty signature slot"):
        pek.sign(Usage.OCA, oca_key)


def test_godh_has_empty_slots_and_ecdh_algorithm() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    godh = SevCertificate.generate(Usage.PDH, key.public_key())
    raw = godh.to_bytes()
    assert godh.algorithm == Algorithm.ECDH_SHA256 and all(s.is_empty for s in godh.signatures)
    assert raw[0x10:0x14] == b"\x02\0\0\0" and not any(raw[0x0A4:SIGNED_END])
    assert int.from_bytes(raw[0x14:0x5C], "little") == key.public_key().public_numbers().x


@pytest.mark.parametrize("bits,algorithm", [(2048, Algorithm.RSA_SHA256), (4096, Algorithm.RSA_SHA384)])
def test_rsa_ask_signs_cek_and_ark_signs_ask(bits: int, algorithm: Algorithm) -> None:
    ark_key = rsa.generate_private_key(65537, bits)
    ark = AmdCertificate.build(b"A" * 16, b"A" * 16, Usage.ARK, ark_key.public_key()).sign(ark_key)
    reparsed = AmdCertificate.parse(ark.to_bytes())
    assert reparsed == ark and len(ark.to_bytes()) == 64 + 3 * bits // 8
    reparsed.verify_signed_by(reparsed)
    cek = SevCertificate.generate(Usage.CEK, ec.generate_private_key(ec.SECP384R1()).public_key())
    cek = cek.sign(Usage.ASK, ark_key)  # the ARK's key stands in for an ASK of the same size
    assert cek.signatures[0].algorithm == algorithm
    ask_like = AmdCertificate.build(b"B" * 16, b"A" * 16, Usage.ASK, ark_key.public_key())
    SevCertificate.parse(cek.to_bytes()).verify_signed_by(ask_like)


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", "exactly 2084"),
        (bytes(SEV_CERT_SIZE - 1), "exactly 2084"),
        (bytes(SEV_CERT_SIZE + 1), "exactly 2084"),
        (bytes(SEV_CERT_SIZE), "version 0"),
        (b"\x01\0\0\0\0\0\0\0\x99\x99\0\0" + bytes(SEV_CERT_SIZE - 12), "pub_key_usage 0x9999"),
    ],
)
def test_bad_sev_certificates_are_format_errors(data: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        SevCertificate.parse(data)


def test_off_curve_key_is_a_format_error(naples: Path) -> None:
    raw = bytearray((naples / "pdh.cert").read_bytes())
    raw[0x14] ^= 1
    with pytest.raises(FormatError, match="not a point on its curve"):
        SevCertificate.parse(bytes(raw)).public_key()


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", "too short"),
        (bytes(64), "version 0"),
        (b"\x01" + bytes(63), "key sizes 0/0"),
    ],
)
def test_bad_amd_certificates_are_format_errors(data: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        AmdCertificate.parse(data)


def test_amd_certificate_with_trailing_bytes(vectors: Path) -> None:
    raw = (vectors / "amd-roots" / "milan_ark.cert").read_bytes()
    with pytest.raises(FormatError, match="3 bytes after"):
        AmdCertificate.parse(raw + b"abc")
    with pytest.raises(FormatError, match="one certificate"):
        parse_ca_bundle(raw)


def _sev_like(data: bytes) -> bytes:
    return b"\x01\0\0\0" + data


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=3000),
                 st.binary(min_size=SEV_CERT_SIZE - 4, max_size=SEV_CERT_SIZE - 4).map(_sev_like)))
def test_fuzz_sev_certificate_parse(data: bytes) -> None:
    try:
        cert = SevCertificate.parse(data)
        cert.public_key()
    except SevhookError:
        pass


_AMD_HEADER = st.tuples(st.sampled_from([2048, 4096, 1, 0]), st.binary(max_size=1700)).map(
    lambda t: b"\x01\0\0\0" + bytes(32) + b"\x13\0\0\0" + bytes(16) + t[0].to_bytes(4, "little") * 2 + t[1]
)


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.binary(max_size=2000), _AMD_HEADER))
def test_fuzz_amd_certificate_parse(data: bytes) -> None:
    for parser in (AmdCertificate.parse, parse_ca_bundle):
        try:
            result = parser(data)
            for cert in result if isinstance(result, tuple) else (result,):
                cert.public_key()
        except SevhookError:
            pass
