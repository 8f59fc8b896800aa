"""Wrapping mode: run the real qemu-system-x86_64 with the SEV parts removed and TCG forced, and sit in
front of every QMP monitor. Everything is relayed byte for byte, except the SEV commands, which the
software processor answers, and `cont`, which first finishes the SEV launch. libvirtd can therefore use
`sevhook-sim-qemu` as <emulator>: its capability probe, its monitor and the SEV APIs all work.

The interposition itself (private monitor sockets in a 0700 directory, relaying, signals, exit status,
parent-death signal) is sevhook.interpose.core, shared with the attesting wrapper `sevhook-qemu`; this
module is the stand-in's argv rewrite and what it intercepts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys

from sevhook.errors import UsageError
from sevhook.interpose.child import private_monitor_value
from sevhook.interpose.core import Interposer, MonitorRelay
from sevhook.qemu_cmdline.options import split_keyval_parts
from sevhook.sim.argv import PROG, SIM_FLAGS, SIM_OPTIONS, QemuInvocation, split_options
from sevhook.sim.lifecycle import Daemon, run_launched
from sevhook.sim.platform import SoftwarePlatform
from sevhook.sim.qemu_sev import LaunchFailed, SevLaunch, SevMonitor, qemu_version_tuple
from sevhook.sim.qmp_protocol import SCHEMAS, QmpError, RequestError, check_arguments, check_request, error_reply, reply

REAL_QEMU_ENV = "SEVHOOK_SIM_QEMU"
DEFAULT_REAL_QEMU = "/usr/bin/qemu-system-x86_64"


def real_qemu_binary(inv: QemuInvocation) -> str:
    binary = inv.qemu_binary or os.environ.get(REAL_QEMU_ENV) or DEFAULT_REAL_QEMU
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        raise UsageError(f"the real QEMU {binary} is not an executable file (set --sim-qemu-binary or "
                         f"${REAL_QEMU_ENV}, or use --sim-standalone)")
    return binary


def _rewrite_machine(value: str, sev_id: str | None, force_tcg: bool) -> str:
    kept = []
    for position, part in enumerate(split_keyval_parts(value)):
        key = part.partition("=")[0] if position or "=" in part else "type"
        if sev_id is not None and key in ("confidential-guest-support", "memory-encryption"):
            continue
        kept.append("accel=tcg" if key == "accel" and force_tcg else part)
    return ",".join(kept)


def rewrite_argv(inv: QemuInvocation, private_paths: dict[int, str], ram_file: str | None = None) -> list[str]:  # noqa: PLR0912  (a branch per option)
    """The real QEMU's command line: no SEV object or machine link, TCG instead of KVM (except for
    libvirt's `-machine none` probe), private monitor sockets, no -daemonize/-pidfile/--sim-* options;
    with `ram_file`, guest RAM in that shared file, so LAUNCH_SECRET can write the secret into it."""
    argv = inv.argv
    force_tcg = not inv.is_probe
    sev_id = inv.sev.object_id if inv.sev is not None else None
    out: list[str] = []
    saw_accel = False
    wants_kvm = False
    for option in split_options(argv):
        index, name, value = option.index, option.name, option.value
        if name in SIM_FLAGS or name in SIM_OPTIONS or name in ("daemonize", "pidfile"):
            continue
        if name == "enable-kvm":
            wants_kvm = True
            continue
        if value is None:
            out.append(f"-{name}")
            continue
        if not name:  # a bare disk image word
            out.append(value)
            continue
        if index == inv.sev_object_index:
            continue
        if index in private_paths:
            spec = next(spec for spec in inv.monitors if spec.option_index == index)
            out += [f"-{name}", private_monitor_value(spec, private_paths[index])]
            continue
        if name in ("machine", "M"):
            value = _rewrite_machine(value, sev_id, force_tcg)
        elif name == "accel":
            saw_accel = True
            if force_tcg:
                parts = split_keyval_parts(value)
                parts[0] = "tcg" if "=" not in parts[0] else "accel=tcg"
                value = ",".join(part for part in parts if not part.startswith("kernel-irqchip"))
        elif name == "cpu" and force_tcg:
            parts = split_keyval_parts(value)
            if parts[0] == "host":
                parts[0] = "max"
                value = ",".join(part for part in parts if not part.startswith(("migratable", "host-")))
        out += [f"-{name}", value]
    if wants_kvm and not saw_accel:
        out += ["-accel", "tcg" if force_tcg else "kvm"]
    if ram_file is not None:
        out += ["-object", f"memory-backend-file,id=sevhook-sim-ram,size={inv.ram_bytes},mem-path={ram_file},"
                "share=on", "-machine", "memory-backend=sevhook-sim-ram"]
    return out


class QemuWrapper(Interposer):
    """The stand-in's interposition: the software processor answers the SEV commands, and the
    guest's first run (`cont` or a RESUME event) finishes the SEV launch."""

    def __init__(self, inv: QemuInvocation, platform: SoftwarePlatform, launch: SevLaunch | None,
                 version: tuple[int, int, int]) -> None:
        super().__init__(inv.argv, inv.monitors, daemonize=inv.daemonize, dir_prefix="sevhook-sim-")
        self.inv = inv
        self.launch = launch
        self.sev = SevMonitor(platform, launch, version)
        if launch is not None:  # the firmware's LAUNCH_SECRET writes into the TCG guest's RAM, shared here
            launch.ram_file = str(self.private_dir / "guest-ram")

    def child_argv(self) -> list[str]:
        return rewrite_argv(self.inv, self.private_paths, self.launch.ram_file if self.launch else None)

    def note_greeting(self, line: bytes) -> None:
        """The query-sev shape follows the real QEMU's version, read from its QMP greeting."""
        if self.inv.qemu_version is not None:
            return
        with contextlib.suppress(Exception):
            version = json.loads(line)["QMP"]["version"]["qemu"]
            self.sev.qemu_version = (int(version["major"]), int(version["minor"]), int(version["micro"]))

    def observe_event(self, message: dict) -> None:
        if message.get("event") == "RESUME":
            self.guest_resumed()

    def intercepts(self, command: str) -> bool:
        return command in SevMonitor.COMMANDS or command == "cont"

    async def intercept(self, relay: MonitorRelay, command: str, request: dict) -> bool:
        if command in SevMonitor.COMMANDS:
            await relay.answer(self._execute_sev(request))
            return True
        if command == "cont":
            self.guest_resumed()
        return False

    def _execute_sev(self, value: dict) -> dict:
        msg_id = value.get("id")
        try:
            request = check_request(value)
            check_arguments(request.command, request.arguments, SCHEMAS[request.command])
            result = self.sev.execute(request.command, request.arguments)
        except RequestError as exc:
            return error_reply(exc, exc.msg_id)
        except QmpError as exc:
            return error_reply(exc, msg_id)
        return reply(result, msg_id)

    def guest_resumed(self) -> None:
        """QEMU's vm state change to running: LAUNCH_FINISH once (a failure ends QEMU, as in QEMU)."""
        if self.launch is None or self.launch.finished:
            return
        try:
            self.launch.finish()
        except LaunchFailed as exc:
            for line in exc.lines:
                print(f"{PROG}: {line}", file=sys.stderr)
            self.kill(signal.SIGKILL)


def run_wrapped(inv: QemuInvocation) -> int:
    """The wrapper's life: launch (SEV), fork if -daemonize, start QEMU, serve until it exits."""
    binary = real_qemu_binary(inv)
    if inv.wants_help:
        stripped = rewrite_argv(inv, {})
        os.execv(binary, [binary, *stripped])

    def serve(platform: SoftwarePlatform, launch: SevLaunch | None, sockets: list[socket.socket],
              daemon: Daemon) -> int:
        wrapper = QemuWrapper(inv, platform, launch, qemu_version_tuple(inv.qemu_version))
        try:
            return asyncio.run(_run(wrapper, binary, daemon, sockets))
        finally:
            wrapper.cleanup()

    return run_launched(inv, serve)


async def _run(wrapper: QemuWrapper, binary: str, daemon: Daemon, sockets: list[socket.socket]) -> int:
    return await wrapper.run(binary, sockets, daemon.ready)
