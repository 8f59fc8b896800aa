"""Chain verification ARK -> ASK -> CEK -> PEK <- OCA, PEK -> PDH from every input layout, with every
failure naming its link: pinned AMD roots, the unsigned Naples ARK, forged roots, trust anchors."""

from __future__ import annotations

import base64
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from sevhook.errors import FormatError, SevhookError, VerificationError
from sevhook.sev.certs import SEV_CERT_SIZE, SIGNED_END, AmdCertificate, Usage
from sevhook.sev.chain import CertificateChain, maybe_base64, verify_chain
from sevhook.sev.roots import AMD_ROOTS, TrustAnchor, pinned_root

LINKS = ["ARK", "ARK -> ASK", "ASK -> CEK", "CEK -> PEK", "OCA (self-signed)", "OCA -> PEK", "PEK -> PDH"]


def _roots(vectors: Path, generation: str) -> bytes:
    base = vectors / "amd-roots"
    return (base / f"{generation}_ask.cert").read_bytes() + (base / f"{generation}_ark.cert").read_bytes()


def test_real_full_chain(naples: Path) -> None:
    raw = (naples / "full_chain.bin").read_bytes()
    chain = CertificateChain.from_full(raw)
    assert chain.to_full() == raw
    report = chain.verify()
    assert report.ok and report.root == "AMD Naples"
    assert [link.name for link in report.links] == LINKS


def test_real_chain_from_qmp_strings(naples: Path, vectors: Path) -> None:
    pdh_b64 = base64.b64encode((naples / "pdh.cert").read_bytes()).decode()
    chain_b64 = base64.b64encode((naples / "cert_chain_export.bin").read_bytes()).decode()
    chain = CertificateChain.from_qmp(pdh_b64, chain_b64, _roots(vectors, "naples"))
    assert chain.to_full() == (naples / "full_chain.bin").read_bytes()
    assert chain.verify().ok


def test_real_chain_from_separate_files(naples: Path, vectors: Path) -> None:
    sev = b"".join((naples / f"{n}.cert").read_bytes() for n in ("pdh", "pek", "oca", "cek"))
    chain = CertificateChain.from_parts(sev, ca=_roots(vectors, "naples"))
    assert verify_chain(chain).ok


def test_real_chain_from_one_file_per_certificate(naples: Path, vectors: Path) -> None:
    files = {n: (naples / f"{n}.cert").read_bytes() for n in ("pdh", "pek", "oca", "cek")}
    files["ask"] = (vectors / "amd-roots" / "naples_ask.cert").read_bytes()
    files["ark"] = (naples / "ark.cert.bad").read_bytes()
    chain = CertificateChain.from_separate(**files)
    assert verify_chain(chain).ok and not chain.ark.is_signed
    with pytest.raises(FormatError, match="ASK certificate: holds a certificate with usage ARK"):
        CertificateChain.from_separate(**{**files, "ask": files["ark"]})


def test_unsigned_naples_ark_is_accepted_by_pinned_key_and_reported(naples: Path, vectors: Path) -> None:
    ca = (vectors / "amd-roots" / "naples_ask.cert").read_bytes() + (naples / "ark.cert.bad").read_bytes()
    chain = CertificateChain.from_parts((naples / "cert_chain_export.bin").read_bytes(), ca=ca,
                                        pdh=(naples / "pdh.cert").read_bytes())
    report = verify_chain(chain)
    assert report.ok and "unsigned" in report.links[0].why


def test_every_amd_root_is_pinned(vectors: Path) -> None:
    names = {root.name.lower() for root in AMD_ROOTS}
    assert names == {"naples", "rome", "milan", "genoa", "turin"}
    for name in names:
        ark = AmdCertificate.parse((vectors / "amd-roots" / f"{name}_ark.cert").read_bytes())
        assert pinned_root(ark).name.lower() == name


@pytest.mark.parametrize("generation", ["rome", "milan", "genoa", "turin"])
def test_wrong_generation_fails_at_ask_to_cek(naples: Path, vectors: Path, generation: str) -> None:
    sev = (naples / "full_chain.bin").read_bytes()[: 4 * SEV_CERT_SIZE]
    report = verify_chain(CertificateChain.from_parts(sev, ca=_roots(vectors, generation)))
    assert [link.name for link in report.failures] == ["ASK -> CEK"]
    assert report.links[0].ok and f"AMD {generation.capitalize()}" in report.root


def test_mixed_ask_and_ark_fail_at_ark_to_ask(naples: Path, vectors: Path) -> None:
    sev = (naples / "full_chain.bin").read_bytes()[: 4 * SEV_CERT_SIZE]
    ca = ((vectors / "amd-roots" / "naples_ask.cert").read_bytes()
          + (vectors / "amd-roots" / "rome_ark.cert").read_bytes())
    report = verify_chain(CertificateChain.from_parts(sev, ca=ca))
    assert "ARK -> ASK" in [link.name for link in report.failures]
    with pytest.raises(VerificationError, match=r"ARK -> ASK: .*certified by key id 1bb987c3"):
        CertificateChain.from_parts(sev, ca=ca).verify()


def test_forged_root_with_amd_key_id_is_rejected(naples: Path, platform) -> None:
    """A self-signed ARK that copies AMD's key id but holds another key must fail."""
    chain = CertificateChain.from_full((naples / "full_chain.bin").read_bytes())
    key = platform.ark_key
    forged = AmdCertificate.build(chain.ark.key_id, chain.ark.key_id, Usage.ARK, key.public_key()).sign(key)
    report = verify_chain(replace(chain, ark=forged))
    assert not report.links[0].ok and "different key" in report.links[0].why


