"""What QEMU's target/i386/sev.c does, against the software processor: the launch sequence in QEMU's order
(LAUNCH_START with the owner's GODH and session files; LAUNCH_UPDATE_DATA over the flash image, then the
kernel-hashes table; LAUNCH_UPDATE_VMSA per vCPU for SEV-ES; LAUNCH_MEASURE; LAUNCH_FINISH on the first
run) and the SEV QMP commands with QEMU's replies and error messages."""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sevhook.encoding import decode_base64
from sevhook.errors import FormatError, SevhookError, UsageError
from sevhook.sev.cpu_types import cpu_model
from sevhook.sev.kernel_hashes import kernel_hashes_table
from sevhook.sev.ovmf import SECRET_AREA_GUID, OvmfFooter
from sevhook.sev.vmsa import vcpu_vmsas
from sevhook.sim.argv import DEFAULT_BIOS, QemuInvocation, SevGuestObject
from sevhook.sim.firmware_errors import FirmwareError
from sevhook.sim.guest import GuestContext, GuestState
from sevhook.sim.platform import SoftwarePlatform
from sevhook.sim.qmp_protocol import GENERIC_ERROR, QmpError

DEFAULT_CPU_MODEL = "EPYC-v4"
FOUR_GIB = 1 << 32
LOW_RAM_LIMIT = 0x8000_0000  # q35/i440fx keep at most 2-3 GiB below 4 GiB; 2 GiB is the safe bound


class LaunchFailed(SevhookError):
    """QEMU would have exited during start-up; `lines` are what it prints on stderr."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("; ".join(lines))
        self.lines = lines


def qemu_version_tuple(text: str | None, default: tuple[int, int, int] = (7, 2, 22)) -> tuple[int, int, int]:
    if not text:
        return default
    try:
        parts = [int(part) for part in text.strip().split(".")]
    except ValueError as exc:
        raise UsageError(f"--sim-qemu-version {text!r}: expected MAJOR.MINOR[.MICRO], e.g. 7.2.22 or 9.1.0") from exc
    parts = [*parts, 0, 0, 0][:3]
    return parts[0], parts[1], parts[2]


def _read_base64_file(path: str, what: str) -> bytes:
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise LaunchFailed([f"sev_read_file_base64: Failed to read {path} ({exc.strerror})"]) from exc
    try:
        return decode_base64(text.decode("latin-1"))
    except FormatError as exc:
        raise LaunchFailed([f"sev_launch_start: {what} file {path} is not valid base64"]) from exc


def _read_file(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise LaunchFailed([f"could not load {what} '{path}': {exc.strerror}"]) from exc


@dataclass
class SevLaunch:
    """One guest's launch as QEMU drives it; `guest` is the firmware context."""

    invocation: QemuInvocation
    sev: SevGuestObject
    guest: GuestContext
    secret_area: int | None = None  # the OVMF footer's secret-area base, when the firmware has the entry
    ram_bytes: int = 0
    ram_file: str | None = None  # wrapping mode: the real TCG guest's RAM (a shared memory-backend-file)
    finished: bool = False

    @classmethod
    def run(cls, platform: SoftwarePlatform, inv: QemuInvocation) -> SevLaunch:
        """KVM init -> LAUNCH_START; board init -> LAUNCH_UPDATE_DATA; machine-init-done -> VMSAs, MEASURE."""
        sev = inv.sev
        assert sev is not None
        godh = _read_base64_file(sev.dh_cert_file, "dh-cert") if sev.dh_cert_file else None
        session = _read_base64_file(sev.session_file, "session") if sev.session_file else None
        try:
            guest = platform.launch_start(sev.policy, godh, session, label=inv.name, handle=sev.handle)
        except FirmwareError as exc:
            raise LaunchFailed([
                f"sev_launch_start: LAUNCH_START ret=-1 fw_error={exc.fw_error} '{exc.text}'",
                "sev_kvm_init: failed to create encryption context",
                f"(sevhook-sim: {exc.detail})",
            ]) from exc
        launch = cls(inv, sev, guest, ram_bytes=inv.ram_bytes)
        try:
            launch._update()
            if not inv.start_paused:
                launch.finish()
        except BaseException:
            guest.end()
            raise
        return launch

    def _update(self) -> None:
        inv = self.invocation
        firmware_path = inv.firmware or str(DEFAULT_BIOS)
        firmware = _read_file(firmware_path, "firmware")
        footer: OvmfFooter | None
        try:
            footer = OvmfFooter.read(firmware)
        except SevhookError:
            footer = None  # no OVMF footer table (e.g. SeaBIOS): no secret area, no hashes, no ES reset block
        if footer is not None and SECRET_AREA_GUID in footer.entries:
            # QEMU takes the entry's base as it is, even 0 (Debian's OVMF declares the entry empty)
            self.secret_area = int.from_bytes(footer.entries[SECRET_AREA_GUID][:4], "little")
        self._fw_command(lambda: self.guest.launch_update_data(firmware, "firmware"), "LAUNCH_UPDATE_DATA",
                         "sev_launch_update_data")
        if self.sev.kernel_hashes and inv.kernel:
            self._kernel_hashes(footer)
        if self.guest.es:
            self._vmsas(footer)
        self._fw_command(self.guest.launch_measure, "LAUNCH_MEASURE", "sev_launch_get_measure")

    def _kernel_hashes(self, footer: OvmfFooter | None) -> None:
        if footer is None:
            raise LaunchFailed(["SEV: kernel specified but guest firmware has no hashes table GUID"])
        if footer.hash_table is None:
            raise LaunchFailed(["SEV: guest firmware hashes table area is invalid (base=0x0 size=0x0)"])
        inv = self.invocation
        try:
            table = kernel_hashes_table(inv.kernel, inv.initrd, inv.append)  # type: ignore[arg-type]
        except SevhookError as exc:
            raise LaunchFailed([f"SEV: cannot hash the kernel, initrd or command line: {exc.message}"]) from exc
        self._fw_command(lambda: self.guest.launch_update_data(table, "kernel-hashes"), "LAUNCH_UPDATE_DATA",
                         "sev_launch_update_data")

    def _vmsas(self, footer: OvmfFooter | None) -> None:
        eip = footer.reset_eip if footer is not None else None
        if eip is None:
            raise LaunchFailed(["SEV: SEV-ES guest requires an OVMF with the SEV-ES reset block "
                                "(footer GUID 00f771de-1a7e-4fcb-890e-68c77e2fb44e)"])
        try:
            signature = cpu_model(self.invocation.cpu_model or DEFAULT_CPU_MODEL).signature
        except SevhookError:
            signature = cpu_model(DEFAULT_CPU_MODEL).signature  # qemu64/max/host: measured as EPYC-v4
        for vmsa in vcpu_vmsas(self.invocation.vcpus, eip, signature):
            page = vmsa.to_bytes()
            self._fw_command(lambda page=page: self.guest.launch_update_vmsa(page), "LAUNCH_UPDATE_VMSA",
                             "sev_launch_update_vmsa")

    def _fw_command(self, call: Callable[[], object], command: str, function: str) -> None:
        try:
            call()
        except FirmwareError as exc:
            raise LaunchFailed([f"{function}: {command} ret=-1 fw_error={exc.fw_error} '{exc.text}'"]) from exc

    def finish(self) -> None:
        """LAUNCH_FINISH, when the guest first runs (QEMU's vm state change handler)."""
        if self.guest.state == GuestState.LSECRET:
            try:
                self.guest.launch_finish()
            except FirmwareError as exc:
                raise LaunchFailed([f"sev_launch_finish: LAUNCH_FINISH ret=-1 fw_error={exc.fw_error} "
                                    f"'{exc.text}'"]) from exc
        self.finished = True


