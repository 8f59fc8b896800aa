"""Fixtures for the SEV cryptography tests: the shared known-answer files and an emulated platform
(fresh ARK/ASK/CEK/OCA/PEK/PDH keys) for round trips that need private keys."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sevhook.sev.certs import AmdCertificate, SevCertificate, Usage
from sevhook.sev.chain import CertificateChain
from sevhook.sev.roots import TrustAnchor


@pytest.fixture(scope="session")
def vectors(shared: Path) -> Path:
    return shared / "vectors"


@pytest.fixture(scope="session")
def naples(vectors: Path) -> Path:
    return vectors / "chains" / "naples"


@dataclass(frozen=True)
class EmulatedPlatform:
    chain: CertificateChain
    anchor: TrustAnchor
    ark_key: rsa.RSAPrivateKey
    ask_key: rsa.RSAPrivateKey
    cek_key: ec.EllipticCurvePrivateKey
    oca_key: ec.EllipticCurvePrivateKey
    pek_key: ec.EllipticCurvePrivateKey
    pdh_key: ec.EllipticCurvePrivateKey


def build_platform(rsa_bits: int = 2048) -> EmulatedPlatform:
    ark_key = rsa.generate_private_key(65537, rsa_bits)
    ask_key = rsa.generate_private_key(65537, rsa_bits)
    ark_id, ask_id = bytes(range(16)), bytes(range(16, 32))
    ark = AmdCertificate.build(ark_id, ark_id, Usage.ARK, ark_key.public_key()).sign(ark_key)
    ask = AmdCertificate.build(ask_id, ark_id, Usage.ASK, ask_key.public_key()).sign(ark_key)
    cek_key, oca_key, pek_key, pdh_key = (ec.generate_private_key(ec.SECP384R1()) for _ in range(4))
    cek = SevCertificate.generate(Usage.CEK, cek_key.public_key(), 0, 14).sign(Usage.ASK, ask_key)
    oca = SevCertificate.generate(Usage.OCA, oca_key.public_key(), 0, 22).sign(Usage.OCA, oca_key)
    pek = (
        SevCertificate.generate(Usage.PEK, pek_key.public_key(), 0, 22)
        .sign(Usage.OCA, oca_key)
        .sign(Usage.CEK, cek_key)
    )
    pdh = SevCertificate.generate(Usage.PDH, pdh_key.public_key(), 0, 22).sign(Usage.PEK, pek_key)
    chain = CertificateChain(pdh, pek, oca, cek, ask, ark)
    return EmulatedPlatform(chain, TrustAnchor("test platform", ark), ark_key, ask_key, cek_key, oca_key,
                            pek_key, pdh_key)


@pytest.fixture(scope="session")
def platform() -> EmulatedPlatform:
    return build_platform()
