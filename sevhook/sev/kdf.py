"""The SEV key-derivation function: NIST SP 800-108 counter mode with HMAC-SHA256, where the
counter and the output length are little-endian u32 (cryptography's KBKDFHMAC writes them
big-endian, so it does not match the firmware)."""

from __future__ import annotations

import hmac
import struct

_BLOCK_BITS = 256


def sev_kdf(key: bytes, label: bytes, context: bytes, bits: int) -> bytes:
    """K(i) = HMAC-SHA256(key, i_le32 || label || 0x00 || context || bits_le32); output truncated to bits/8."""
    if bits <= 0 or bits % 8:
        raise ValueError("the SEV KDF output length must be a positive multiple of 8 bits")
    suffix = label + b"\0" + context + struct.pack("<I", bits)
    blocks = [
        hmac.digest(key, struct.pack("<I", counter) + suffix, "sha256")
        for counter in range(1, (bits + _BLOCK_BITS - 1) // _BLOCK_BITS + 1)
    ]
    return b"".join(blocks)[: bits // 8]
