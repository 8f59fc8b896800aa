"""The OVMF footer GUID table: where the firmware tells QEMU about its SEV areas.

The table sits at the end of the flash image, ending 32 bytes before the end: the footer entry
`u16 total_size ‖ GUID 96b582de-…` at `size - 50`, and before it entries laid out as `data ‖ u16 len ‖ GUID`
(len = data + 18), walked backwards. The entries this project uses give the kernel-hashes table area, the
launch-secret area, the SEV-ES AP reset address and the offset of the SNP metadata ("ASEV" header and
`{u32 gpa, u32 size, u32 type}` sections). Only the tail of a (possibly large) image is read."""

from __future__ import annotations

import enum
import struct
import uuid
from dataclasses import dataclass, field

from sevhook.errors import FormatError, SevhookError
from sevhook.sev.inputs import BinaryInput, input_name, open_input

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing, a cost every command start would pay
if TYPE_CHECKING:
    from typing import BinaryIO

FOOTER_GUID = uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d")
HASH_TABLE_GUID = uuid.UUID("7255371f-3a3b-4b04-927b-1da6efa8d454")
SECRET_AREA_GUID = uuid.UUID("4c2eb361-7d9b-4cc3-8081-127c90d3d294")
RESET_BLOCK_GUID = uuid.UUID("00f771de-1a7e-4fcb-890e-68c77e2fb44e")
SNP_METADATA_GUID = uuid.UUID("dc886566-984a-4798-a75e-5585a7bf67cc")

FOUR_GIB = 1 << 32
_ENTRY_HEADER = struct.Struct("<H16s")  # u16 length, GUID
_FOOTER_END_GAP = 32  # the table ends this many bytes before the end of the image
_TAIL_SIZE = 0xFFFF + _ENTRY_HEADER.size + _FOOTER_END_GAP  # the largest table a u16 length can describe
_METADATA_HEADER = struct.Struct("<4sIII")  # "ASEV", size, version, item count
_METADATA_ITEM = struct.Struct("<III")  # gpa, size, type


class FirmwareCapabilityError(SevhookError):
    """The firmware image cannot do what the launch asks (e.g. kernel hashes without a hash-table area)."""


class SnpSectionType(enum.IntEnum):
    """OVMF SEV metadata section types (edk2 OvmfSevMetadata.asm)."""

    SNP_SEC_MEM = 1
    SNP_SECRETS = 2
    CPUID = 3
    SVSM_CAA = 4
    SNP_KERNEL_HASHES = 0x10


@dataclass(frozen=True)
class GuestRegion:
    """A guest-physical area the firmware reserves."""

    base: int
    size: int


@dataclass(frozen=True)
class SnpMetadataSection:
    """One `{gpa, size, type}` item of the SNP metadata; `kind` stays an int so unknown types reach SNP
    measurement (which rejects them) without breaking SEV use of the same image."""

    gpa: int
    size: int
    kind: int

    def describe(self) -> str:
        try:
            name = SnpSectionType(self.kind).name
        except ValueError:
            name = f"unknown type {self.kind:#x}"
        return f"{name} at {self.gpa:#x}, {self.size:#x} bytes"


@dataclass(frozen=True)
class OvmfFooter:
    """What the footer table of one firmware image says."""

    name: str
    firmware_size: int
    entries: dict[uuid.UUID, bytes] = field(default_factory=dict)
    snp_sections: tuple[SnpMetadataSection, ...] = ()

    @classmethod
    def read(cls, firmware: BinaryInput) -> OvmfFooter:
        """Parse the footer of a firmware file (or bytes), reading only its last ~64 KiB (and the SNP
        metadata wherever it is)."""
        name = input_name(firmware, "firmware")
        with open_input(firmware, "firmware") as (stream, size):
            if size == 0:
                raise FormatError(f"{name} is empty: give the OVMF flash image QEMU loads "
                                  "(e.g. /usr/share/OVMF/OVMF.amdsev.fd, libvirt's <loader>)")
            tail_start = max(0, size - _TAIL_SIZE)
            tail = _read_at(stream, tail_start, size - tail_start, name)
            entries = _parse_table(tail, name)
            sections: tuple[SnpMetadataSection, ...] = ()
            if SNP_METADATA_GUID in entries:
                offset_from_end = _u32(entries[SNP_METADATA_GUID], 0, name, "SNP metadata offset")
                sections = _parse_metadata(stream, size, offset_from_end, name)
        return cls(name, size, entries, sections)

    @property
    def gpa(self) -> int:
        """QEMU maps the flash image so that it ends at 4 GiB."""
        return FOUR_GIB - self.firmware_size

    @property
    def hash_table(self) -> GuestRegion | None:
        """Where QEMU writes the kernel-hashes table, or None when the build has no such area (base 0)."""
        region = self._region(HASH_TABLE_GUID, "kernel-hashes table area")
        return region if region and region.base else None

    @property
    def secret_area(self) -> GuestRegion | None:
        region = self.secret_area_entry
        return region if region and region.base else None

    @property
    def secret_area_entry(self) -> GuestRegion | None:
        """The footer's secret-area entry as written (QEMU injects at its base whatever the size), or None."""
        return self._region(SECRET_AREA_GUID, "launch secret area")

    @property
    def reset_eip(self) -> int | None:
        """The SEV-ES AP reset address (CS base = eip & 0xffff0000, IP = eip & 0xffff), None when absent/0."""
        data = self.entries.get(RESET_BLOCK_GUID)
        if data is None:
            return None
        return _u32(data, 0, self.name, "SEV-ES reset block") or None

    def warnings(self) -> list[str]:
        """What a launch digest of this image should come with: an image without the footer table (SeaBIOS,
        a random file, a non-SEV OVMF) is still measured by QEMU, but is almost certainly not what was meant."""
        if self.entries:
            return []
        return [f"{self.name} has no OVMF footer GUID table, so it is not an SEV-capable OVMF build (no launch "
                "secret area, kernel hashes or SEV-ES): QEMU would measure it as given, but check that it is the "
                "firmware the guest boots"]

    def require_hash_table(self) -> GuestRegion:
        region = self.hash_table
        if region is None:
            raise FirmwareCapabilityError(
                f"{self.name} has no kernel-hashes table area (footer GUID {HASH_TABLE_GUID}), so QEMU cannot "
                "measure -kernel/-initrd/-append with it: use an AmdSev OVMF build (OvmfPkg/AmdSev/AmdSevX64.dsc) "
                "or drop --kernel/--initrd/--cmdline"
            )
        return region

    def require_reset_eip(self) -> int:
        eip = self.reset_eip
        if eip is None:
            raise FirmwareCapabilityError(
                f"{self.name} has no SEV-ES reset block (footer GUID {RESET_BLOCK_GUID}), so it cannot start "
                "SEV-ES or SNP guests: use an OVMF build with SEV-ES support, or --mode sev"
            )
        return eip

    def require_snp_sections(self) -> tuple[SnpMetadataSection, ...]:
        if not self.snp_sections:
            raise FirmwareCapabilityError(
                f"{self.name} has no SNP metadata (footer GUID {SNP_METADATA_GUID}), so it cannot start SNP "
                "guests: use an OVMF build with SEV-SNP support (edk2-stable202205 or later)"
            )
        return self.snp_sections

    def describe(self) -> list[str]:
        """One line per fact, for --explain."""
        lines = [f"{self.name}: {self.firmware_size} bytes, mapped at {self.gpa:#x}"]
        for label, region in (("kernel-hashes table", self.hash_table), ("secret area", self.secret_area)):
            lines.append(f"  {label}: " + (f"{region.base:#x}, {region.size:#x} bytes" if region else "none"))
        eip = self.reset_eip
        lines.append("  SEV-ES reset address: " + (f"{eip:#x}" if eip is not None else "none"))
        lines.extend(f"  SNP section: {section.describe()}" for section in self.snp_sections)
        return lines

    def _region(self, guid: uuid.UUID, what: str) -> GuestRegion | None:
        data = self.entries.get(guid)
        if data is None:
            return None
        return GuestRegion(_u32(data, 0, self.name, what), _u32(data, 4, self.name, what))


