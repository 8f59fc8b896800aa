"""Where a launch secret lands: QEMU's sev-inject-launch-secret writes the packet at the base of the
firmware's SEV secret area (OVMF footer entry 4c2eb361-...) without looking at its size, so a firmware
without a usable area (stock OVMF builds have none; OvmfPkg/AmdSev builds do) would receive the owner's
secret at guest address 0, where nothing reads it. Every place that registers or injects a secret asks
this module first, and refuses instead of pretending the secret arrived."""

from __future__ import annotations

from pathlib import Path

from sevhook.errors import FormatError, SevhookError
from sevhook.sev.inputs import BinaryInput, input_name
from sevhook.sev.ovmf import GuestRegion, OvmfFooter

AMDSEV_ADVICE = ("use an AmdSev OVMF build (OvmfPkg/AmdSev, e.g. Debian/Ubuntu's OVMF.amdsev.fd or "
                 "/usr/share/edk2/ovmf/OVMF.amdsev.fd), whose footer table has the SEV launch-secret area")


class NoSecretArea(SevhookError):
    """The firmware cannot receive a launch secret of the needed size."""


def read_secret_area(firmware: BinaryInput) -> GuestRegion | None:
    """The firmware's SEV secret area (base, size) from its OVMF footer table, as QEMU finds it; None when
    the table has no such entry. A zero base or size is returned as is: the caller judges it."""
    return OvmfFooter.read(firmware).secret_area_entry


def require_secret_area(firmware: BinaryInput, needed: int) -> GuestRegion:
    """The area, when it exists, has a non-zero base and holds `needed` bytes; else NoSecretArea naming the
    firmware, what is wrong and what firmware to use."""
    name = input_name(firmware, "firmware")
    try:
        area = read_secret_area(firmware)
    except FormatError as exc:
        raise NoSecretArea(f"{name}: cannot read its OVMF footer table ({exc.message}); {AMDSEV_ADVICE}") from exc
    if area is None:
        problem = "has no SEV launch-secret area in its OVMF footer table"
    elif area.base == 0 or area.size == 0:
        problem = f"has an empty SEV launch-secret area (base {area.base:#x}, size {area.size:#x})"
    elif area.size < needed:
        problem = (f"has a SEV launch-secret area of {area.size:#x} bytes, smaller than the {needed}-byte "
                   "secret table")
    else:
        return area
    where = ("QEMU finds nowhere to inject the secret" if area is None else
             f"QEMU would write the secret at guest address {area.base:#x}, where the guest never reads it")
    raise NoSecretArea(f"{name} {problem}: {where}; {AMDSEV_ADVICE}")


def check_injection_target(loader: str | None, secret_b64: str) -> None:
    """Before sev-inject-launch-secret: the domain's loader file must have a secret area that holds the
    packet's payload (NoSecretArea otherwise). With no <loader> path in the XML there is no file to read
    (libvirt names the firmware it chose in the live XML), so nothing is checked."""
    if loader is None:
        return
    import base64  # noqa: PLC0415  (the hook's hot path: only with a loader file)

    require_secret_area(Path(loader), len(base64.b64decode(secret_b64)))
