"""The generic interposition: a real QEMU child with private monitor sockets in a 0700 directory, and
a relay in front of each monitor the caller (libvirt) asked for. Everything is relayed byte for byte;
a subclass of Interposer sees each negotiated command first and may answer it itself, and sees every
event. The caller's listening fds and paths stay with the interposer; the child dies with it
(PR_SET_PDEATHSIG), signals are forwarded, its exit status is returned, and its stderr goes where
ours goes (libvirt's log). The child itself (its private sockets, its command line, starting it) is
sevhook.interpose.child, which needs no asyncio: a caller may start it before importing this module
and hand it over (`adopt`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
from collections import deque
from collections.abc import Callable

from sevhook.interpose.child import PrivateMonitors
from sevhook.sim.argv import MonitorSpec
from sevhook.sim.qmp_protocol import StreamSplitter
from sevhook.sim.qmp_server import Connection, MonitorListener

UPSTREAM_TIMEOUT = 60.0
DRAIN_TIMEOUT = 30.0
STREAM_LIMIT = 256 * 1024 * 1024
SIGNAL_FORWARD = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
KILL_GRACE = 10.0
STDERR_TAIL_LINES = 20
POLL_INTERVAL = 0.002  # while QEMU creates its monitor sockets: each start waits for them
# How QEMU begins a reply line; such a line is relayed without parsing it (libvirt sends hundreds of
# commands at start-up, and each crosses the relay). Any other line is parsed: an event, or odd spacing.
REPLY_PREFIXES = (b'{"return"', b'{"error"')


class ChildProcess:
    """The real QEMU, a subprocess.Popen (started before the event loop, or by `Interposer.start`), as
    the event loop sees it: its exit awaited through a pidfd, its stderr pipe as a StreamReader."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.stderr: asyncio.StreamReader | None = None

    async def connect_stderr(self) -> None:
        if self.popen.stderr is not None:
            reader = asyncio.StreamReader(limit=STREAM_LIMIT)
            await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                               self.popen.stderr)
            self.stderr = reader

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def send_signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    async def wait(self) -> int:
        if self.popen.poll() is None:
            try:
                pidfd = os.pidfd_open(self.popen.pid)
            except OSError:  # reaped meanwhile, or a kernel without pidfds
                pidfd = None
            if pidfd is None:
                while self.popen.poll() is None:
                    await asyncio.sleep(0.05)
            else:
                loop = asyncio.get_running_loop()
                exited = loop.create_future()
                loop.add_reader(pidfd, lambda: exited.done() or exited.set_result(None))
                try:
                    if self.popen.poll() is None:  # not reaped before the pidfd was opened
                        await exited
                finally:
                    loop.remove_reader(pidfd)
                    os.close(pidfd)
        return self.popen.wait()


class UpstreamGone(Exception):
    """The real QEMU closed its monitor or exited."""


