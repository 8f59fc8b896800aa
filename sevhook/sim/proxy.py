"""Wrapping mode: run the real qemu-system-x86_64 with the SEV parts removed and TCG forced, and sit in
front of every QMP monitor. Everything is relayed byte for byte, except the SEV commands, which the
software processor answers, and `cont`, which first finishes the SEV launch. libvirtd can therefore use
`sevhook-sim-qemu` as <emulator>: its capability probe, its monitor and the SEV APIs all work.

The real QEMU gets private monitor sockets in a 0700 directory; libvirt's listening fds and paths stay
with the wrapper. The child dies with the wrapper (PR_SET_PDEATHSIG), so a SIGKILL leaks nothing."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections import deque
from pathlib import Path

from sevhook.errors import UsageError
from sevhook.qemu_cmdline.options import split_keyval_parts
from sevhook.sim.argv import (
    PROG,
    SIM_FLAGS,
    SIM_OPTIONS,
    MonitorSpec,
    QemuInvocation,
    inherited_fds,
    split_options,
)
from sevhook.sim.lifecycle import Daemon, run_launched
from sevhook.sim.platform import SoftwarePlatform
from sevhook.sim.qemu_sev import LaunchFailed, SevLaunch, SevMonitor, qemu_version_tuple
from sevhook.sim.qmp_protocol import (
    SCHEMAS,
    QmpError,
    RequestError,
    StreamSplitter,
    check_arguments,
    check_request,
    error_reply,
    reply,
)
from sevhook.sim.qmp_server import Connection, MonitorListener

REAL_QEMU_ENV = "SEVHOOK_SIM_QEMU"
DEFAULT_REAL_QEMU = "/usr/bin/qemu-system-x86_64"
UPSTREAM_TIMEOUT = 60.0
DRAIN_TIMEOUT = 30.0
STREAM_LIMIT = 256 * 1024 * 1024
PR_SET_PDEATHSIG = 1
SIGNAL_FORWARD = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


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
        if key == "accel" and force_tcg:
            part = "accel=tcg"
        kept.append(part)
    return ",".join(kept)


def rewrite_argv(inv: QemuInvocation, private_paths: dict[int, str], ram_file: str | None = None) -> list[str]:
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
            out += [f"-{name}", _private_monitor_value(spec, private_paths[index])]
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


def _private_monitor_value(spec: MonitorSpec, path: str) -> str:
    if spec.option == "qmp":
        return f"unix:{path},server=on,wait=off"
    return f"socket,id={spec.chardev_id},path={path},server=on,wait=off"


def _set_parent_death_signal() -> None:
    """Runs in the child before exec: die with the wrapper even if it is SIGKILLed."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class UpstreamGone(Exception):
    """The real QEMU closed its monitor or exited."""