def _u32(data: bytes, offset: int, name: str, what: str) -> int:
    if len(data) < offset + 4:
        raise FormatError(f"{name}: the footer entry for the {what} is too short ({len(data)} bytes)")
    return int.from_bytes(data[offset : offset + 4], "little")


def _read_at(stream: BinaryIO, offset: int, length: int, name: str) -> bytes:
    try:
        stream.seek(offset)
        data = stream.read(length)
    except OSError as exc:
        raise FormatError(f"reading {name} failed: {exc.strerror or exc}") from exc
    if len(data) != length:
        raise FormatError(f"{name} changed while being read (short read at offset {offset:#x})")
    return data


def _parse_table(tail: bytes, name: str) -> dict[uuid.UUID, bytes]:
    """The GUID entries, keyed by GUID; the last entry (nearest the footer) wins, as QEMU's lookup does.
    An image without the footer GUID simply has no table (plain SEV needs none)."""
    footer_at = len(tail) - _FOOTER_END_GAP - _ENTRY_HEADER.size
    if footer_at < 0:
        return {}
    total, guid = _ENTRY_HEADER.unpack_from(tail, footer_at)
    if guid != FOOTER_GUID.bytes_le:
        return {}
    table_size = total - _ENTRY_HEADER.size
    if table_size < 0 or table_size > footer_at:
        raise FormatError(f"{name}: the OVMF footer table claims {total} bytes, which do not fit the image")
    end = footer_at
    start = footer_at - table_size
    entries: dict[uuid.UUID, bytes] = {}
    while end - start >= _ENTRY_HEADER.size:
        length, guid = _ENTRY_HEADER.unpack_from(tail, end - _ENTRY_HEADER.size)
        if length < _ENTRY_HEADER.size or length > end - start:
            raise FormatError(
                f"{name}: OVMF footer entry {uuid.UUID(bytes_le=guid)} has length {length}, outside 18..{end - start}"
            )
        entries.setdefault(uuid.UUID(bytes_le=guid), tail[end - length : end - _ENTRY_HEADER.size])
        end -= length
    return entries


def _parse_metadata(stream: BinaryIO, size: int, offset_from_end: int, name: str) -> tuple[SnpMetadataSection, ...]:
    start = size - offset_from_end
    if offset_from_end < _METADATA_HEADER.size or start < 0:
        raise FormatError(f"{name}: the SNP metadata offset {offset_from_end:#x} points outside the image")
    signature, length, version, count = _METADATA_HEADER.unpack(_read_at(stream, start, _METADATA_HEADER.size, name))
    if signature != b"ASEV":
        raise FormatError(f"{name}: the SNP metadata at offset {start:#x} does not start with 'ASEV'")
    if version != 1:
        raise FormatError(f"{name}: SNP metadata version {version} is not supported (only 1)")
    needed = _METADATA_HEADER.size + count * _METADATA_ITEM.size
    if length < needed or start + needed > size:
        raise FormatError(f"{name}: the SNP metadata claims {count} sections, which do not fit its {length} bytes")
    items = _read_at(stream, start + _METADATA_HEADER.size, count * _METADATA_ITEM.size, name)
    return tuple(SnpMetadataSection(*fields) for fields in _METADATA_ITEM.iter_unpack(items))