class SevMonitor:
    """The SEV QMP commands as QEMU answers them, for one process (launch is None: SEV not in use)."""

    def __init__(self, platform: SoftwarePlatform, launch: SevLaunch | None,
                 qemu_version: tuple[int, int, int]) -> None:
        self.platform = platform
        self.launch = launch
        self.qemu_version = qemu_version

    COMMANDS = ("query-sev", "query-sev-launch-measure", "query-sev-capabilities", "sev-inject-launch-secret",
                "query-sev-attestation-report")

    def execute(self, command: str, arguments: dict) -> object:
        method = getattr(self, command.replace("-", "_"))
        return method(**{key.replace("-", "_"): value for key, value in arguments.items()})

    def query_sev(self) -> dict:
        launch = self.launch
        new_shape = self.qemu_version >= (9, 1, 0)
        if launch is None:
            if new_shape:
                return {"enabled": False, "api-major": 0, "api-minor": 0, "build-id": 0, "state": "uninit",
                        "sev-type": "sev", "policy": 0, "handle": 0}
            return {"enabled": False, "api-minor": 0, "handle": 0, "state": "uninit", "api-major": 0,
                    "build-id": 0, "policy": 0}
        config = self.platform.config
        guest = launch.guest
        if new_shape:
            return {"enabled": True, "api-major": config.api_major, "api-minor": config.api_minor,
                    "build-id": config.build_id, "state": guest.state.qmp_name, "sev-type": "sev",
                    "policy": guest.policy, "handle": guest.handle}
        return {"enabled": True, "api-minor": config.api_minor, "handle": guest.handle,
                "state": guest.state.qmp_name, "api-major": config.api_major, "build-id": config.build_id,
                "policy": guest.policy}

    def query_sev_launch_measure(self) -> dict:
        launch = self.launch
        if launch is None or launch.guest.measurement is None or launch.guest.mnonce is None:
            raise QmpError(GENERIC_ERROR, "SEV launch measurement is not available")
        blob = launch.guest.measurement + launch.guest.mnonce
        return {"data": base64.b64encode(blob).decode()}

    def query_sev_capabilities(self) -> dict:
        return self.platform.qmp_capabilities()

    def sev_inject_launch_secret(self, packet_header: str, secret: str, gpa: int | None = None) -> dict:
        launch = self.launch
        if launch is None:
            raise QmpError(GENERIC_ERROR, "SEV not enabled for guest")
        if gpa is None:
            if launch.secret_area is None:
                raise QmpError(GENERIC_ERROR, "SEV: no secret area found in OVMF, gpa must be specified.")
            gpa = launch.secret_area
        gpa &= (1 << 64) - 1
        guest = launch.guest
        if guest.state != GuestState.LSECRET:
            raise QmpError(GENERIC_ERROR, f"SEV: Not in correct state. (LSECRET) {int(guest.state):x}")
        header = _glib_b64decode(packet_header)
        if not header:
            raise QmpError(GENERIC_ERROR, "SEV: Failed to decode sequence header")
        data = _glib_b64decode(secret)
        if not data:
            raise QmpError(GENERIC_ERROR, "SEV: Failed to decode data")
        if not _mapped(gpa, len(data), launch.ram_bytes):
            raise QmpError(GENERIC_ERROR, f"SEV: Failed to calculate guest address: No memory is mapped at "
                                          f"address 0x{gpa:x}")
        try:
            plaintext = guest.launch_secret(header, data, gpa, len(data))
        except FirmwareError as exc:
            raise QmpError(GENERIC_ERROR, f"SEV: failed to inject secret ret=-1 fw_error={exc.fw_error} "
                                          f"'{exc.text}'") from exc
        if launch.ram_file is not None:
            write_guest_memory(launch.ram_file, gpa, plaintext, launch.ram_bytes)
        return {}

    def query_sev_attestation_report(self, mnonce: str) -> dict:
        launch = self.launch
        if launch is None:
            raise QmpError(GENERIC_ERROR, "SEV is not enabled")
        nonce = _glib_b64decode(mnonce)
        if len(nonce) != 16:
            raise QmpError(GENERIC_ERROR, f"SEV: mnonce must be 16 bytes (got {len(nonce)})")
        try:
            report = launch.guest.attestation(nonce)
        except FirmwareError as exc:
            raise QmpError(GENERIC_ERROR, f"SEV: Failed to query the attestation report length ret=-1 "
                                          f"fw_err={exc.fw_error} ({exc.text})") from exc
        return {"data": base64.b64encode(report).decode()}


