"""LAUNCH_SECRET: the sevctl known answer, the EFI secret table, the 52-byte header, the older MAC,
and the firmware side refusing any altered header, ciphertext, key or measurement."""

from __future__ import annotations

import base64
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sevhook.errors import FormatError, SevhookError, VerificationError
from sevhook.sev.secret import (
    DISK_PASSPHRASE_GUID,
    HEADER_SIZE,
    SECRET_TABLE_GUID,
    PacketHeader,
    SecretTable,
    unwrap_secret,
    wrap_secret,
)

MEASUREMENT_BLOB = "TLeA7607lZQntLjRY1/i+sbtdSZ+75zxpz4Px9hzpBLwItF5Q2o4prA++3ZZv9ZS"
IV = "rFR07U3TLH2YnsUj2SVZ7A=="
HEADER = "AAAAAKxUdO1N0yx9mJ7FI9klWey8FSzeYQ4X8K71VzNKLU/KQsIsQxLjtbhaPUewqshX5Q=="
PAYLOAD = "0U3e5PcXv0UW+H4tSBFKOdCYfKE1+j38Bc2fuO16mYiyI+sWx7INfn+lgYj56GL12yyinDa+lVfCCwD/2w5cPA=="
TEK, TIK = bytes(range(16)), bytes(range(16, 32))
MEASUREMENT = bytes(range(32))


@pytest.fixture(scope="module")
def sevctl(vectors: Path) -> dict[str, bytes]:
    base = vectors / "sevctl"
    return {name: (base / f"secret_{name}").read_bytes()
            for name in ("tek1.bin", "tik1.bin", "secret1.txt", "secret2.txt")}


def test_sevctl_known_answer(sevctl) -> None:
    table = SecretTable(((DISK_PASSPHRASE_GUID, sevctl["secret1.txt"]),)).build()
    measurement = base64.b64decode(MEASUREMENT_BLOB)[:32]
    header, ciphertext = wrap_secret(sevctl["tek1.bin"], sevctl["tik1.bin"], measurement, table,
                                     iv=base64.b64decode(IV))
    assert base64.b64encode(header.to_bytes()).decode() == HEADER
    assert base64.b64encode(ciphertext).decode() == PAYLOAD
    plain = unwrap_secret(sevctl["tek1.bin"], sevctl["tik1.bin"], measurement, base64.b64decode(HEADER),
                          base64.b64decode(PAYLOAD))
    assert SecretTable.parse(plain).entries == ((DISK_PASSPHRASE_GUID, b"MY-LUKS-PASSPHRASE"),)


def test_table_layout(sevctl) -> None:
    other = uuid.UUID("e6f5a162-d67f-4750-a67c-5d065f2a9910")
    table = SecretTable(((DISK_PASSPHRASE_GUID, sevctl["secret1.txt"]), (other, sevctl["secret2.txt"])))
    raw = table.build()
    assert raw[:16] == SECRET_TABLE_GUID.bytes_le
    assert int.from_bytes(raw[16:20], "little") == 20 + (20 + 18) + (20 + 17)
    assert raw[20:36] == bytes.fromhex("e5696873f084734992ec06879ce3da0b")
    assert int.from_bytes(raw[36:40], "little") == 38
    assert len(raw) % 16 == 0 and not any(raw[20 + 38 + 37 :])
    assert SecretTable.parse(raw) == table


def test_parse_accepts_extra_zero_padding() -> None:
    """libvirt's validate tool pads an aligned table by another 16 zero bytes."""
    raw = SecretTable(((DISK_PASSPHRASE_GUID, b"x" * 4),)).build()
    assert len(raw) == 48
    assert SecretTable.parse(raw + bytes(16)).entries == ((DISK_PASSPHRASE_GUID, b"xxxx"),)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda raw: raw[:10], "shorter than"),
        (lambda raw: b"\0" * 16 + raw[16:], "secret-table GUID"),
        (lambda raw: raw[:16] + (999).to_bytes(4, "little") + raw[20:], "total length 999"),
        (lambda raw: raw[:-1] + b"\x01", "non-zero bytes after"),
        (lambda raw: raw[:36] + (5).to_bytes(4, "little") + raw[40:], "has length 5"),
    ],
)
def test_bad_tables(mutate, message: str) -> None:
    raw = SecretTable(((DISK_PASSPHRASE_GUID, b"secret"),)).build()
    with pytest.raises(FormatError, match=message):
        SecretTable.parse(mutate(raw))


