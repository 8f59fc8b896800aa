"""SEV and SEV-ES launch digests (GCTX.LD), computed from what the guest owner intends to boot.

LD = SHA-256(firmware image ‖ [kernel-hashes table] ‖ [VMSA per vCPU]) in QEMU's launch order: the flash image
in one LAUNCH_UPDATE_DATA, the 176-byte table when -kernel is used, then (SEV-ES) one LAUNCH_UPDATE_VMSA page per
vCPU. Every file is hashed in chunks, so memory stays flat whatever the initrd size. Each component's own hash is
kept so `--explain` can show which input differs."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from sevhook.errors import FormatError, UsageError
from sevhook.sev.inputs import BinaryInput, input_name, open_input
from sevhook.sev.kernel_hashes import TABLE_SIZE, KernelHashes, feed, hash_boot_inputs
from sevhook.sev.ovmf import FirmwareCapabilityError, OvmfFooter
from sevhook.sev.vmsa import VMSA_SIZE, HostKernel, Vmsa, vcpu_vmsas


@dataclass(frozen=True)
class Component:
    """One measured piece and its own digest."""

    name: str
    size: int
    digest: bytes
    detail: str = ""


@dataclass(frozen=True)
class LaunchDigest:
    """A launch digest and the components it was built from, in measurement order."""

    digest: bytes
    algorithm: str
    components: tuple[Component, ...]
    warnings: tuple[str, ...] = ()
    """Doubts about the inputs that do not stop the measurement (e.g. a firmware without an OVMF footer)."""

    def to_json(self) -> dict[str, object]:
        """The digest and its components as JSON-ready data, for `owner measure --json`."""
        return {
            "digest": self.digest.hex(),
            "algorithm": self.algorithm,
            "components": [
                {"name": c.name, "size": c.size, "digest": c.digest.hex(), "detail": c.detail} for c in self.components
            ],
            "warnings": list(self.warnings),
        }

    def explain(self) -> list[str]:
        lines = []
        for component in self.components:
            line = f"{component.name}: {component.size} bytes, {self.algorithm} {component.digest.hex()}"
            lines.append(line + (f" ({component.detail})" if component.detail else ""))
        lines.append(f"launch digest ({self.algorithm}): {self.digest.hex()}")
        return lines


def hash_firmware(firmware: BinaryInput) -> hashlib._Hash:
    """SHA-256 state after the flash image: the prefix every SEV/SEV-ES digest of this firmware shares."""
    running = hashlib.sha256()
    with open_input(firmware, "firmware") as (stream, size):
        feed(running, stream, input_name(firmware, "firmware"), size)
    return running


def check_boot_inputs(kernel: BinaryInput | None, initrd: BinaryInput | None, cmdline: str | bytes | None) -> None:
    """QEMU refuses -initrd/-append without -kernel; say so before hashing anything."""
    if kernel is None and (initrd is not None or cmdline is not None):
        raise UsageError("an initrd or kernel command line needs a kernel (--kernel), as QEMU's -initrd/-append do")


def require_kernel_area(footer: OvmfFooter) -> None:
    """Direct boot needs room for the table in the firmware's kernel-hashes area."""
    region = footer.require_hash_table()
    if region.size < TABLE_SIZE:
        raise FirmwareCapabilityError(
            f"{footer.name}: the kernel-hashes area is {region.size} bytes, smaller than the {TABLE_SIZE}-byte table"
        )


def hash_launch_inputs(
    firmware: BinaryInput,
    footer: OvmfFooter,
    kernel: BinaryInput | None,
    initrd: BinaryInput | None,
    cmdline: str | bytes | None,
) -> tuple[hashlib._Hash, KernelHashes | None]:
    """The SHA-256 state after the firmware and the kernel-hashes table (None without -kernel), hashed
    concurrently once the firmware is known to accept a direct boot."""
    check_boot_inputs(kernel, initrd, cmdline)
    if kernel is None:
        return hash_firmware(firmware), None
    require_kernel_area(footer)
    return hash_boot_inputs(kernel, initrd, cmdline, lambda: hash_firmware(firmware))


def table_component(hashes: KernelHashes) -> Component:
    table = hashes.to_bytes()
    return Component("kernel-hashes table", len(table), hashlib.sha256(table).digest(), hashes.describe())


