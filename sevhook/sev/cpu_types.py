"""QEMU's AMD EPYC vCPU models and the CPUID(1).EAX signature KVM writes into every SEV-ES VMSA (rdx).

The launch digest of an SEV-ES or SNP guest depends on the guest CPU's family/model/stepping, because
KVM stores the CPUID(1).EAX signature in rdx of each initial VMSA. Versions of a QEMU model (EPYC-Rome-v4,
...) change feature flags, never the family/model/stepping, so they share their base model's signature."""

from __future__ import annotations

from dataclasses import dataclass

from sevhook.errors import UsageError

_MAX_FAMILY = 0xF + 0xFF  # base family 0xF plus an 8-bit extended family
_MAX_MODEL = 0xFF
_MAX_STEPPING = 0xF


@dataclass(frozen=True)
class CpuModel:
    """A CPU identity as CPUID leaf 1 reports it."""

    family: int
    model: int
    stepping: int

    def __post_init__(self) -> None:
        for what, value, limit in (
            ("family", self.family, _MAX_FAMILY),
            ("model", self.model, _MAX_MODEL),
            ("stepping", self.stepping, _MAX_STEPPING),
        ):
            if not 0 <= value <= limit:
                raise UsageError(f"vCPU {what} {value} is out of range 0..{limit}")

    @property
    def signature(self) -> int:
        """CPUID Fn0000_0001_EAX: stepping[3:0], model[7:4], family[11:8], ext. model[19:16], ext. family[27:20]."""
        base_family = min(self.family, 0xF)
        extended_family = self.family - base_family
        return (
            extended_family << 20
            | (self.model >> 4) << 16
            | base_family << 8
            | (self.model & 0xF) << 4
            | self.stepping
        )

    def describe(self) -> str:
        return f"family {self.family} model {self.model} stepping {self.stepping} (signature {self.signature:#010x})"


_EPYC = CpuModel(23, 1, 2)  # Naples
_ROME = CpuModel(23, 49, 0)
_MILAN = CpuModel(25, 1, 1)
_GENOA = CpuModel(25, 17, 0)
_TURIN = CpuModel(26, 0, 0)

CPU_TYPES: dict[str, CpuModel] = {
    "EPYC": _EPYC,
    "EPYC-v1": _EPYC,
    "EPYC-v2": _EPYC,
    "EPYC-IBPB": _EPYC,
    "EPYC-v3": _EPYC,
    "EPYC-v4": _EPYC,
    "EPYC-Rome": _ROME,
    "EPYC-Rome-v1": _ROME,
    "EPYC-Rome-v2": _ROME,
    "EPYC-Rome-v3": _ROME,
    "EPYC-Rome-v4": _ROME,
    "EPYC-Rome-v5": _ROME,
    "EPYC-Milan": _MILAN,
    "EPYC-Milan-v1": _MILAN,
    "EPYC-Milan-v2": _MILAN,
    "EPYC-Milan-v3": _MILAN,
    "EPYC-Genoa": _GENOA,
    "EPYC-Genoa-v1": _GENOA,
    "EPYC-Genoa-v2": _GENOA,
    "EPYC-Turin": _TURIN,
    "EPYC-Turin-v1": _TURIN,
}
"""QEMU model name -> identity (QEMU target/i386/cpu.c builtin_x86_defs)."""


def cpu_model(name: str) -> CpuModel:
    """Look a QEMU CPU model up by name, ignoring case; unknown names list the known ones."""
    for known, model in CPU_TYPES.items():
        if known.lower() == name.strip().lower():
            return model
    raise UsageError(
        f"unknown vCPU type {name!r}: use one of {', '.join(CPU_TYPES)}, "
        "or give --vcpu-family/--vcpu-model/--vcpu-stepping (e.g. from /proc/cpuinfo for host-passthrough)"
    )


def distinct_models() -> dict[CpuModel, list[str]]:
    """Each distinct identity with the model names that share it (diagnosis tries each identity once)."""
    grouped: dict[CpuModel, list[str]] = {}
    for name, model in CPU_TYPES.items():
        grouped.setdefault(model, []).append(name)
    return grouped
