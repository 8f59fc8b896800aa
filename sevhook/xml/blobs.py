"""Strict base64 for the blobs of <launchSecurity>, and the GODH certificate check of <dhCert>.

libvirt hands these texts to QEMU verbatim and QEMU's decoder silently skips characters it does not
know, so a pasted blob with a typo becomes a launch that fails far away with a firmware error. Here a
blob must be exact base64 (whitespace between characters allowed, as when the XML wraps long lines)."""

from __future__ import annotations

from sevhook.encoding import decode_base64
from sevhook.errors import FormatError
from sevhook.sev.sizes import SEV_CERT_SIZE

__all__ = ["SESSION_SIZE", "SEV_CERT_SIZE", "check_godh_certificate", "decode_base64"]

SESSION_SIZE = 128
USAGE_PDH = 0x1003
ECDH_ALGORITHMS = {0x0003: "ECDH_SHA256", 0x0103: "ECDH_SHA384"}
CURVE_P384 = 2


def check_godh_certificate(data: bytes, *, decode: bool = True) -> str | None:
    """None when `data` is a guest owner's Diffie-Hellman certificate as LAUNCH_START needs it
    (2084-byte SEV certificate, usage PDH, ECDH key on P-384); otherwise what is wrong. With
    decode=False only its size and version are checked, without importing cryptography: for callers
    that know the firmware has already accepted the certificate."""
    if len(data) != SEV_CERT_SIZE:
        return f"decodes to {len(data)} bytes, a SEV certificate is exactly {SEV_CERT_SIZE}"
    version = int.from_bytes(data[:4], "little")
    if version != 1:
        return f"has version {version}; SEV certificates are version 1"
    if not decode:
        return None
    from sevhook.sev.certs import SevCertificate  # noqa: PLC0415  (cryptography: off the hook's hot path)

    try:
        cert = SevCertificate.parse(data)
    except FormatError as exc:
        return f"is not a SEV certificate ({exc.message})"
    if int(cert.usage) != USAGE_PDH:
        return (
            f"has key usage {int(cert.usage):#06x} ({cert.usage.name}); the guest owner's DH certificate "
            f"has usage PDH ({USAGE_PDH:#06x})"
        )
    if int(cert.algorithm) not in ECDH_ALGORITHMS:
        return (
            f"has key algorithm {int(cert.algorithm):#x} ({cert.algorithm.name}); it must be ECDH_SHA256 (0x3) "
            "or ECDH_SHA384 (0x103)"
        )
    curve = int.from_bytes(cert.to_bytes()[0x10:0x14], "little")
    if curve != CURVE_P384:
        return f"has curve {curve}; the key must be on P-384 (curve 2)"
    try:
        cert.public_key()
    except FormatError:
        return "holds a public key that is not a point on P-384"
    return None