def test_emulated_chain_needs_an_explicit_trust_anchor(platform) -> None:
    report = verify_chain(platform.chain)
    assert [link.name for link in report.failures] == ["ARK"]
    assert "--trust-anchor" in report.failures[0].why
    trusted = platform.chain.verify([platform.anchor])
    assert trusted.ok and trusted.root == "trust anchor 'test platform'"


def test_trust_anchor_does_not_trust_another_key(platform) -> None:
    other_key = rsa.generate_private_key(65537, 2048)
    ark = platform.chain.ark
    impostor = AmdCertificate.build(ark.key_id, ark.key_id, Usage.ARK, other_key.public_key()).sign(other_key)
    assert not TrustAnchor("other", impostor).matches(ark)
    assert not verify_chain(platform.chain, [TrustAnchor("other", impostor)]).ok


def test_trust_anchor_load(tmp_path: Path, platform) -> None:
    (tmp_path / "ark.cert").write_bytes(platform.chain.ark.to_bytes())
    (tmp_path / "bundle.cert").write_bytes(platform.chain.ask.to_bytes() + platform.chain.ark.to_bytes())
    (tmp_path / "ask.cert").write_bytes(platform.chain.ask.to_bytes())
    assert TrustAnchor.load(tmp_path / "ark.cert").name == "ark.cert"
    assert TrustAnchor.load(tmp_path / "bundle.cert", "sim").ark == platform.chain.ark
    with pytest.raises(FormatError, match="expected an ARK"):
        TrustAnchor.load(tmp_path / "ask.cert")
    with pytest.raises(SevhookError, match="cannot read"):
        TrustAnchor.load(tmp_path / "missing.cert")


@pytest.mark.parametrize(
    "attribute,link",
    [("pdh", "PEK -> PDH"), ("oca", "OCA (self-signed)"), ("cek", "ASK -> CEK")],
)
def test_substituted_certificate_names_its_link(platform, attribute: str, link: str) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    from sevhook.sev.certs import SevCertificate

    original = getattr(platform.chain, attribute)
    key = ec.generate_private_key(ec.SECP384R1())
    substitute = SevCertificate.generate(original.usage, key.public_key(), 0, 22)
    if attribute == "oca":
        substitute = substitute.sign(Usage.PEK, key)  # a signature by the wrong usage
    report = verify_chain(replace(platform.chain, **{attribute: substitute}), [platform.anchor])
    assert link in [failure.name for failure in report.failures]


def test_certificates_in_the_wrong_order_are_named(naples: Path, vectors: Path) -> None:
    pdh, pek, oca, cek = ((naples / f"{n}.cert").read_bytes() for n in ("pdh", "pek", "oca", "cek"))
    with pytest.raises(FormatError, match=r"certificate 2 \(PEK\): holds a certificate with usage OCA"):
        CertificateChain.from_parts(pdh + oca + pek + cek, ca=_roots(vectors, "naples"))


@pytest.mark.parametrize(
    "size,message",
    [(0, "expected PDH"), (100, "expected PDH"), (3 * SEV_CERT_SIZE + 5, "truncated inside"),
     (4 * SEV_CERT_SIZE, "no ASK/ARK")],
)
def test_truncated_chains(naples: Path, size: int, message: str) -> None:
    data = (naples / "full_chain.bin").read_bytes()[:size]
    with pytest.raises(FormatError, match=message):
        CertificateChain.from_parts(data)


def test_full_chain_cut_inside_the_ark(naples: Path) -> None:
    data = (naples / "full_chain.bin").read_bytes()
    with pytest.raises(FormatError):
        CertificateChain.from_full(data[:-100])


def test_cert_chain_needs_the_pdh(naples: Path, vectors: Path) -> None:
    with pytest.raises(FormatError, match="give the PDH"):
        CertificateChain.from_parts((naples / "cert_chain_export.bin").read_bytes(), ca=_roots(vectors, "naples"))


def test_bad_base64_from_qmp(vectors: Path) -> None:
    with pytest.raises(FormatError, match=r"pdh .*base64"):
        CertificateChain.from_qmp("not base64!", "", _roots(vectors, "naples"))


def test_maybe_base64(naples: Path) -> None:
    raw = (naples / "pdh.cert").read_bytes()
    assert maybe_base64(base64.b64encode(raw) + b"\n") == raw
    assert maybe_base64(raw) == raw


def test_flipped_bytes_of_the_full_chain_are_detected(naples: Path) -> None:
    """Every 37th byte of the signed parts of the SEV certificates, and of the whole ASK and ARK
    (their signatures are checked too): a parse error or a failed link, never a valid chain."""
    raw = (naples / "full_chain.bin").read_bytes()
    sev_end = 4 * SEV_CERT_SIZE
    for index in range(0, len(raw), 37):
        if index < sev_end and index % SEV_CERT_SIZE >= SIGNED_END:
            continue  # signature slots: covered by test_certs
        altered = raw[:index] + bytes([raw[index] ^ 0x80]) + raw[index + 1 :]
        try:
            report = verify_chain(CertificateChain.from_full(altered))
        except FormatError:
            continue
        assert not report.ok, f"flipping byte {index} went unnoticed"


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=12000))
def test_fuzz_chain_parse(data: bytes) -> None:
    try:
        verify_chain(CertificateChain.from_parts(data))
    except SevhookError:
        pass


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200), st.text(max_size=200), st.binary(max_size=2000))
def test_fuzz_qmp_inputs(pdh_b64: str, chain_b64: str, ca: bytes) -> None:
    try:
        CertificateChain.from_qmp(pdh_b64, chain_b64, ca)
    except SevhookError:
        pass
