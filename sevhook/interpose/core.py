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
import concurrent.futures
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable

from sevhook.interpose.child import PrivateMonitors
from sevhook.sim.argv import MonitorSpec
from sevhook.sim.qmp_protocol import Parsed, StreamSplitter, encode

UPSTREAM_TIMEOUT = 60.0
DRAIN_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0  # a relay thread told to stop, or waiting for the event loop, at most
STREAM_LIMIT = 256 * 1024 * 1024
READ_SIZE = 65536
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


class MonitorRelay:
    """One client of one monitor, relayed to a fresh connection to the real QEMU's private socket by a
    thread of its own: libvirt sends hundreds of commands at every start, and a plain poll loop moves
    each one for a fraction of what an asyncio round costs. The interposer's decisions stay on the event
    loop: a command it may take (`Interposer.intercepts`) is handed to `Interposer.intercept` there, and
    later requests of this client wait until it decided; events and the greeting are shown to it there
    too. Replies go out in QEMU's order; a locally made answer (`answer`) after every earlier reply."""

    def __init__(self, interposer: Interposer, client: socket.socket, upstream_path: str, pretty: bool) -> None:
        self.interposer = interposer
        self.client = client
        self.upstream_path = upstream_path
        self.pretty = pretty
        self.loop = asyncio.get_running_loop()
        self.negotiated = False
        self.pending: deque[str] = deque()  # commands relayed and not yet answered, in order
        self._lock = threading.Lock()  # pending and its idle waiters, shared with the event loop
        self._idle_waiters: list[asyncio.Future] = []
        self._backlog: deque[Parsed] = deque()  # requests read and not yet relayed or decided
        self._decision: concurrent.futures.Future | None = None  # an intercept in progress on the loop
        self._held: tuple[Parsed, str] | None = None  # the request it decides on
        self._negotiating = False  # qmp_capabilities relayed: what follows waits for its reply
        self._outbox: deque[bytes] = deque()  # local answers, written by the relay thread
        self._stopping = False
        self._client_open = True
        self._partial = b""  # QEMU's output after its last complete line
        self._greeted = False
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)

    # --- on the event loop --------------------------------------------------------------------------
    async def run(self) -> None:
        """Relay until either side leaves (or the monitor closes: cancelled)."""
        finished = self.loop.create_future()

        def relay() -> None:
            try:
                self._relay()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    self.loop.call_soon_threadsafe(_resolve, finished)

        threading.Thread(target=relay, name="sevhook-relay", daemon=True).start()
        try:
            await asyncio.shield(finished)
        except asyncio.CancelledError:
            self.stop()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(finished, STOP_TIMEOUT)
            raise
        finally:
            os.close(self._wake_read)
            os.close(self._wake_write)

    def stop(self) -> None:
        self._stopping = True
        self._wake()

    async def wait_idle(self) -> None:
        """Until every relayed command has its reply: a local answer must not overtake them."""
        while True:
            with self._lock:
                if not self.pending:
                    return
                waiter = self.loop.create_future()
                self._idle_waiters.append(waiter)
            await waiter

    async def answer(self, message: dict) -> None:
        """Send a locally made reply, after every earlier reply has gone out."""
        await self.wait_idle()
        self._outbox.append(encode(message, self.pretty))
        self._wake()

    # --- in the relay thread ------------------------------------------------------------------------
    def _relay(self) -> None:
        upstream = self._connect_upstream()
        if upstream is None:
            return
        try:
            self._pump(upstream)
        except (OSError, ValueError):  # a monitor reset under us, or a stream beyond STREAM_LIMIT
            pass
        finally:
            upstream.close()
            if self._decision is not None:
                self._decision.cancel()
            self._release_idle_waiters()

    def _connect_upstream(self) -> socket.socket | None:
        deadline = time.monotonic() + UPSTREAM_TIMEOUT
        while not self._stopping:
            process = self.interposer.process
            if process is None or process.returncode is not None:
                return None
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(self.upstream_path)
                return upstream
            except (FileNotFoundError, ConnectionRefusedError):
                upstream.close()
                if time.monotonic() > deadline:
                    return None
                time.sleep(POLL_INTERVAL)
        return None

    def _pump(self, upstream: socket.socket) -> None:
        poller = select.poll()
        poller.register(upstream, select.POLLIN)
        poller.register(self._wake_read, select.POLLIN)
        poller.register(self.client, select.POLLIN)
        client_fd = self.client.fileno()
        drain_deadline: float | None = None  # once the client left: until the replies owed went out
        splitter = StreamSplitter()
        while not self._stopping:
            timeout_ms = -1
            if drain_deadline is not None:
                timeout_ms = max(0, int((drain_deadline - time.monotonic()) * 1000))
                if timeout_ms == 0 or not (self.pending or self._decision or self._backlog):
                    return
            for fd, _mask in poller.poll(timeout_ms):
                if fd == self._wake_read:
                    os.read(self._wake_read, 4096)
                    self._flush_outbox()
                    self._decided(upstream)
                elif fd != client_fd:
                    if not self._upstream_data(upstream.recv(READ_SIZE), upstream):
                        return
                elif data := self._read_client():
                    self._backlog.extend(splitter.feed(data))
                    self._advance(upstream)
                elif drain_deadline is None:
                    # The client left. Wait for the replies still owed before closing: once QEMU sees the
                    # connection close, it would deliver them to the next client of this monitor.
                    poller.unregister(client_fd)
                    drain_deadline = time.monotonic() + DRAIN_TIMEOUT

    def _upstream_data(self, data: bytes, upstream: socket.socket) -> bool:
        """QEMU's output, relayed line by line as it completes; False when QEMU's side ended."""
        if not data:
            self._send_client(self._partial)
            return False
        self._partial += data
        if b"\n" not in data:
            return len(self._partial) <= STREAM_LIMIT
        lines = self._partial.split(b"\n")
        self._partial = lines.pop()
        if not self._greeted:
            self._greeted = True
            greeting = lines.pop(0) + b"\n"
            self._on_loop(self.interposer.note_greeting, greeting)
            self._send_client(greeting)
        self._from_upstream(lines, upstream)
        return True

    def _read_client(self) -> bytes:
        try:
            return self.client.recv(READ_SIZE)
        except OSError:  # reset by the client: it left
            return b""

    def _from_upstream(self, lines: list[bytes], upstream: socket.socket) -> None:
        """QEMU's output lines, to the client as they came; a reply settles the oldest pending command
        (and, for a negotiation, lets the requests waiting for it go); events go to the interposer."""
        out = []
        negotiated_now = False
        for body in lines:
            line = body + b"\n"
            if line.startswith(REPLY_PREFIXES):
                kept, negotiated_now = self._reply_arrived(line.startswith(REPLY_PREFIXES[0]), negotiated_now)
                if not kept:
                    continue
            else:
                try:
                    message = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    message = None
                if isinstance(message, dict):
                    if "event" in message:
                        self._on_loop(self.interposer.observe_event, message)
                    elif "return" in message or "error" in message:
                        kept, negotiated_now = self._reply_arrived("return" in message, negotiated_now)
                        if not kept:
                            continue
            out.append(line)
        if out:
            self._send_client(b"".join(out))
        if negotiated_now or (self._negotiating and not self.pending):
            self._negotiating = False
            self._advance(upstream)

    def _reply_arrived(self, succeeded: bool, negotiated_now: bool) -> tuple[bool, bool]:
        """A reply to the oldest relayed command: (whether it is this client's, whether negotiation just
        succeeded). Not this client's when none is owed: QEMU keeps one output queue per monitor, so a
        reply to a command of a client that left arrives on the next connection, and is dropped."""
        with self._lock:
            if not self.pending:
                return False, negotiated_now
            command = self.pending.popleft()
            waiters: list[asyncio.Future] = []
            if not self.pending:
                waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            self.loop.call_soon_threadsafe(_resolve, waiter)
        if command == "qmp_capabilities" and succeeded and not self.negotiated:
            self.negotiated = True
            return True, True
        return True, negotiated_now

    def _advance(self, upstream: socket.socket) -> None:
        """Relay the requests read so far, in order, until one goes to the interposer to decide or a
        negotiation's reply must come first."""
        while self._backlog and self._decision is None and not self._negotiating:
            parsed = self._backlog.popleft()
            value = parsed.value
            command = value.get("execute") if isinstance(value, dict) else None
            name = command if isinstance(command, str) else ""
            if self.negotiated and name and self.interposer.intercepts(name):
                self._held = (parsed, name)
                try:
                    self._decision = asyncio.run_coroutine_threadsafe(
                        self.interposer.intercept(self, name, value), self.loop)
                except RuntimeError:  # the loop closed: the interposer is going away
                    self._stopping = True
                    return
                self._decision.add_done_callback(lambda _future: self._wake())
                return
            self._forward(parsed, name, upstream)

    def _decided(self, upstream: socket.socket) -> None:
        """The interposer's decision on the held request: answered there, or relayed now."""
        if self._decision is None or not self._decision.done():
            return
        decision, self._decision = self._decision, None
        assert self._held is not None
        (parsed, name), self._held = self._held, None
        if decision.cancelled() or decision.exception() is not None:
            self._stopping = True  # no decision, no relay: the client's session ends
            return
        if not decision.result():
            self._forward(parsed, name, upstream)
        self._advance(upstream)

    def _forward(self, parsed: Parsed, name: str, upstream: socket.socket) -> None:
        with self._lock:
            self.pending.append(name)
        if name == "qmp_capabilities" and not self.negotiated:
            self._negotiating = True  # what follows depends on whether negotiation succeeded
        upstream.sendall(parsed.raw + b"\n")

    def _flush_outbox(self) -> None:
        while self._outbox:
            self._send_client(self._outbox.popleft())

    def _send_client(self, data: bytes) -> None:
        """To the client; once it has gone, nothing (what QEMU still says is dropped)."""
        if not data or not self._client_open:
            return
        try:
            self.client.sendall(data)
        except OSError:
            self._client_open = False

    def _on_loop(self, callback: Callable[[object], None], argument: object) -> None:
        """Run an interposer's callback on the event loop, before the relay goes on."""
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def call() -> None:
            try:
                callback(argument)
            finally:
                done.set_result(None)

        try:
            self.loop.call_soon_threadsafe(call)
        except RuntimeError:  # the loop closed: the interposer is going away
            return
        with contextlib.suppress(concurrent.futures.TimeoutError):
            done.result(STOP_TIMEOUT)

    def _release_idle_waiters(self) -> None:
        with self._lock:
            self.pending.clear()
            waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(_resolve, waiter)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed (the relay ended)
            os.write(self._wake_write, b"w")


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class RelayListener:
    """The listening socket of one monitor libvirt asked for: its clients one at a time, as QEMU serves
    them (a second client waits for its greeting until the first leaves), each through a MonitorRelay."""

    def __init__(self, interposer: Interposer, spec: MonitorSpec, sock: socket.socket, upstream_path: str) -> None:
        self.interposer = interposer
        self.spec = spec
        self.sock = sock
        self.upstream_path = upstream_path
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._serve())

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            client, _address = await loop.sock_accept(self.sock)
            client.setblocking(True)
            try:
                await MonitorRelay(self.interposer, client, self.upstream_path, self.spec.pretty).run()
            finally:
                client.close()

    async def close(self) -> None:
        """Stop accepting, end the client's relay, remove the socket path."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=STOP_TIMEOUT + 1)
        if self.spec.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.spec.path)
        with contextlib.suppress(OSError):
            self.sock.close()


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
        self.listeners: list[RelayListener] = []
        self._stderr_task: asyncio.Future | None = None

    # --- what subclasses decide -------------------------------------------------------------------
    def child_argv(self) -> list[str]:
        """The real QEMU's arguments (without the program); by default only the monitors change."""
        return self.private.child_argv()

    def intercepts(self, command: str) -> bool:
        """Whether `intercept` may take this command; asked in the relay's thread for every negotiated
        command, so it must be quick, and everything else is relayed without asking."""
        return False

    async def intercept(self, relay: MonitorRelay, command: str, request: dict) -> bool:
        """A negotiated command from a client that `intercepts` named: True when it was answered here
        (not relayed)."""
        return False

    def observe_event(self, message: dict) -> None:
        """An event from the real QEMU, before it is relayed (on the event loop)."""

    def note_greeting(self, line: bytes) -> None:
        """The real QEMU's QMP greeting, before it is relayed (on the event loop)."""

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

    def kill(self, signum: int) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)

    async def serve(self, sockets: list[socket.socket]) -> int:
        """Relay every monitor until the child exits; its exit status (128+N for a signal)."""
        loop = asyncio.get_running_loop()
        for signum in SIGNAL_FORWARD:
            loop.add_signal_handler(signum, self._forward_signal, signum)
        self.listeners = [RelayListener(self, spec, sock, self.private_paths[spec.option_index])
                          for spec, sock in zip(self.monitors, sockets, strict=True)]
        for listener in self.listeners:
            listener.start()
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
