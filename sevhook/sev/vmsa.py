"""The initial SEV-ES/SNP VMSA (VM save area) page QEMU/KVM encrypts and measures for each vCPU.

4096 bytes, zero except for reset state: real-mode segments, EFER.SVME, CR0/CR4, DR6/DR7, RFLAGS, the PAT,
rdx = CPUID(1).EAX of the guest CPU, the SEV features, XCR0, and, from Linux 6.10 on, MXCSR and the x87 control
word (older host kernels leave both 0, which is why a kernel upgrade changes the measurement). The bootstrap
vCPU starts at 0xFFFFFFF0; application vCPUs start at the firmware's SEV-ES reset address."""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from sevhook.errors import FormatError, UsageError

VMSA_SIZE = 4096
BSP_EIP = 0xFFFF_FFF0
MAX_VCPUS = 4096  # KVM_MAX_VCPUS on x86
DEBUG_SWAP = 1 << 5  # SEV feature on by default for SEV-ES in host kernels 6.5-6.8
SNP_ACTIVE = 1 << 0

_SEGMENT = struct.Struct("<HHIQ")  # selector, attributes, limit, base
_SEGMENTS = (  # offset, selector, attributes (cs gets its base from the eip)
    ("es", 0x00, 0, 0x93),
    ("cs", 0x10, 0xF000, 0x9B),
    ("ss", 0x20, 0, 0x93),
    ("ds", 0x30, 0, 0x93),
    ("fs", 0x40, 0, 0x93),
    ("gs", 0x50, 0, 0x93),
    ("gdtr", 0x60, 0, 0),
    ("ldtr", 0x70, 0, 0x82),
    ("idtr", 0x80, 0, 0),
    ("tr", 0x90, 0, 0x8B),
)
_U64_FIELDS = {  # offset -> value, the fixed reset state KVM sets
    0xD0: 0x1000,  # EFER.SVME
    0x148: 0x40,  # CR4.MCE
    0x158: 0x10,  # CR0.ET
    0x160: 0x400,  # DR7
    0x168: 0xFFFF0FF0,  # DR6
    0x170: 0x2,  # RFLAGS
    0x268: 0x0007040600070406,  # PAT
    0x3E8: 0x1,  # XCR0
}
_RIP = 0x178
_RDX = 0x310
_SEV_FEATURES = 0x3B0
_MXCSR = 0x408
_X87_FCW = 0x410
_MXCSR_RESET = 0x1F80
_X87_FCW_RESET = 0x037F


class HostKernel(enum.Enum):
    """Host kernels that build different VMSAs: before 6.10 MXCSR and the x87 FCW are left 0."""

    OLD = "old"
    V6_10 = "6.10"

    @classmethod
    def parse(cls, text: str) -> HostKernel:
        for member in cls:
            if member.value == text.strip().lower():
                return member
        raise UsageError(f"unknown host kernel variant {text!r}: use 'old' (Linux < 6.10) or '6.10' (6.10 and later)")


@dataclass(frozen=True)
class Vmsa:
    """The inputs that vary between initial VMSAs; `to_bytes` lays the page out."""

    eip: int
    signature: int
    sev_features: int = 0
    host_kernel: HostKernel = HostKernel.V6_10

    def __post_init__(self) -> None:
        for what, value, bits in (("eip", self.eip, 32), ("vCPU signature", self.signature, 32),
                                  ("guest features", self.sev_features, 64)):
            if not 0 <= value < 1 << bits:
                raise UsageError(f"{what} {value:#x} does not fit in {bits} bits")

    def to_bytes(self) -> bytes:
        page = bytearray(VMSA_SIZE)
        for name, offset, selector, attributes in _SEGMENTS:
            base = self.eip & 0xFFFF0000 if name == "cs" else 0
            _SEGMENT.pack_into(page, offset, selector, attributes, 0xFFFF, base)
        for offset, value in _U64_FIELDS.items():
            struct.pack_into("<Q", page, offset, value)
        struct.pack_into("<Q", page, _RIP, self.eip & 0xFFFF)
        struct.pack_into("<Q", page, _RDX, self.signature)
        struct.pack_into("<Q", page, _SEV_FEATURES, self.sev_features)
        if self.host_kernel is HostKernel.V6_10:
            struct.pack_into("<I", page, _MXCSR, _MXCSR_RESET)
            struct.pack_into("<H", page, _X87_FCW, _X87_FCW_RESET)
        return bytes(page)

    @classmethod
    def parse(cls, data: bytes, name: str = "VMSA") -> Vmsa:
        """Recognize an initial VMSA page (e.g. a dumped one) and return its inputs; any byte that differs
        from what QEMU/KVM would build is reported with its offset."""
        if len(data) != VMSA_SIZE:
            raise FormatError(f"{name}: a VMSA page is {VMSA_SIZE} bytes, not {len(data)}")
        (cs_base,) = struct.unpack_from("<Q", data, 0x18)
        (rip,) = struct.unpack_from("<Q", data, _RIP)
        (rdx,) = struct.unpack_from("<Q", data, _RDX)
        (features,) = struct.unpack_from("<Q", data, _SEV_FEATURES)
        (mxcsr,) = struct.unpack_from("<I", data, _MXCSR)
        host_kernel = HostKernel.V6_10 if mxcsr else HostKernel.OLD
        if cs_base > 0xFFFFFFFF or rip > 0xFFFF or rdx > 0xFFFFFFFF:
            raise FormatError(f"{name}: not an initial VMSA (CS base {cs_base:#x}, rip {rip:#x}, rdx {rdx:#x})")
        parsed = cls(eip=(cs_base & 0xFFFF0000) | rip, signature=rdx, sev_features=features, host_kernel=host_kernel)
        rebuilt = parsed.to_bytes()
        if rebuilt != data:
            offset = next(i for i in range(VMSA_SIZE) if rebuilt[i] != data[i])
            raise FormatError(
                f"{name}: byte {offset:#x} is {data[offset]:#04x}, where a QEMU/KVM initial VMSA has "
                f"{rebuilt[offset]:#04x}; it was not built by QEMU's SEV-ES launch"
            )
        return parsed

    def describe(self) -> str:
        return (f"eip {self.eip:#010x}, rdx (vCPU signature) {self.signature:#010x}, sev_features "
                f"{self.sev_features:#x}, host kernel {self.host_kernel.value}")


def vcpu_vmsas(
    vcpus: int, reset_eip: int, signature: int, sev_features: int = 0, host_kernel: HostKernel = HostKernel.V6_10
) -> list[Vmsa]:
    """One VMSA per vCPU in launch order: the bootstrap processor, then the application processors."""
    if not 1 <= vcpus <= MAX_VCPUS:
        raise UsageError(f"the vCPU count must be 1..{MAX_VCPUS}, not {vcpus}")
    bsp = Vmsa(BSP_EIP, signature, sev_features, host_kernel)
    ap = Vmsa(reset_eip, signature, sev_features, host_kernel)
    return [bsp] + [ap] * (vcpus - 1)
