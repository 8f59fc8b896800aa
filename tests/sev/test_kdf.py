"""The hand-written SEV KDF: the virtee known answer, the little-endian counter/length layout, and
proof that the big-endian SP800-108 of `cryptography` does not match."""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFHMAC, CounterLocation, Mode

from sevhook.sev.kdf import sev_kdf


def test_known_answer_master_secret() -> None:
    assert sev_kdf(bytes(16), b"sev-master-secret", bytes(16), 128).hex() == "ab4d269fcc62bedb4511d56c386ce706"


def test_message_layout_little_endian() -> None:
    key, label, context = b"k" * 48, b"sev-kek", b""
    expected = hmac.new(key, struct.pack("<I", 1) + label + b"\0" + context + struct.pack("<I", 128),
                        hashlib.sha256).digest()[:16]
    assert sev_kdf(key, label, context, 128) == expected


def test_multi_block_output() -> None:
    key, label, context = b"z" * 16, b"label", b"ctx"
    out = sev_kdf(key, label, context, 384)
    blocks = [hmac.new(key, struct.pack("<I", i) + label + b"\0" + context + struct.pack("<I", 384),
                       hashlib.sha256).digest() for i in (1, 2)]
    assert len(out) == 48 and out == (blocks[0] + blocks[1])[:48]


def test_cryptography_big_endian_kdf_differs() -> None:
    kdf = KBKDFHMAC(hashes.SHA256(), Mode.CounterMode, 16, 4, 4, CounterLocation.BeforeFixed,
                    b"sev-master-secret", bytes(16), None)
    assert kdf.derive(bytes(16)) != sev_kdf(bytes(16), b"sev-master-secret", bytes(16), 128)


@pytest.mark.parametrize("bits", [0, -8, 12])
def test_invalid_lengths(bits: int) -> None:
    with pytest.raises(ValueError):
        sev_kdf(bytes(16), b"x", b"", bits)
