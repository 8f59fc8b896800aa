"""OVMF footer parsing on synthetic images (every entry layout, errors for what a firmware cannot do) and
hypothesis fuzzing of the digest area's parsers: nothing but SevhookError may escape."""

from __future__ import annotations

import struct
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sevhook.errors import FormatError, SevhookError, UsageError
from sevhook.sev.diagnose import diagnose_mismatch
from sevhook.sev.kernel_hashes import KernelHashes
from sevhook.sev.launch_digest import measure_sev, sev_launch_digest, seves_launch_digest
from sevhook.sev.measurement import LaunchMeasurement
from sevhook.sev.ovmf import (
    FOOTER_GUID,
    HASH_TABLE_GUID,
    RESET_BLOCK_GUID,
    SECRET_AREA_GUID,
    SNP_METADATA_GUID,
    FirmwareCapabilityError,
    GuestRegion,
    OvmfFooter,
)
from sevhook.sev.snp import snp_launch_digest
from sevhook.sev.vmsa import Vmsa

MILAN = 0x00A00F11


def build_image(entries: list[tuple[uuid.UUID, bytes]], size: int = 8192, body: bytes = b"",
                metadata: bytes | None = None) -> bytes:
    """A firmware image whose last bytes hold a footer table with `entries` (first = farthest from the footer);
    `metadata` is placed at the start of the image and an SNP metadata entry pointing at it is added."""
    if metadata is not None:
        entries = [*entries, (SNP_METADATA_GUID, struct.pack("<I", size))]
    table = b"".join(data + struct.pack("<H", len(data) + 18) + guid.bytes_le for guid, data in entries)
    footer = table + struct.pack("<H", len(table) + 18) + FOOTER_GUID.bytes_le
    head = (metadata or b"") + body
    image = head + bytes(size - len(head) - len(footer) - 32) + footer + bytes(32)
    assert len(image) == size
    return image


def asev(sections: list[tuple[int, int, int]], version: int = 1, signature: bytes = b"ASEV") -> bytes:
    return struct.pack("<4sIII", signature, 16 + 12 * len(sections), version, len(sections)) + b"".join(
        struct.pack("<III", *section) for section in sections)


def test_entries_and_regions() -> None:
    image = build_image([
        (HASH_TABLE_GUID, struct.pack("<II", 0x80CC00, 0x400)),
        (SECRET_AREA_GUID, struct.pack("<II", 0x80C000, 0xC00)),
        (RESET_BLOCK_GUID, struct.pack("<I", 0x80B004)),
    ])
    footer = OvmfFooter.read(image)
    assert footer.hash_table == GuestRegion(0x80CC00, 0x400)
    assert footer.secret_area == GuestRegion(0x80C000, 0xC00)
    assert footer.reset_eip == 0x80B004
    assert footer.gpa == (1 << 32) - 8192
    assert len(footer.describe()) == 4


def test_entry_nearest_the_footer_wins() -> None:
    image = build_image([(RESET_BLOCK_GUID, struct.pack("<I", 1)), (RESET_BLOCK_GUID, struct.pack("<I", 2))])
    assert OvmfFooter.read(image).reset_eip == 2


def test_large_image_reads_only_the_tail(tmp_path: Path) -> None:
    path = tmp_path / "big.fd"
    tail = build_image([(RESET_BLOCK_GUID, struct.pack("<I", 0x80B004))], size=4096)
    with path.open("wb") as out:
        out.truncate(1 << 30)  # sparse 1 GiB
        out.seek((1 << 30) - 4096)
        out.write(tail)
    assert OvmfFooter.read(path).reset_eip == 0x80B004


def test_no_footer_is_fine_for_plain_sev_only() -> None:
    image = bytes(range(256)) * 16
    assert OvmfFooter.read(image).entries == {}
    assert len(sev_launch_digest(image)) == 32
    with pytest.raises(FirmwareCapabilityError, match="no SEV-ES reset block"):
        seves_launch_digest(image, 1, MILAN)
    with pytest.raises(FirmwareCapabilityError, match="no kernel-hashes table area"):
        sev_launch_digest(image, kernel=b"kernel")
    with pytest.raises(FirmwareCapabilityError, match="no SNP metadata"):
        snp_launch_digest(image, 1, MILAN)


def test_zero_reset_address_counts_as_missing() -> None:
    image = build_image([(RESET_BLOCK_GUID, bytes(4))])
    with pytest.raises(FirmwareCapabilityError, match="reset block"):
        seves_launch_digest(image, 2, MILAN)


def test_hash_area_too_small() -> None:
    image = build_image([(HASH_TABLE_GUID, struct.pack("<II", 0x80CC00, 100))])
    with pytest.raises(FirmwareCapabilityError, match="smaller than the 176-byte table"):
        sev_launch_digest(image, kernel=b"k")


def test_initrd_without_kernel_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="needs a kernel"):
        sev_launch_digest(b"x" * 4096, initrd=b"i")


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"cannot read kernel file .*nope"):
        sev_launch_digest(build_image([(HASH_TABLE_GUID, struct.pack("<II", 0x1000, 0x400))]),
                          kernel=tmp_path / "nope")


