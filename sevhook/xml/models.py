"""Typed, immutable models of a domain's launch security and sevhook attestation metadata.

Only what sevhook needs from a domain is modelled; everything else stays in the XML. Optional
values are None when the XML leaves them out, so a model can be turned back into exactly the
arguments libvirt would emit (libvirt omits what the XML omits)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sevhook.sev.policy import SevPolicy, SnpPolicy

SEVHOOK_NS = "http://sevhook.org/xmlns/libvirt/1.0"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


@dataclass(frozen=True)
class SevLaunchSecurity:
    """`<launchSecurity type='sev'>` (SEV and SEV-ES: ES is policy bit 2)."""

    policy: SevPolicy
    cbitpos: int | None = None
    reduced_phys_bits: int | None = None
    dh_cert: str | None = None
    session: str | None = None
    kernel_hashes: bool | None = None
    handle: int | None = None
    type: Literal["sev"] = "sev"


@dataclass(frozen=True)
class SevSnpLaunchSecurity:
    """`<launchSecurity type='sev-snp'>`; base64 blobs are kept verbatim as libvirt passes them."""

    policy: SnpPolicy
    cbitpos: int | None = None
    reduced_phys_bits: int | None = None
    kernel_hashes: bool | None = None
    author_key: bool | None = None
    vcek: bool | None = None
    guest_visible_workarounds: str | None = None
    id_block: str | None = None
    id_auth: str | None = None
    host_data: str | None = None
    type: Literal["sev-snp"] = "sev-snp"


@dataclass(frozen=True)
class S390PvLaunchSecurity:
    """`<launchSecurity type='s390-pv'/>`: no parameters."""

    type: Literal["s390-pv"] = "s390-pv"


@dataclass(frozen=True)
class TdxLaunchSecurity:
    """`<launchSecurity type='tdx'>`: parsed and validated; sevhook does not launch TDX guests."""

    policy: int | None = None
    mr_config_id: str | None = None
    mr_owner: str | None = None
    mr_owner_config: str | None = None
    quote_generation_socket: str | None = None
    type: Literal["tdx"] = "tdx"


LaunchSecurity = SevLaunchSecurity | SevSnpLaunchSecurity | S390PvLaunchSecurity | TdxLaunchSecurity


@dataclass(frozen=True)
class BrokerRef:
    """Where the guest owner's key broker is and how the host authenticates to it."""

    url: str
    ca_file: str | None = None
    token_file: str | None = None


@dataclass(frozen=True)
class Attestation:
    """`<sevhook:attestation>` in the domain's `<metadata>`: how the hook attests this guest."""

    broker: BrokerRef
    guest_id: str
    launch_id: str | None = None
    socket: str | None = None
    timeout: float = 30.0
    resume: bool = True
    emulator_qemu: str | None = None  # <sevhook:emulator qemu>: sevhook-qemu attests every start

    @property
    def mode(self) -> str:
        """Who attests the guest: "emulator" (sevhook-qemu), "hook" (the hook's monitor), "start"."""
        if self.emulator_qemu is not None:
            return "emulator"
        return "hook" if self.socket is not None else "start"


@dataclass(frozen=True)
class OsInfo:
    """The parts of `<os>` that decide whether an SEV guest can boot and be measured."""

    firmware: str | None = None  # the `firmware` attribute, e.g. "efi"
    loader: str | None = None
    loader_type: str | None = None  # "pflash" or "rom"
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None


@dataclass(frozen=True)
class Domain:
    """A domain as sevhook sees it."""

    name: str
    type: str
    uuid: str | None = None
    id: int | None = None
    emulator: str | None = None
    vcpus: int = 1
    os: OsInfo = field(default_factory=OsInfo)
    launch_security: LaunchSecurity | None = None
    attestation: Attestation | None = None
