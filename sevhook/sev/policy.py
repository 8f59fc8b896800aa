"""SEV and SEV-SNP guest policies: named flags both ways, and the exact integer kept intact.

The policy is MACed by the firmware as the exact 32-bit (SEV) integer, so decoding never drops
bits: unknown or reserved bits are reported, not truncated (sevctl and sev-tool lose them)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from sevhook.errors import FormatError


class SevPolicyFlag(enum.IntFlag):
    NODBG = 1 << 0
    NOKS = 1 << 1
    ES = 1 << 2
    NOSEND = 1 << 3
    DOMAIN = 1 << 4
    SEV = 1 << 5


SEV_RESERVED_MASK = 0xFFC0  # bits 6-15
SEV_POLICY_MAX = 0xFFFF_FFFF


@dataclass(frozen=True)
class SevPolicy:
    """A 32-bit SEV guest policy; bits 16-23 and 24-31 are the minimum firmware API major/minor."""

    value: int

    def __post_init__(self) -> None:
        if not 0 <= self.value <= SEV_POLICY_MAX:
            raise FormatError(f"SEV policy {self.value:#x} does not fit in 32 bits")

    @classmethod
    def build(cls, flags: SevPolicyFlag = SevPolicyFlag(0), api_major: int = 0, api_minor: int = 0) -> SevPolicy:
        if not (0 <= api_major <= 0xFF and 0 <= api_minor <= 0xFF):
            raise FormatError("minimum API major and minor must each be 0..255")
        return cls(int(flags) | api_major << 16 | api_minor << 24)

    @property
    def flags(self) -> SevPolicyFlag:
        return SevPolicyFlag(self.value & 0x3F)

    @property
    def reserved_bits(self) -> int:
        return self.value & SEV_RESERVED_MASK

    @property
    def api_major(self) -> int:
        return (self.value >> 16) & 0xFF

    @property
    def api_minor(self) -> int:
        return (self.value >> 24) & 0xFF

    @property
    def debug_allowed(self) -> bool:
        return not self.value & SevPolicyFlag.NODBG

    @property
    def key_sharing_allowed(self) -> bool:
        return not self.value & SevPolicyFlag.NOKS

    @property
    def es(self) -> bool:
        return bool(self.value & SevPolicyFlag.ES)

    def flag_names(self) -> list[str]:
        return [flag.name for flag in SevPolicyFlag if self.value & flag and flag.name]

    def to_bytes(self) -> bytes:
        """The 4-byte little-endian form the firmware MACs."""
        return self.value.to_bytes(4, "little")

    def describe(self) -> str:
        names = "|".join(self.flag_names()) or "none"
        text = f"{self.value:#06x} ({names}; minimum API {self.api_major}.{self.api_minor})"
        if self.reserved_bits:
            text += f", reserved bits {self.reserved_bits:#x} set"
        return text


class SnpPolicyFlag(enum.IntFlag):
    SMT = 1 << 16
    RESERVED_MBO = 1 << 17
    MIGRATE_MA = 1 << 18
    DEBUG = 1 << 19
    SINGLE_SOCKET = 1 << 20
    CXL_ALLOW = 1 << 21
    MEM_AES_256_XTS = 1 << 22
    RAPL_DIS = 1 << 23
    CIPHERTEXT_HIDING = 1 << 24
    PAGE_SWAP_DISABLE = 1 << 25


SNP_RESERVED_MASK = ~((1 << 26) - 1) & 0xFFFF_FFFF_FFFF_FFFF  # bits 26-63 must be zero
SNP_POLICY_MAX = 0xFFFF_FFFF_FFFF_FFFF


@dataclass(frozen=True)
class SnpPolicy:
    """A 64-bit SEV-SNP guest policy; bits 0-7 ABI minor, 8-15 ABI major, bit 17 must be one."""

    value: int

    def __post_init__(self) -> None:
        if not 0 <= self.value <= SNP_POLICY_MAX:
            raise FormatError(f"SNP policy {self.value:#x} does not fit in 64 bits")

    @classmethod
    def build(cls, flags: SnpPolicyFlag = SnpPolicyFlag(0), abi_major: int = 0, abi_minor: int = 0) -> SnpPolicy:
        if not (0 <= abi_major <= 0xFF and 0 <= abi_minor <= 0xFF):
            raise FormatError("minimum ABI major and minor must each be 0..255")
        return cls(int(flags | SnpPolicyFlag.RESERVED_MBO) | abi_major << 8 | abi_minor)

    @property
    def abi_major(self) -> int:
        return (self.value >> 8) & 0xFF

    @property
    def abi_minor(self) -> int:
        return self.value & 0xFF

    @property
    def reserved_bit17_set(self) -> bool:
        return bool(self.value & SnpPolicyFlag.RESERVED_MBO)

    @property
    def reserved_bits(self) -> int:
        return self.value & SNP_RESERVED_MASK

    @property
    def debug_allowed(self) -> bool:
        return bool(self.value & SnpPolicyFlag.DEBUG)

    def flag_names(self) -> list[str]:
        return [f.name for f in SnpPolicyFlag if self.value & f and f is not SnpPolicyFlag.RESERVED_MBO and f.name]

    def to_bytes(self) -> bytes:
        return self.value.to_bytes(8, "little")


def parse_number(text: str, what: str = "number") -> int:
    """Parse a CLI number given as decimal or 0x-hex, with a message naming the field."""
    try:
        return int(text.strip(), 0)
    except ValueError as exc:
        raise FormatError(f"{what}: {text!r} is not a number (use decimal or 0x-hex)") from exc
