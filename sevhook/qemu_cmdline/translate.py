"""A domain's `<launchSecurity>` -> the QEMU arguments libvirt would pass for a given QEMU.

Two arguments change with the QEMU generation: the machine property (confidential-guest-support
from QEMU 6.0, memory-encryption before) and the -object syntax (JSON from 6.0, keyval before).
The libvirt 4.x compatibility mode reproduces what libvirt 4.x emitted (id sev0, hex policy)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from sevhook.errors import SevhookError, UsageError
from sevhook.qemu_cmdline import json_syntax, keyval, qemu_version
from sevhook.qemu_cmdline.libdir import default_lib_dir, file_contents, launch_files
from sevhook.qemu_cmdline.objects import (
    LIBVIRT4_OBJECT_ID,
    OBJECT_ID,
    QemuObject,
    model_to_object,
    unsupported_tdx,
)
from sevhook.qemu_cmdline.qemu_version import QemuVersion
from sevhook.xml.models import (
    Domain,
    LaunchSecurity,
    S390PvLaunchSecurity,
    SevLaunchSecurity,
    SevSnpLaunchSecurity,
    TdxLaunchSecurity,
)

Syntax = Literal["json", "keyval"]
CGS_PROPERTY = "confidential-guest-support"
MEMORY_ENCRYPTION_PROPERTY = "memory-encryption"


@dataclass(frozen=True)
class CmdlineOptions:
    """How to translate: for which QEMU, in which syntax, and where the launch files go."""

    qemu_version: QemuVersion | None = None  # None: the newest QEMU
    syntax: Syntax | None = None  # None: what libvirt picks for the QEMU version
    libvirt4_compat: bool = False
    lib_dir: str | os.PathLike[str] | None = None  # None: libvirt's per-domain directory


@dataclass(frozen=True)
class Translation:
    """The arguments for one domain, and the files QEMU reads through them."""

    machine_property: tuple[str, str]
    object: QemuObject
    object_text: str
    syntax: Syntax
    lib_dir: str
    files: dict[str, str] = field(default_factory=dict)  # path -> exact text QEMU reads

    @property
    def machine_text(self) -> str:
        return f"{self.machine_property[0]}={self.machine_property[1]}"

    @property
    def argv(self) -> list[str]:
        return ["-machine", self.machine_text, "-object", self.object_text]


def _check_supported(model: LaunchSecurity, version: QemuVersion | None, compat: bool) -> None:
    """Refuse what libvirt refuses for this QEMU, with libvirt's words."""
    if isinstance(model, TdxLaunchSecurity):
        raise unsupported_tdx()
    where = f" (QEMU {version})" if version else ""
    if isinstance(model, SevLaunchSecurity):
        if not qemu_version.has(version, qemu_version.SEV_GUEST):
            raise SevhookError(f"'sev' launch security is not supported with this QEMU binary{where}: sev-guest needs "
                               "QEMU 2.12")
        if model.kernel_hashes is not None and compat:
            raise SevhookError("libvirt 4.x had no kernelHashes: remove the attribute or drop --libvirt4-compat")
        if model.kernel_hashes is not None and not qemu_version.has(version, qemu_version.KERNEL_HASHES):
            raise SevhookError(
                f"SEV measured direct kernel boot is not supported with this QEMU binary{where}: kernelHashes "
                "needs QEMU 6.2 (remove the kernelHashes attribute or pick a newer --qemu-version)"
            )
    elif compat:
        raise SevhookError(f"libvirt 4.x knew only launchSecurity type 'sev', not '{model.type}': drop "
                           "--libvirt4-compat")
    elif isinstance(model, SevSnpLaunchSecurity) and not qemu_version.has(version, qemu_version.SEV_SNP_GUEST):
        raise SevhookError(f"'sev-snp' launch security is not supported with this QEMU binary{where}: needs QEMU 9.1")
    elif isinstance(model, S390PvLaunchSecurity) and not qemu_version.has(version, qemu_version.S390_PV_GUEST):
        raise SevhookError(f"'s390-pv' launch security is not supported with this QEMU binary{where}: needs QEMU 6.0")


def _syntax(options: CmdlineOptions) -> Syntax:
    json_ok = qemu_version.has(options.qemu_version, qemu_version.JSON_OBJECT_SYNTAX)
    if options.libvirt4_compat:
        if options.syntax == "json":
            raise UsageError("--libvirt4-compat writes the keyval syntax libvirt 4.x used; drop --syntax json")
        return "keyval"
    if options.syntax == "json" and not json_ok:
        raise UsageError(f"QEMU {options.qemu_version} has no JSON -object syntax (needs 6.0): use --syntax keyval")
    return options.syntax or ("json" if json_ok else "keyval")


def translate_launch_security(model: LaunchSecurity, lib_dir: str | os.PathLike[str],
                              options: CmdlineOptions = CmdlineOptions()) -> Translation:
    """The arguments for a complete model (cbitpos and reducedPhysBits filled in for SEV/SNP)."""
    _check_supported(model, options.qemu_version, options.libvirt4_compat)
    lib_dir = os.fspath(lib_dir)
    syntax = _syntax(options)
    object_id = LIBVIRT4_OBJECT_ID if options.libvirt4_compat else OBJECT_ID
    obj = model_to_object(model, launch_files(lib_dir), object_id)
    if syntax == "json":
        text = json_syntax.format_object(obj)
    else:
        text = keyval.format_object(obj, frozenset({"policy"}) if options.libvirt4_compat else frozenset())
    cgs = (qemu_version.has(options.qemu_version, qemu_version.CONFIDENTIAL_GUEST_SUPPORT)
           and not options.libvirt4_compat)
    machine = (CGS_PROPERTY if cgs else MEMORY_ENCRYPTION_PROPERTY, object_id)
    return Translation(machine, obj, text, syntax, lib_dir, file_contents(model, lib_dir))


def translate(domain: Domain, options: CmdlineOptions = CmdlineOptions(),
              model: LaunchSecurity | None = None) -> Translation:
    """Translate a domain; `model` overrides its launch security (e.g. with host values filled in)."""
    launch_security = model if model is not None else domain.launch_security
    if launch_security is None:
        raise SevhookError(f"domain '{domain.name}' has no <launchSecurity>: there is nothing to translate")
    lib_dir = options.lib_dir or default_lib_dir(domain)
    return translate_launch_security(launch_security, lib_dir, options)