class ProxySession:
    """One client on one monitor, relayed to a fresh connection to the real QEMU's private socket."""

    def __init__(self, wrapper: QemuWrapper, connection: Connection, upstream_path: str) -> None:
        self.wrapper = wrapper
        self.client = connection
        self.upstream_path = upstream_path
        self.negotiated = False
        self.pending: deque[str] = deque()  # commands relayed and not yet answered, in order
        self.idle = asyncio.Condition()
        self.up_writer: asyncio.StreamWriter | None = None

    async def run(self) -> None:
        try:
            reader, self.up_writer = await self.wrapper.connect_upstream(self.upstream_path)
        except UpstreamGone:
            return
        try:
            greeting = await reader.readuntil(b"\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return
        self.wrapper.note_greeting(greeting)
        await self.client.send_raw(greeting)
        downstream = asyncio.ensure_future(self._relay_replies(reader))
        upstream = asyncio.ensure_future(self._relay_requests())
        try:
            await asyncio.wait({downstream, upstream}, return_when=asyncio.FIRST_COMPLETED)
            if upstream.done() and not downstream.done():
                # The client left. Wait for the replies still owed before closing: once QEMU sees the
                # connection close, it would deliver them to the next client of this monitor.
                with contextlib.suppress(asyncio.TimeoutError):
                    async with self.idle:
                        await asyncio.wait_for(self.idle.wait_for(lambda: not self.pending), DRAIN_TIMEOUT)
                downstream.cancel()
            elif downstream.done() and not upstream.done():
                upstream.cancel()
            await asyncio.gather(downstream, upstream, return_exceptions=True)
        finally:
            with contextlib.suppress(Exception):
                self.up_writer.close()

    async def _relay_replies(self, reader: asyncio.StreamReader) -> None:
        """Upstream -> client, verbatim; note replies (for ordering) and RESUME (to finish the launch)."""
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    await self.client.send_raw(exc.partial)
                return
            except (ConnectionError, asyncio.LimitOverrunError):
                return
            try:
                message = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                message = None
            if isinstance(message, dict):
                if "event" in message:
                    if message.get("event") == "RESUME":
                        self.wrapper.guest_resumed()
                elif "return" in message or "error" in message:
                    if not self.pending:
                        # QEMU keeps one output queue per monitor: a reply to a command of a client that
                        # left arrives on the next connection. It is not this client's: drop it.
                        continue
                    command = self.pending.popleft()
                    if command == "qmp_capabilities" and "return" in message:
                        self.negotiated = True
                    async with self.idle:
                        self.idle.notify_all()
            await self.client.send_raw(line)

    async def _relay_requests(self) -> None:
        """Client -> upstream; SEV commands are answered here, once every earlier reply has gone out."""
        splitter = StreamSplitter()
        while True:
            data = await self.client.reader.read(65536)
            if not data:
                return
            for parsed in splitter.feed(data):
                value = parsed.value
                command = value.get("execute") if isinstance(value, dict) else None
                if self.negotiated and command in SevMonitor.COMMANDS:
                    await self._answer_locally(value)
                    continue
                if self.negotiated and command == "cont":
                    self.wrapper.guest_resumed()
                self.pending.append(command if isinstance(command, str) else "")
                await self._send_upstream(parsed.raw + b"\n")
                if command == "qmp_capabilities" and not self.negotiated:
                    # what follows depends on whether negotiation succeeded: wait for its reply
                    async with self.idle:
                        await self.idle.wait_for(lambda: not self.pending)

    async def _send_upstream(self, data: bytes) -> None:
        assert self.up_writer is not None
        try:
            self.up_writer.write(data)
            await self.up_writer.drain()
        except (ConnectionError, RuntimeError) as exc:
            raise UpstreamGone() from exc

    async def _answer_locally(self, value: dict) -> None:
        async with self.idle:
            await self.idle.wait_for(lambda: not self.pending)
        msg_id = value.get("id")
        try:
            request = check_request(value)
            check_arguments(request.command, request.arguments, SCHEMAS[request.command])
            result = self.wrapper.sev.execute(request.command, request.arguments)
        except RequestError as exc:
            await self.client.send(error_reply(exc, exc.msg_id))
        except QmpError as exc:
            await self.client.send(error_reply(exc, msg_id))
        else:
            await self.client.send(reply(result, msg_id))


class QemuWrapper:
    """The real QEMU child, the private monitor sockets, and the listeners in front of them."""

    def __init__(self, inv: QemuInvocation, platform: SoftwarePlatform, launch: SevLaunch | None,
                 version: tuple[int, int, int]) -> None:
        self.inv = inv
        self.launch = launch
        self.sev = SevMonitor(platform, launch, version)
        self.private_dir = Path(tempfile.mkdtemp(prefix="sevhook-sim-", dir=_runtime_dir()))
        self.private_paths = {spec.option_index: str(self.private_dir / f"monitor{n}.sock")
                              for n, spec in enumerate(inv.monitors)}
        if launch is not None:  # the firmware's LAUNCH_SECRET writes into the TCG guest's RAM, shared here
            launch.ram_file = str(self.private_dir / "guest-ram")
        self.process: asyncio.subprocess.Process | None = None
        self.listeners: list[MonitorListener] = []
        self.exit_code = 0
        self._stderr_task: asyncio.Future | None = None

    def note_greeting(self, line: bytes) -> None:
        """The query-sev shape follows the real QEMU's version, read from its QMP greeting."""
        if self.inv.qemu_version is not None:
            return
        with contextlib.suppress(Exception):
            version = json.loads(line)["QMP"]["version"]["qemu"]
            self.sev.qemu_version = (int(version["major"]), int(version["minor"]), int(version["micro"]))

    def guest_resumed(self) -> None:
        """QEMU's vm state change to running: LAUNCH_FINISH once (a failure ends QEMU, as in QEMU)."""
        if self.launch is None or self.launch.finished:
            return
        try:
            self.launch.finish()
        except LaunchFailed as exc:
            for line in exc.lines:
                print(f"{PROG}: {line}", file=sys.stderr)
            self._kill(signal.SIGKILL)

    async def start(self, binary: str) -> None:
        argv = rewrite_argv(self.inv, self.private_paths, self.launch.ram_file if self.launch else None)
        monitor_fds = {spec.fd for spec in self.inv.monitors if spec.fd is not None}
        keep = sorted(fd for fd in inherited_fds(self.inv.argv) - monitor_fds if _fd_open(fd))
        # A daemonized QEMU must not hold the caller's stdio open (libvirt's probe waits for EOF on
        # its stderr pipe): relay stderr ourselves, to wherever fd 2 points (/dev/null once daemonized).
        relay = asyncio.subprocess.PIPE if self.inv.daemonize else None
        self.process = await asyncio.create_subprocess_exec(
            binary, *argv, pass_fds=keep, preexec_fn=_set_parent_death_signal,
            stdin=asyncio.subprocess.DEVNULL if self.inv.daemonize else None,
            stdout=asyncio.subprocess.DEVNULL if self.inv.daemonize else None, stderr=relay,
        )
        if self.process.stderr is not None:
            self._stderr_task = asyncio.ensure_future(_copy_to_stderr(self.process.stderr))

    async def wait_monitors_ready(self) -> bool:
        """Until every private monitor socket exists, or QEMU exits (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + UPSTREAM_TIMEOUT
        assert self.process is not None
        while not all(os.path.exists(path) for path in self.private_paths.values()):
            if self.process.returncode is not None or loop.time() > deadline:
                return False
            await asyncio.sleep(0.01)
        return self.process.returncode is None

    async def connect_upstream(self, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + UPSTREAM_TIMEOUT
        while True:
            if self.process is None or self.process.returncode is not None:
                raise UpstreamGone()
            try:
                return await asyncio.open_unix_connection(path, limit=STREAM_LIMIT)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if loop.time() > deadline:
                    raise UpstreamGone() from exc
                await asyncio.sleep(0.01)

    async def _session(self, spec: MonitorSpec, connection: Connection) -> None:
        await ProxySession(self, connection, self.private_paths[spec.option_index]).run()

    def _kill(self, signum: int) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)

    async def serve(self, sockets: list[socket.socket]) -> int:
        loop = asyncio.get_running_loop()
        for signum in SIGNAL_FORWARD:
            loop.add_signal_handler(signum, self._forward_signal, signum)
        self.listeners = [
            MonitorListener(spec, sock, lambda connection, spec=spec: self._session(spec, connection))
            for spec, sock in zip(self.inv.monitors, sockets)
        ]
        for listener in self.listeners:
            await listener.start()
        assert self.process is not None
        try:
            code = await self.process.wait()
        finally:
            # let the last replies and events (SHUTDOWN) reach the clients before closing
            await asyncio.sleep(0.05)
            for listener in self.listeners:
                await listener.close()
            for signum in SIGNAL_FORWARD:
                loop.remove_signal_handler(signum)
        return code if code >= 0 else 128 - code

    def _forward_signal(self, signum: int) -> None:
        self._kill(signum)
        asyncio.get_running_loop().call_later(10.0, self._kill, signal.SIGKILL)

    def cleanup(self) -> None:
        shutil.rmtree(self.private_dir, ignore_errors=True)


async def _copy_to_stderr(stream: asyncio.StreamReader) -> None:
    while True:
        chunk = await stream.read(4096)
        if not chunk:
            return
        with contextlib.suppress(OSError):
            os.write(2, chunk)


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _runtime_dir() -> str | None:
    for candidate in ("/run", "/tmp"):
        if os.access(candidate, os.W_OK):
            return candidate
    return None


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
    await wrapper.start(binary)
    if not await wrapper.wait_monitors_ready():
        assert wrapper.process is not None
        wrapper._kill(signal.SIGKILL)
        code = await wrapper.process.wait()
        return code if code > 0 else 1
    daemon.ready()
    return await wrapper.serve(sockets)
