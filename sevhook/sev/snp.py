"""The SEV-SNP launch digest: a SHA-384 chain over every page QEMU adds with SNP_LAUNCH_UPDATE.

Each page extends the digest: LD' = SHA-384(LD ‖ contents(48) ‖ u16 0x70 ‖ u8 page type ‖ u8 is_imi ‖ u8 vmpl3 ‖
u8 vmpl2 ‖ u8 vmpl1 ‖ u8 0 ‖ u64 gpa), starting from 48 zero bytes; contents is the page's SHA-384 for normal and
VMSA pages and zeros otherwise. QEMU's order: the firmware pages (mapped to end at 4 GiB), the OVMF SNP metadata
sections in table order (zero, secrets, CPUID, kernel-hashes page), then one VMSA page per vCPU."""

from __future__ import annotations

import enum
import hashlib
import struct

from sevhook.errors import FormatError
from sevhook.sev.inputs import BinaryInput, input_name, open_input
from sevhook.sev.kernel_hashes import PAGE_SIZE, KernelHashes, hash_boot_inputs
from sevhook.sev.launch_digest import Component, LaunchDigest, check_boot_inputs, vmsa_pages
from sevhook.sev.ovmf import FirmwareCapabilityError, OvmfFooter, SnpMetadataSection, SnpSectionType
from sevhook.sev.vmsa import SNP_ACTIVE, HostKernel, vcpu_vmsas

DIGEST_SIZE = 48
VMSA_GPA = 0xFFFF_FFFF_F000  # the RMP records VMSA pages at GPA -1, page-aligned, bits above 51 clear
_PAGE_INFO = struct.Struct("<48s48sHBBBBBBQ")  # digest, contents, length, type, is_imi, vmpl3..1, reserved, gpa
_PAGES_PER_READ = 256


class PageType(enum.IntEnum):
    """SNP_LAUNCH_UPDATE page types."""

    NORMAL = 1
    VMSA = 2
    ZERO = 3
    UNMEASURED = 4
    SECRETS = 5
    CPUID = 6


class SnpDigest:
    """The running SNP launch digest (the guest context's LD)."""

    def __init__(self, seed: bytes = bytes(DIGEST_SIZE)) -> None:
        if len(seed) != DIGEST_SIZE:
            raise FormatError(f"an SNP launch digest is {DIGEST_SIZE} bytes, not {len(seed)}")
        self.value = seed

    def add_page(self, page_type: PageType, gpa: int, contents: bytes = bytes(DIGEST_SIZE)) -> None:
        info = _PAGE_INFO.pack(self.value, contents, _PAGE_INFO.size, page_type, 0, 0, 0, 0, 0, gpa)
        self.value = hashlib.sha384(info).digest()

    def add_normal_page(self, gpa: int, page: bytes | memoryview) -> None:
        self.add_page(PageType.NORMAL, gpa, hashlib.sha384(page).digest())

    def add_empty_pages(self, page_type: PageType, gpa: int, size: int) -> None:
        for offset in range(0, size, PAGE_SIZE):
            self.add_page(page_type, gpa + offset)

    def add_vmsa_page(self, page: bytes) -> None:
        self.add_page(PageType.VMSA, VMSA_GPA, hashlib.sha384(page).digest())

    def add_firmware(self, firmware: BinaryInput, gpa: int) -> None:
        """Stream the flash image page by page (256 pages per read)."""
        name = input_name(firmware, "firmware")
        buffer = bytearray(PAGE_SIZE * _PAGES_PER_READ)
        view = memoryview(buffer)
        with open_input(firmware, "firmware") as (stream, size):
            if size % PAGE_SIZE:
                raise FormatError(f"{name} is {size} bytes, not a whole number of 4 KiB pages, so SNP cannot map it")
            offset = 0
            while offset < size:
                count = stream.readinto(buffer)
                if not count or count % PAGE_SIZE:
                    raise FormatError(f"{name} changed while being read (short read at offset {offset:#x})")
                for start in range(0, count, PAGE_SIZE):
                    self.add_normal_page(gpa + offset + start, view[start : start + PAGE_SIZE])
                offset += count


