"""The SEV-ES rules of a launch digest, as the reference tools apply them (libvirt's
virt-qemu-sev-validate, AMD's sev-tool): the firmware measures one VMSA per vCPU exactly when the policy
has the ES bit (bit 2), so an ES policy with no VMSA source cannot give a digest (a digest without VMSAs
could only "match" by accident), and VMSAs given for a non-ES policy are not part of the digest."""

from __future__ import annotations

from sevhook.errors import UsageError
from sevhook.sev.policy import SevPolicy

VMSA_SOURCES = "--vmsa FILE per vCPU, or --vcpus N with --vcpu-type NAME"


def require_vmsa_source(policy: int, has_vmsas: bool, what: str, advice: str = f"add {VMSA_SOURCES}") -> None:
    """Refuse (usage error, exit 2) an SEV-ES policy whose digest would be computed without VMSAs."""
    if SevPolicy(policy).es and not has_vmsas:
        raise UsageError(f"{what}: policy {policy:#06x} has the SEV-ES bit (0x4), so the launch digest includes "
                         f"one VMSA per vCPU, and none is given: {advice}")


def vmsas_for_policy(policy: int, vmsa_count: int) -> tuple[bool, str | None]:
    """(measure the VMSAs?, warning): a non-ES policy never measures VMSAs, so given ones are ignored."""
    if vmsa_count and not SevPolicy(policy).es:
        return False, (f"policy {policy:#06x} is not SEV-ES (bit 0x4 clear): the {vmsa_count} VMSA page(s) given "
                       "are not part of a plain SEV launch digest and are ignored")
    return bool(vmsa_count), None