def _glib_b64decode(text: str) -> bytes:
    """g_base64_decode: skips characters outside the alphabet and never fails."""
    cleaned = "".join(ch for ch in text if ch.isalnum() or ch in "+/")
    cleaned = cleaned[: len(cleaned) - len(cleaned) % 4] if len(cleaned) % 4 == 1 else cleaned
    try:
        return base64.b64decode(cleaned + "=" * (-len(cleaned) % 4))
    except (binascii.Error, ValueError):
        return b""


def write_guest_memory(ram_file: str, gpa: int, data: bytes, ram_bytes: int) -> None:
    """What LAUNCH_SECRET does to the guest: the decrypted secret at `gpa` of its RAM. In wrapping mode the
    real QEMU's RAM is a shared file (low RAM first, then the RAM above 4 GiB), written here in place."""
    low = min(ram_bytes, LOW_RAM_LIMIT)
    offset = gpa if gpa < low else low + gpa - FOUR_GIB
    try:
        fd = os.open(ram_file, os.O_WRONLY)
    except OSError as exc:
        raise QmpError(GENERIC_ERROR, f"SEV: failed to inject secret: guest RAM {ram_file}: "
                                      f"{exc.strerror or exc}") from exc
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def _mapped(gpa: int, length: int, ram_bytes: int) -> bool:
    """Whether [gpa, gpa+length) is guest RAM: below 4 GiB up to the low-RAM bound, the rest above 4 GiB."""
    low = min(ram_bytes, LOW_RAM_LIMIT)
    if gpa + length <= low:
        return True
    high = ram_bytes - low
    return high > 0 and FOUR_GIB <= gpa and gpa + length <= FOUR_GIB + high
