"""The SEV (pre-SNP) attestation report from ATTESTATION (0x36): mnonce, launch digest and policy,
signed by the platform's PEK with ECDSA P-384 over SHA-256 of the first 0x34 bytes."""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from sevhook.errors import FormatError, VerificationError
from sevhook.sev.certs import EC_COORD_SIZE, Algorithm, SevCertificate, Usage

REPORT_SIZE = 0xD0
SIGNED_SIZE = 0x34
SIG_SIZE = 2 * EC_COORD_SIZE
_LAYOUT = struct.Struct("<16s32sIIII144s")


@dataclass(frozen=True)
class AttestationReport:
    mnonce: bytes
    launch_digest: bytes
    policy: int
    sig_usage: int = Usage.PEK
    sig_algo: int = Algorithm.ECDSA_SHA256
    reserved: int = 0
    signature: bytes = bytes(SIG_SIZE)  # r (72, LE) || s (72, LE)

    @classmethod
    def build(cls, mnonce: bytes, launch_digest: bytes, policy: int) -> AttestationReport:
        """An unsigned report for the platform side; sign() it with the PEK."""
        report = cls(bytes(mnonce), bytes(launch_digest), policy)
        report._checked_fields()
        return report

    @classmethod
    def parse(cls, data: bytes, what: str = "attestation report") -> AttestationReport:
        data = bytes(data)
        if len(data) != REPORT_SIZE:
            raise FormatError(f"{what}: {len(data)} bytes, a SEV attestation report is exactly {REPORT_SIZE}")
        return cls(*_LAYOUT.unpack(data))

    def to_bytes(self) -> bytes:
        try:
            return _LAYOUT.pack(self.mnonce, self.launch_digest, self.policy, self.sig_usage, self.sig_algo,
                                self.reserved, self.signature)
        except struct.error as exc:
            raise FormatError(f"attestation report: a field is out of range ({exc})") from exc

    def _checked_fields(self) -> None:
        if len(self.mnonce) != 16 or len(self.launch_digest) != 32 or len(self.signature) != SIG_SIZE:
            raise FormatError("attestation report: mnonce is 16 bytes, launch digest 32, signature 144")

    def sign(self, pek_private_key: ec.EllipticCurvePrivateKey) -> AttestationReport:
        """A copy signed by the PEK (usage PEK, ECDSA_SHA256)."""
        self._checked_fields()
        unsigned = replace(self, sig_usage=Usage.PEK, sig_algo=Algorithm.ECDSA_SHA256)
        der = pek_private_key.sign(unsigned.to_bytes()[:SIGNED_SIZE], ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return replace(unsigned, signature=r.to_bytes(EC_COORD_SIZE, "little") + s.to_bytes(EC_COORD_SIZE, "little"))

    def verify(self, pek_cert: SevCertificate) -> None:
        """Raise VerificationError unless the PEK in `pek_cert` signed this report."""
        self._checked_fields()
        if pek_cert.usage != Usage.PEK:
            raise VerificationError(f"attestation report: verifying key is a {pek_cert.usage.name}, expected the PEK")
        if self.sig_usage != Usage.PEK or self.sig_algo != Algorithm.ECDSA_SHA256:
            raise VerificationError(
                f"attestation report: signature usage/algo {self.sig_usage:#x}/{self.sig_algo:#x}, "
                "expected PEK (0x1002) / ECDSA_SHA256 (0x2)"
            )
        key = pek_cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise VerificationError("attestation report: the PEK certificate does not hold an EC key")
        r = int.from_bytes(self.signature[:EC_COORD_SIZE], "little")
        s = int.from_bytes(self.signature[EC_COORD_SIZE:], "little")
        try:
            key.verify(encode_dss_signature(r, s), self.to_bytes()[:SIGNED_SIZE], ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError) as exc:
            raise VerificationError(
                "attestation report: the PEK signature does not verify (altered report or another platform)"
            ) from exc