def _finish(
    running: hashlib._Hash, footer: OvmfFooter, hashes: KernelHashes | None, pages: Sequence[tuple[str, bytes, str]]
) -> LaunchDigest:
    components = [Component("firmware", footer.firmware_size, running.copy().digest(), footer.name)]
    if hashes is not None:
        running.update(hashes.to_bytes())
        components.append(table_component(hashes))
    for name, page, detail in pages:
        running.update(page)
        components.append(Component(name, len(page), hashlib.sha256(page).digest(), detail))
    return LaunchDigest(running.digest(), "sha256", tuple(components), tuple(footer.warnings()))


def read_vmsa_page(source: BinaryInput) -> bytes:
    """A VMSA page given as a file: exactly 4096 bytes, checked before reading."""
    name = input_name(source, "VMSA")
    with open_input(source, "VMSA") as (stream, size):
        if size != VMSA_SIZE:
            raise UsageError(f"{name} is {size} bytes; a VMSA page is exactly {VMSA_SIZE} bytes")
        return stream.read(VMSA_SIZE)


def describe_vmsa_page(page: bytes) -> str:
    """What a given VMSA page holds, so --explain shows e.g. a host-kernel or CPU difference at a glance."""
    try:
        return Vmsa.parse(page).describe()
    except FormatError as exc:
        return f"not a QEMU/KVM initial VMSA ({exc.message})"


def measure_sev(
    firmware: BinaryInput,
    kernel: BinaryInput | None = None,
    initrd: BinaryInput | None = None,
    cmdline: str | bytes | None = None,
    vmsas: Sequence[BinaryInput] = (),
) -> LaunchDigest:
    """The SEV launch digest with its components; `vmsas` are VMSA pages (SEV-ES) measured as given."""
    check_boot_inputs(kernel, initrd, cmdline)
    footer = OvmfFooter.read(firmware)
    pages = []
    for index, source in enumerate(vmsas):
        page = read_vmsa_page(source)
        pages.append((f"VMSA {index}", page, f"{input_name(source, 'VMSA')}: {describe_vmsa_page(page)}"))
    running, hashes = hash_launch_inputs(firmware, footer, kernel, initrd, cmdline)
    return _finish(running, footer, hashes, pages)


def sev_launch_digest(
    firmware: BinaryInput,
    kernel: BinaryInput | None = None,
    initrd: BinaryInput | None = None,
    cmdline: str | bytes | None = None,
    vmsas: Sequence[BinaryInput] = (),
) -> bytes:
    """The 32-byte SEV launch digest (SEV-ES when VMSA pages are given)."""
    return measure_sev(firmware, kernel, initrd, cmdline, vmsas).digest


def vmsa_pages(vmsas: Sequence[Vmsa]) -> list[tuple[str, bytes, str]]:
    """Named pages for the report, each distinct VMSA built once."""
    built: dict[Vmsa, bytes] = {}
    return [
        (f"VMSA {index} ({'BSP' if index == 0 else 'AP'})", built.setdefault(vmsa, vmsa.to_bytes()), vmsa.describe())
        for index, vmsa in enumerate(vmsas)
    ]


def measure_seves(
    firmware: BinaryInput,
    vcpus: int,
    signature: int,
    kernel: BinaryInput | None = None,
    initrd: BinaryInput | None = None,
    cmdline: str | bytes | None = None,
    sev_features: int = 0,
    host_kernel: HostKernel = HostKernel.V6_10,
) -> LaunchDigest:
    """The SEV-ES launch digest with VMSAs built as QEMU/KVM builds them for `vcpus` vCPUs of `signature`."""
    check_boot_inputs(kernel, initrd, cmdline)
    footer = OvmfFooter.read(firmware)
    vmsas = vcpu_vmsas(vcpus, footer.require_reset_eip(), signature, sev_features, host_kernel)
    running, hashes = hash_launch_inputs(firmware, footer, kernel, initrd, cmdline)
    return _finish(running, footer, hashes, vmsa_pages(vmsas))


def seves_launch_digest(
    firmware: BinaryInput,
    vcpus: int,
    signature: int,
    kernel: BinaryInput | None = None,
    initrd: BinaryInput | None = None,
    cmdline: str | bytes | None = None,
    sev_features: int = 0,
    host_kernel: HostKernel = HostKernel.V6_10,
) -> bytes:
    """The 32-byte SEV-ES launch digest."""
    return measure_seves(firmware, vcpus, signature, kernel, initrd, cmdline, sev_features, host_kernel).digest