def test_header_layout() -> None:
    header = PacketHeader(0, bytes(range(16)), bytes(range(32)))
    raw = header.to_bytes()
    assert len(raw) == HEADER_SIZE and raw[4:20] == bytes(range(16)) and PacketHeader.parse(raw) == header
    with pytest.raises(FormatError, match="exactly 52"):
        PacketHeader.parse(raw[:-1])


def test_every_header_and_ciphertext_byte_is_protected() -> None:
    header, ciphertext = wrap_secret(TEK, TIK, MEASUREMENT, b"p" * 64)
    raw = header.to_bytes()
    for index in range(HEADER_SIZE):
        altered = raw[:index] + bytes([raw[index] ^ 0x01]) + raw[index + 1 :]
        with pytest.raises(VerificationError):
            unwrap_secret(TEK, TIK, MEASUREMENT, altered, ciphertext)
    for index in range(len(ciphertext)):
        altered = ciphertext[:index] + bytes([ciphertext[index] ^ 0x01]) + ciphertext[index + 1 :]
        with pytest.raises(VerificationError):
            unwrap_secret(TEK, TIK, MEASUREMENT, raw, altered)


def test_wrong_measurement_or_keys_are_refused() -> None:
    header, ciphertext = wrap_secret(TEK, TIK, MEASUREMENT, b"data")
    for tik, measurement in ((bytes(16), MEASUREMENT), (TIK, bytes(32))):
        with pytest.raises(VerificationError, match="MAC mismatch"):
            unwrap_secret(TEK, tik, measurement, header.to_bytes(), ciphertext)
    # a wrong TEK passes the MAC (it covers the ciphertext) but yields other plaintext
    assert unwrap_secret(bytes(16), TIK, MEASUREMENT, header.to_bytes(), ciphertext) != b"data"


def test_older_api_leaves_the_measurement_out() -> None:
    iv = bytes(16)
    old_header, ciphertext = wrap_secret(TEK, TIK, MEASUREMENT, b"data", iv=iv, api_major=0, api_minor=16)
    new_header, _ = wrap_secret(TEK, TIK, MEASUREMENT, b"data", iv=iv, api_major=0, api_minor=17)
    assert old_header.mac != new_header.mac
    assert new_header == wrap_secret(TEK, TIK, MEASUREMENT, b"data", iv=iv)[0]
    # before 0.17 any measurement gives the same MAC
    assert unwrap_secret(TEK, TIK, bytes(32), old_header.to_bytes(), ciphertext, 0, 16) == b"data"
    with pytest.raises(VerificationError):
        unwrap_secret(TEK, TIK, MEASUREMENT, old_header.to_bytes(), ciphertext, 0, 17)


def test_random_iv_and_argument_checks() -> None:
    first, second = wrap_secret(TEK, TIK, MEASUREMENT, b"x")[0], wrap_secret(TEK, TIK, MEASUREMENT, b"x")[0]
    assert first.iv != second.iv
    with pytest.raises(FormatError, match="without the mnonce"):
        wrap_secret(TEK, TIK, bytes(48), b"x")
    with pytest.raises(FormatError, match="IV"):
        wrap_secret(TEK, TIK, MEASUREMENT, b"x", iv=bytes(8))
    with pytest.raises(FormatError, match="16 bytes"):
        wrap_secret(bytes(15), TIK, MEASUREMENT, b"x")


def test_compressed_flag_is_refused() -> None:
    header, ciphertext = wrap_secret(TEK, TIK, MEASUREMENT, b"x", flags=1)
    with pytest.raises(VerificationError, match="COMPRESSED"):
        unwrap_secret(TEK, TIK, MEASUREMENT, header.to_bytes(), ciphertext)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=200),
                 st.binary(max_size=120).map(lambda b: SECRET_TABLE_GUID.bytes_le + b)))
def test_fuzz_table_and_header_parse(data: bytes) -> None:
    for parser in (SecretTable.parse, PacketHeader.parse):
        try:
            parser(data)
        except SevhookError:
            pass


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=80), st.binary(max_size=100))
def test_fuzz_unwrap_rejects_garbage(header: bytes, ciphertext: bytes) -> None:
    with pytest.raises(SevhookError):
        unwrap_secret(TEK, TIK, MEASUREMENT, header, ciphertext)