def _add_section(
    digest: SnpDigest, footer: OvmfFooter, section: SnpMetadataSection, hashes: KernelHashes | None
) -> None:
    if section.size % PAGE_SIZE or section.gpa % PAGE_SIZE:
        raise FormatError(f"{footer.name}: SNP section {section.describe()} is not page-aligned")
    try:
        kind = SnpSectionType(section.kind)
    except ValueError as exc:
        raise FormatError(
            f"{footer.name}: SNP metadata section type {section.kind:#x} is unknown; this OVMF is newer than sevhook"
        ) from exc
    if kind in (SnpSectionType.SNP_SEC_MEM, SnpSectionType.SVSM_CAA):
        digest.add_empty_pages(PageType.ZERO, section.gpa, section.size)
    elif kind is SnpSectionType.SNP_SECRETS:
        digest.add_page(PageType.SECRETS, section.gpa)
    elif kind is SnpSectionType.CPUID:
        digest.add_page(PageType.CPUID, section.gpa)
    elif hashes is None:
        digest.add_empty_pages(PageType.ZERO, section.gpa, section.size)
    else:
        if section.size != PAGE_SIZE:
            raise FormatError(f"{footer.name}: the SNP kernel-hashes section is {section.size:#x} bytes, not one page")
        table = footer.require_hash_table()
        digest.add_normal_page(section.gpa, hashes.page(table.base % PAGE_SIZE))


def measure_snp(
    firmware: BinaryInput,
    vcpus: int,
    signature: int,
    kernel: BinaryInput | None = None,
    initrd: BinaryInput | None = None,
    cmdline: str | bytes | None = None,
    guest_features: int = SNP_ACTIVE,
    host_kernel: HostKernel = HostKernel.V6_10,
) -> LaunchDigest:
    """The SNP launch digest with its components (the firmware component's digest is the chain after the
    firmware pages, which some tools call the OVMF hash)."""
    check_boot_inputs(kernel, initrd, cmdline)
    footer = OvmfFooter.read(firmware)
    sections = footer.require_snp_sections()
    vmsas = vcpu_vmsas(vcpus, footer.require_reset_eip(), signature, guest_features, host_kernel)
    if kernel is not None:
        if not any(section.kind == SnpSectionType.SNP_KERNEL_HASHES for section in sections):
            raise FirmwareCapabilityError(
                f"{footer.name} has no SNP kernel-hashes section, so QEMU cannot measure -kernel/-initrd/-append "
                "under SNP: use an AmdSev OVMF build or drop --kernel/--initrd/--cmdline"
            )
        footer.require_hash_table()  # the table's offset within its page
    digest = SnpDigest()
    hashes: KernelHashes | None = None
    if kernel is None:
        digest.add_firmware(firmware, footer.gpa)
    else:
        _, hashes = hash_boot_inputs(kernel, initrd, cmdline, lambda: digest.add_firmware(firmware, footer.gpa))
    components = [Component("firmware", footer.firmware_size, digest.value, f"{footer.name}; chain after its pages")]
    for section in sections:
        _add_section(digest, footer, section, hashes)
        detail = section.describe()
        if section.kind == SnpSectionType.SNP_KERNEL_HASHES and hashes is not None:
            detail += f"; {hashes.describe()}"
        components.append(Component("SNP section", section.size, digest.value, f"chain after it; {detail}"))
    for name, page, detail in vmsa_pages(vmsas):
        digest.add_vmsa_page(page)
        components.append(Component(name, len(page), hashlib.sha384(page).digest(), detail))
    return LaunchDigest(digest.value, "sha384", tuple(components))


def snp_launch_digest(
    firmware: BinaryInput,
    vcpus: int,
    signature: int,
    kernel: BinaryInput | None = None,
    initrd: BinaryInput | None = None,
    cmdline: str | bytes | None = None,
    guest_features: int = SNP_ACTIVE,
    host_kernel: HostKernel = HostKernel.V6_10,
) -> bytes:
    """The 48-byte SNP launch digest (MEASUREMENT in the attestation report)."""
    return measure_snp(firmware, vcpus, signature, kernel, initrd, cmdline, guest_features, host_kernel).digest