def test_error_in_the_concurrent_hash_reaches_the_caller(tmp_path: Path) -> None:
    image = build_image([(HASH_TABLE_GUID, struct.pack("<II", 0x1000, 0x400))])
    with pytest.raises(UsageError, match=r"cannot read initrd file .*missing-initrd"):
        sev_launch_digest(image, kernel=b"kernel", initrd=tmp_path / "missing-initrd")
    with pytest.raises(UsageError, match=r"cannot read kernel file .*missing-kernel"):
        sev_launch_digest(image, kernel=tmp_path / "missing-kernel", initrd=b"initrd")


def test_snp_metadata_errors() -> None:
    reset = (RESET_BLOCK_GUID, struct.pack("<I", 0x80B004))
    good = build_image([reset], metadata=asev([(0x800000, 0x1000, 1), (0x801000, 0x1000, 2)]))
    assert len(OvmfFooter.read(good).snp_sections) == 2
    assert len(snp_launch_digest(good, 2, MILAN)) == 48
    with pytest.raises(FormatError, match="ASEV"):
        OvmfFooter.read(build_image([reset], metadata=asev([], signature=b"XXXX")))
    with pytest.raises(FormatError, match="version 2"):
        OvmfFooter.read(build_image([reset], metadata=asev([], version=2)))
    unknown = build_image([reset], metadata=asev([(0x800000, 0x1000, 0x77)]))
    assert OvmfFooter.read(unknown).snp_sections[0].kind == 0x77  # SEV use of the image still works
    with pytest.raises(FormatError, match="type 0x77 is unknown"):
        snp_launch_digest(unknown, 1, MILAN)
    unaligned = build_image([reset], metadata=asev([(0x800000, 0x800, 1)]))
    with pytest.raises(FormatError, match="not page-aligned"):
        snp_launch_digest(unaligned, 1, MILAN)
    with pytest.raises(FirmwareCapabilityError, match="no SNP kernel-hashes section"):
        snp_launch_digest(good, 1, MILAN, kernel=b"k")
    with pytest.raises(FormatError, match="whole number of 4 KiB pages"):
        snp_launch_digest(b"x" + good, 1, MILAN)


def test_kernel_hashes_parse_rejects_bad_tables() -> None:
    table = KernelHashes(bytes(32), bytes(32), bytes(32)).to_bytes()
    for bad in (table[:100], table[:16] + b"\x00\x01" + table[18:], table[:170] + b"\x01" + table[171:]):
        with pytest.raises(FormatError):
            KernelHashes.parse(bad)


def test_vmsa_parse_rejects_foreign_pages() -> None:
    page = bytearray(Vmsa(0xFFFFFFF0, MILAN).to_bytes())
    page[0x500] = 1
    with pytest.raises(FormatError, match="byte 0x500"):
        Vmsa.parse(bytes(page))
    with pytest.raises(FormatError, match="4096 bytes"):
        Vmsa.parse(bytes(100))


def test_empty_firmware_is_refused_and_a_footerless_one_warned_about(tmp_path: Path) -> None:
    (tmp_path / "empty.fd").write_bytes(b"")
    for empty in (b"", tmp_path / "empty.fd"):
        with pytest.raises(FormatError, match="is empty"):
            sev_launch_digest(empty)
    plain = measure_sev(bytes(range(256)) * 16)
    assert len(plain.warnings) == 1 and "not an SEV-capable OVMF build" in plain.warnings[0]
    assert plain.to_json()["warnings"] == list(plain.warnings)
    assert measure_sev(build_image([(SECRET_AREA_GUID, struct.pack("<II", 0x80C000, 0xC00))])).warnings == ()
    diagnosis = diagnose_mismatch(LaunchMeasurement(bytes(32), bytes(16)), bytes(16), 1, 40, 40, 0, bytes(4096))
    assert not diagnosis.matches and diagnosis.warnings and diagnosis.to_json()["warnings"] == list(diagnosis.warnings)


_GUIDS = st.sampled_from([HASH_TABLE_GUID, SECRET_AREA_GUID, RESET_BLOCK_GUID, SNP_METADATA_GUID, FOOTER_GUID])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600), st.lists(st.tuples(_GUIDS, st.binary(max_size=24)), max_size=6),
       st.integers(0, 0xFFFF), st.booleans())
def test_footer_fuzz_raises_only_sevhook_errors(noise: bytes, entries: list[tuple[uuid.UUID, bytes]],
                                                bogus_total: int, corrupt_total: bool) -> None:
    image = bytearray(build_image(entries, size=4096, body=noise))
    if corrupt_total:
        struct.pack_into("<H", image, len(image) - 50, bogus_total)
    try:
        footer = OvmfFooter.read(bytes(image))
        footer.describe()
        for accessor in (lambda: footer.hash_table, lambda: footer.secret_area, lambda: footer.reset_eip):
            accessor()
        snp_launch_digest(bytes(image), 2, MILAN)
    except SevhookError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=200))
def test_kernel_hashes_parse_fuzz(data: bytes) -> None:
    try:
        KernelHashes.parse(data)
    except SevhookError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=4096, max_size=4096), st.sampled_from([0x18, 0x178, 0x310, 0x3B0, 0x408]),
       st.binary(min_size=8, max_size=8))
def test_vmsa_parse_fuzz(noise: bytes, offset: int, value: bytes) -> None:
    for page in (noise, Vmsa(0xFFFFFFF0, MILAN).to_bytes()):
        mutated = page[:offset] + value + page[offset + 8:]
        try:
            Vmsa.parse(mutated)
        except SevhookError:
            pass
