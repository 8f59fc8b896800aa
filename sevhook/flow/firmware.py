"""A small firmware image for the demo: not a bootable OVMF (it halts at once), but one whose tail
carries a valid OVMF footer GUID table (secret area, kernel-hashes area, SEV-ES reset block), so that
the launch digest,
the stand-in's LAUNCH_UPDATE_DATA and sev-inject-launch-secret (which finds the secret area through
the table) all behave as they do with an AmdSev OVMF build. The layout is the one
sevhook.sev.ovmf.OvmfFooter reads; the body is deterministic, so its launch digest is stable."""

from __future__ import annotations

import hashlib
import struct
import uuid

from sevhook.errors import UsageError
from sevhook.sev.ovmf import FOOTER_GUID, HASH_TABLE_GUID, RESET_BLOCK_GUID, SECRET_AREA_GUID
from sevhook.sev.secret import SECRET_AREA_SIZE

DEFAULT_SIZE = 128 * 1024
# Guest addresses below 128 MiB, so the areas lie in the RAM of a small (-m 128) guest.
SECRET_AREA_BASE = 0x80B000
HASH_TABLE_BASE = 0x80C000
HASH_TABLE_SIZE = 0x400
RESET_EIP = 0xFFFFF000
_ENTRY_TRAILER = struct.Struct("<H16s")  # u16 length (data + 18), GUID
FOOTER_END_GAP = 32  # the table ends 32 bytes before the end of the image
# The last 16 bytes hold the x86 reset vector (0xfffffff0): `cli; hlt; jmp $-3`, so a CPU that runs
# the image (real QEMU under the stand-in) idles instead of executing noise.
RESET_VECTOR = bytes.fromhex("faf4ebfd").ljust(16, b"\x90")


def _entry(guid: uuid.UUID, data: bytes) -> bytes:
    return data + _ENTRY_TRAILER.pack(len(data) + _ENTRY_TRAILER.size, guid.bytes_le)


def footer_table() -> bytes:
    """The GUID table and its footer entry, as the image's tail holds them (without the end gap)."""
    entries = b"".join((
        _entry(HASH_TABLE_GUID, struct.pack("<II", HASH_TABLE_BASE, HASH_TABLE_SIZE)),
        _entry(SECRET_AREA_GUID, struct.pack("<II", SECRET_AREA_BASE, SECRET_AREA_SIZE)),
        _entry(RESET_BLOCK_GUID, struct.pack("<I", RESET_EIP)),
    ))
    return entries + _ENTRY_TRAILER.pack(len(entries) + _ENTRY_TRAILER.size, FOOTER_GUID.bytes_le)


def demo_firmware(size: int = DEFAULT_SIZE, seed: bytes = b"sevhook demo firmware") -> bytes:
    """A `size`-byte image: a deterministic pseudo-random body, then the footer table and the gap."""
    table = footer_table()
    body_size = size - len(table) - FOOTER_END_GAP
    if size % 4096 or body_size < 0:
        raise UsageError(f"firmware size {size}: use a multiple of 4096 bytes (flash images are page-sized)")
    blocks = (hashlib.sha256(seed + counter.to_bytes(4, "little")).digest()
              for counter in range(-(-body_size // 32)))
    body = b"".join(blocks)[:body_size]
    return body + table + b"\xff" * (FOOTER_END_GAP - len(RESET_VECTOR)) + RESET_VECTOR


def tampered(image: bytes, offset: int = 0x100) -> bytes:
    """The same image with one bit flipped in its body, as a modified firmware would differ."""
    if not 0 <= offset < len(image):
        raise UsageError(f"offset {offset:#x} is outside the {len(image)}-byte image")
    changed = bytearray(image)
    changed[offset] ^= 0x01
    return bytes(changed)
