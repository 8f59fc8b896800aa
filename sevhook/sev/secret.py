"""LAUNCH_SECRET: the OVMF/EFI secret table, the 52-byte packet header, AES-128-CTR under the TEK
and the header MAC under the TIK over the ciphertext and the launch measurement.

Owner side: wrap_secret(); firmware side (software platform): unwrap_secret()."""

from __future__ import annotations

import hmac
import os
import struct
import uuid
from dataclasses import dataclass, field

from sevhook.errors import FormatError, VerificationError
from sevhook.sev.measurement import MEASUREMENT_SIZE, uses_versioned_form
from sevhook.sev.session import aes_ctr
from sevhook.sev.sizes import PACKET_HEADER_SIZE as HEADER_SIZE

SECRET_TABLE_GUID = uuid.UUID("1e74f542-71dd-4d66-963e-ef4287ff173b")
DISK_PASSPHRASE_GUID = uuid.UUID("736869e5-84f0-4973-92ec-06879ce3da0b")
IV_SIZE = 16
MAC_SIZE = 32
KEY_SIZE = 16
SECRET_CONTEXT = 0x01
FLAG_COMPRESSED = 0x1
TABLE_HEADER_SIZE = 20  # GUID + u32 total length
ENTRY_HEADER_SIZE = 20  # GUID + u32 entry length
SECRET_AREA_SIZE = 0xC00  # OVMF's secret page area
_HEADER = struct.Struct("<I16s32s")
_MAC_HEAD = struct.Struct("<BI16sII")


@dataclass(frozen=True)
class SecretTable:
    """The GUIDed table OVMF exposes to the guest: GUID, total length, entries GUID||len||data,
    zero-padded to a multiple of 16 (the length field holds the unpadded size)."""

    entries: tuple[tuple[uuid.UUID, bytes], ...] = field(repr=False)

    def build(self) -> bytes:
        body = b"".join(
            guid.bytes_le + struct.pack("<I", ENTRY_HEADER_SIZE + len(data)) + data for guid, data in self.entries
        )
        table = SECRET_TABLE_GUID.bytes_le + struct.pack("<I", TABLE_HEADER_SIZE + len(body)) + body
        return table + bytes(-len(table) % 16)

    to_bytes = build

    @classmethod
    def parse(cls, data: bytes, what: str = "secret table") -> SecretTable:
        """Parse a table; padding after the stated length is allowed, it must be all zero."""
        data = bytes(data)
        if len(data) < TABLE_HEADER_SIZE:
            raise FormatError(f"{what}: {len(data)} bytes, shorter than the 20-byte table header")
        if data[:16] != SECRET_TABLE_GUID.bytes_le:
            raise FormatError(f"{what}: does not start with the secret-table GUID {SECRET_TABLE_GUID}")
        total = struct.unpack_from("<I", data, 16)[0]
        if not TABLE_HEADER_SIZE <= total <= len(data):
            raise FormatError(f"{what}: total length {total} outside 20..{len(data)} (truncated or corrupt)")
        if any(data[total:]):
            raise FormatError(f"{what}: non-zero bytes after the table's stated length {total}")
        entries = []
        offset = TABLE_HEADER_SIZE
        while offset < total:
            if total - offset < ENTRY_HEADER_SIZE:
                raise FormatError(f"{what}: entry at offset {offset} is cut off by the table length {total}")
            guid = uuid.UUID(bytes_le=data[offset : offset + 16])
            length = struct.unpack_from("<I", data, offset + 16)[0]
            if not ENTRY_HEADER_SIZE <= length <= total - offset:
                raise FormatError(f"{what}: entry {guid} at offset {offset} has length {length}, out of range")
            entries.append((guid, data[offset + ENTRY_HEADER_SIZE : offset + length]))
            offset += length
        return cls(tuple(entries))


@dataclass(frozen=True)
class PacketHeader:
    """`sev_hdr_buf`: flags u32, IV (16), MAC (32) = 52 bytes."""

    flags: int
    iv: bytes
    mac: bytes

    @classmethod
    def parse(cls, data: bytes, what: str = "secret packet header") -> PacketHeader:
        data = bytes(data)
        if len(data) != HEADER_SIZE:
            raise FormatError(f"{what}: {len(data)} bytes, a LAUNCH_SECRET packet header is exactly {HEADER_SIZE}")
        flags, iv, mac = _HEADER.unpack(data)
        return cls(flags, iv, mac)

    def to_bytes(self) -> bytes:
        return _HEADER.pack(self.flags, self.iv, self.mac)


def _check_keys(tek: bytes, tik: bytes, measurement32: bytes) -> None:
    if len(tek) != KEY_SIZE or len(tik) != KEY_SIZE:
        raise FormatError("TEK and TIK are 16 bytes each")
    if len(measurement32) != MEASUREMENT_SIZE:
        raise FormatError(
            f"measurement: {len(measurement32)} bytes; pass the 32-byte measurement without the mnonce"
        )


def secret_mac(
    tik: bytes, flags: int, iv: bytes, ciphertext: bytes, measurement32: bytes,
    api_major: int | None, api_minor: int | None, guest_length: int | None = None,
) -> bytes:
    """HMAC-SHA256(TIK, 0x01 || flags || iv || guest_len || trans_len || ciphertext || measurement);
    the measurement is left out for API < 0.17. api_major None means the current (>= 0.17) form."""
    length = len(ciphertext)
    message = _MAC_HEAD.pack(SECRET_CONTEXT, flags, iv, length if guest_length is None else guest_length, length)
    message += ciphertext
    if api_major is None or uses_versioned_form(api_major, api_minor or 0):
        message += measurement32
    return hmac.digest(tik, message, "sha256")


def wrap_secret(
    tek: bytes,
    tik: bytes,
    measurement32: bytes,
    plaintext: bytes,
    iv: bytes | None = None,
    api_major: int | None = None,
    api_minor: int | None = None,
    flags: int = 0,
) -> tuple[PacketHeader, bytes]:
    """Encrypt `plaintext` (usually SecretTable.build()) for LAUNCH_SECRET; a random IV unless given.
    api_major/api_minor None select the API >= 0.17 form."""
    _check_keys(tek, tik, measurement32)
    iv = os.urandom(IV_SIZE) if iv is None else bytes(iv)
    if len(iv) != IV_SIZE:
        raise FormatError(f"IV: {len(iv)} bytes, expected {IV_SIZE}")
    ciphertext = aes_ctr(tek, iv, bytes(plaintext))
    mac = secret_mac(tik, flags, iv, ciphertext, measurement32, api_major, api_minor)
    return PacketHeader(flags, iv, mac), ciphertext


def unwrap_secret(
    tek: bytes,
    tik: bytes,
    measurement32: bytes,
    header_bytes: bytes,
    ciphertext: bytes,
    api_major: int | None = None,
    api_minor: int | None = None,
    guest_length: int | None = None,
) -> bytes:
    """Firmware side: check the header MAC (VerificationError on mismatch), then decrypt."""
    _check_keys(tek, tik, measurement32)
    header = PacketHeader.parse(header_bytes)
    if header.flags & FLAG_COMPRESSED:
        raise VerificationError("secret packet header: COMPRESSED flag set; compressed secrets are not supported")
    expected = secret_mac(tik, header.flags, header.iv, bytes(ciphertext), measurement32, api_major, api_minor,
                          guest_length)
    if not hmac.compare_digest(expected, header.mac):
        raise VerificationError(
            "secret packet MAC mismatch: wrong TIK, different launch measurement, or altered header/ciphertext"
        )
    return aes_ctr(tek, header.iv, bytes(ciphertext))