class MonitorRelay:
    """One client on one monitor, relayed to a fresh connection to the real QEMU's private socket."""

    def __init__(self, interposer: Interposer, connection: Connection, upstream_path: str) -> None:
        self.interposer = interposer
        self.client = connection
        self.upstream_path = upstream_path
        self.negotiated = False
        self.pending: deque[str] = deque()  # commands relayed and not yet answered, in order
        self.idle = asyncio.Event()  # set while nothing is pending
        self.idle.set()
        self.up_writer: asyncio.StreamWriter | None = None

    async def run(self) -> None:
        try:
            reader, self.up_writer = await self.interposer.connect_upstream(self.upstream_path)
        except UpstreamGone:
            return
        try:
            greeting = await reader.readuntil(b"\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return
        self.interposer.note_greeting(greeting)
        await self.client.send_raw(greeting)
        downstream = asyncio.ensure_future(self._relay_replies(reader))
        upstream = asyncio.ensure_future(self._relay_requests())
        try:
            await asyncio.wait({downstream, upstream}, return_when=asyncio.FIRST_COMPLETED)
            if upstream.done() and not downstream.done():
                # The client left. Wait for the replies still owed before closing: once QEMU sees the
                # connection close, it would deliver them to the next client of this monitor.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.wait_idle(), DRAIN_TIMEOUT)
                downstream.cancel()
            elif downstream.done() and not upstream.done():
                upstream.cancel()
            await asyncio.gather(downstream, upstream, return_exceptions=True)
        finally:
            with contextlib.suppress(Exception):
                self.up_writer.close()

    async def _relay_replies(self, reader: asyncio.StreamReader) -> None:
        """Upstream -> client, verbatim; note replies (for ordering) and show events to the interposer."""
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    await self.client.send_raw(exc.partial)
                return
            except (ConnectionError, asyncio.LimitOverrunError):
                return
            if line.startswith(REPLY_PREFIXES):
                if not self._reply_arrived(succeeded=line.startswith(REPLY_PREFIXES[0])):
                    continue
            else:
                try:
                    message = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    message = None
                if isinstance(message, dict):
                    if "event" in message:
                        self.interposer.observe_event(message)
                    elif ("return" in message or "error" in message) and not self._reply_arrived(
                            succeeded="return" in message):
                        continue
            await self.client.send_raw(line)

    def _reply_arrived(self, succeeded: bool) -> bool:
        """A reply to the oldest relayed command. False when none is owed: QEMU keeps one output queue per
        monitor, so a reply to a command of a client that left arrives on the next connection; it is not
        this client's and is dropped."""
        if not self.pending:
            return False
        command = self.pending.popleft()
        if command == "qmp_capabilities" and succeeded:
            self.negotiated = True
        if not self.pending:
            self.idle.set()
        return True

    async def _relay_requests(self) -> None:
        """Client -> upstream; a negotiated command the interposer takes is not relayed."""
        splitter = StreamSplitter()
        while True:
            data = await self.client.reader.read(65536)
            if not data:
                return
            for parsed in splitter.feed(data):
                value = parsed.value
                command = value.get("execute") if isinstance(value, dict) else None
                if self.negotiated and isinstance(command, str) and isinstance(value, dict):
                    if await self.interposer.intercept(self, command, value):
                        continue
                self.pending.append(command if isinstance(command, str) else "")
                self.idle.clear()
                await self._send_upstream(parsed.raw + b"\n")
                if command == "qmp_capabilities" and not self.negotiated:
                    # what follows depends on whether negotiation succeeded: wait for its reply
                    await self.wait_idle()

    async def wait_idle(self) -> None:
        """Until every relayed command has its reply: a local answer must not overtake them."""
        while self.pending:
            await self.idle.wait()

    async def answer(self, message: dict) -> None:
        """Send a locally made reply, after every earlier reply has gone out."""
        await self.wait_idle()
        await self.client.send(message)

    async def _send_upstream(self, data: bytes) -> None:
        assert self.up_writer is not None
        try:
            self.up_writer.write(data)
            await self.up_writer.drain()
        except (ConnectionError, RuntimeError) as exc:
            raise UpstreamGone() from exc


class Interposer:
    """The real QEMU child, its private monitor sockets, and the relays in front of them. Subclasses
    say how the child's command line looks (`child_argv`) and what to intercept."""

    def __init__(self, argv: list[str], monitors: list[MonitorSpec], *, daemonize: bool = False,
                 dir_prefix: str = "sevhook-", keep_stderr_tail: bool = False,
                 private: PrivateMonitors | None = None) -> None:
        """`private`: the child's private sockets when the caller made them (and started the child) first."""
        self.argv = argv
        self.monitors = monitors
        self.daemonize = daemonize
        self.keep_stderr_tail = keep_stderr_tail  # relay the child's stderr and remember its last lines
        self.stderr_tail: deque[bytes] = deque(maxlen=STDERR_TAIL_LINES)
        self.private = private or PrivateMonitors(argv, monitors, dir_prefix)
        self.private_dir = self.private.directory
        self.private_paths = self.private.paths
        self.extra_sockets = self.private.extra  # private monitors of the interposer's own, waited for too
        self.process: ChildProcess | None = None
        self.listeners: list[MonitorListener] = []
        self._stderr_task: asyncio.Future | None = None

    # --- what subclasses decide -------------------------------------------------------------------
    def child_argv(self) -> list[str]:
        """The real QEMU's arguments (without the program); by default only the monitors change."""
        return self.private.child_argv()

    async def intercept(self, relay: MonitorRelay, command: str, request: dict) -> bool:
        """A negotiated command from a client: True when it was answered here (not relayed)."""
        return False

    def observe_event(self, message: dict) -> None:
        """An event from the real QEMU, before it is relayed."""

    def note_greeting(self, line: bytes) -> None:
        """The real QEMU's QMP greeting, before it is relayed."""

    def child_failed_early(self) -> None:
        """The real QEMU exited before its monitors were up (its stderr was relayed already)."""

    # --- the child --------------------------------------------------------------------------------
    def extra_socket(self, name: str) -> str:
        """A private monitor path of the interposer's own (the caller adds the option to the argv)."""
        return self.private.extra_socket(name)

    async def start(self, binary: str) -> None:
        """Start the child now (relaying its stderr, to wherever fd 2 points, when asked to or when
        daemonized)."""
        popen = self.private.spawn(binary, self.child_argv(), relay_stderr=self.keep_stderr_tail,
                                   daemonize=self.daemonize)
        await self.adopt(popen)

    async def adopt(self, popen: subprocess.Popen[bytes]) -> None:
        """Take over a child started from `self.private` (by `start`, or by the caller before the loop)."""
        self.process = ChildProcess(popen)
        await self.process.connect_stderr()
        if self.process.stderr is not None:
            tail = self.stderr_tail if self.keep_stderr_tail else None
            self._stderr_task = asyncio.ensure_future(_copy_to_stderr(self.process.stderr, tail))

    async def wait_monitors_ready(self) -> bool:
        """Until every private monitor socket exists, or QEMU exits (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + UPSTREAM_TIMEOUT
        assert self.process is not None
        paths = [*self.private_paths.values(), *self.extra_sockets]
        while not all(os.path.exists(path) for path in paths):
            if self.process.returncode is not None or loop.time() > deadline:
                return False
            await asyncio.sleep(POLL_INTERVAL)
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
                await asyncio.sleep(POLL_INTERVAL)

    async def _session(self, spec: MonitorSpec, connection: Connection) -> None:
        await MonitorRelay(self, connection, self.private_paths[spec.option_index]).run()

    def kill(self, signum: int) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)

    async def serve(self, sockets: list[socket.socket]) -> int:
        """Relay every monitor until the child exits; its exit status (128+N for a signal)."""
        loop = asyncio.get_running_loop()
        for signum in SIGNAL_FORWARD:
            loop.add_signal_handler(signum, self._forward_signal, signum)
        self.listeners = [
            MonitorListener(spec, sock, lambda connection, spec=spec: self._session(spec, connection))
            for spec, sock in zip(self.monitors, sockets, strict=True)
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

    async def run(self, binary: str, sockets: list[socket.socket], ready: Callable[[], None]) -> int:
        """Start the child, wait for its monitors (`ready()` then), serve; a child that dies first
        is QEMU's failure (its stderr already said why)."""
        await self.start(binary)
        if not await self.wait_monitors_ready():
            assert self.process is not None
            self.kill(signal.SIGKILL)
            code = await self.process.wait()
            if self._stderr_task is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._stderr_task), 1.0)
            self.child_failed_early()
            return code if code > 0 else 1
        ready()
        return await self.serve(sockets)

    def _forward_signal(self, signum: int) -> None:
        self.kill(signum)
        asyncio.get_running_loop().call_later(KILL_GRACE, self.kill, signal.SIGKILL)

    def cleanup(self) -> None:
        self.private.cleanup()


async def _copy_to_stderr(stream: asyncio.StreamReader, tail: deque[bytes] | None) -> None:
    while True:
        try:
            chunk = await stream.readline() if tail is not None else await stream.read(4096)
        except (ValueError, asyncio.LimitOverrunError):  # a line longer than the reader's limit
            chunk = await stream.read(4096)
        if not chunk:
            return
        if tail is not None:
            tail.append(chunk)
        with contextlib.suppress(OSError):
            os.write(2, chunk)
