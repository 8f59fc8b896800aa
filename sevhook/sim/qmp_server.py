"""Serving QMP monitors with asyncio: listening sockets (a unix path QEMU-style, an inherited listening fd
as libvirt passes it, or TCP), one client per monitor at a time as in QEMU (a second client waits for
its greeting until the first leaves), the capabilities negotiation, and events broadcast to every
negotiated client."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from typing import Protocol

from sevhook.errors import UsageError
from sevhook.sim.argv import MonitorSpec
from sevhook.sim.qmp_protocol import (
    COMMAND_NOT_FOUND,
    GENERIC_ERROR,
    SCHEMAS,
    QmpError,
    Request,
    RequestError,
    StreamSplitter,
    check_arguments,
    check_request,
    encode,
    error_reply,
    reply,
)

READ_SIZE = 65536


MAX_UNIX_PATH = 107


def _unix_listener(path: str) -> socket.socket:
    """Bind and listen under a temporary name, then rename into place: a client that sees the path
    can connect at once (a bound socket that is not yet listening refuses connections)."""
    temporary = os.path.join(os.path.dirname(path) or ".", f".sim{os.getpid()}.sock")
    staged = len(os.fsencode(temporary)) <= MAX_UNIX_PATH
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(temporary if staged else path)
        sock.listen(1)
        if staged:
            os.replace(temporary, path)
    except OSError as exc:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise UsageError(f"Failed to bind socket to {path}: {exc.strerror}") from exc
    sock.setblocking(False)
    return sock


def listening_socket(spec: MonitorSpec) -> socket.socket:
    """Bind (or adopt) the monitor's listening socket, as QEMU does before it serves it."""
    if spec.fd is not None:
        try:
            sock = socket.socket(fileno=spec.fd)
        except OSError as exc:
            raise UsageError(f"monitor fd={spec.fd}: not an open socket ({exc.strerror}); "
                             "the fd must be inherited from the caller") from exc
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0:
            sock.detach()
            raise UsageError(f"monitor fd={spec.fd}: the socket is not listening")
        sock.setblocking(False)
        return sock
    if spec.path is not None:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(spec.path).st_mode):
                os.unlink(spec.path)
        return _unix_listener(spec.path)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((spec.host or "127.0.0.1", spec.port or 0))
        except OSError as exc:
            sock.close()
            raise UsageError(f"Failed to bind socket to {spec.host}:{spec.port}: {exc.strerror}") from exc
    sock.listen(1)
    sock.setblocking(False)
    return sock


class Connection:
    """One client's byte stream; writes never raise when the client has gone."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pretty: bool) -> None:
        self.reader = reader
        self.writer = writer
        self.pretty = pretty
        self.closed = False

    async def send(self, message: dict) -> None:
        if self.closed:
            return
        try:
            self.writer.write(encode(message, self.pretty))
            await self.writer.drain()
        except (ConnectionError, RuntimeError):
            self.closed = True

    def send_nowait(self, message: dict) -> None:
        if self.closed or self.writer.is_closing():
            return
        try:
            self.writer.write(encode(message, self.pretty))
        except (ConnectionError, RuntimeError):
            self.closed = True

    async def close(self) -> None:
        self.closed = True
        with contextlib.suppress(Exception):
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)


class EventHub:
    """Events go to every client that completed capabilities negotiation, on every monitor."""

    def __init__(self) -> None:
        self.connections: set[Connection] = set()

    def broadcast(self, message: dict) -> None:
        for connection in list(self.connections):
            connection.send_nowait(message)


class CommandHandler(Protocol):
    def greeting(self) -> dict: ...

    def commands(self) -> list[str]: ...

    async def execute(self, request: Request) -> object: ...


class LocalSession:
    """A QMP client served entirely by `handler` (standalone mode)."""

    def __init__(self, connection: Connection, handler: CommandHandler, hub: EventHub) -> None:
        self.connection = connection
        self.handler = handler
        self.hub = hub
        self.negotiated = False

    async def run(self) -> None:
        splitter = StreamSplitter()
        await self.connection.send(self.handler.greeting())
        try:
            while not self.connection.closed:
                data = await self.connection.reader.read(READ_SIZE)
                if not data:
                    break
                for parsed in splitter.feed(data):
                    await self._handle(parsed.value, parsed.error)
        finally:
            self.hub.connections.discard(self.connection)

    async def _handle(self, value: object, parse_error: QmpError | None) -> None:
        msg_id = None
        try:
            if parse_error is not None:
                raise parse_error
            request = check_request(value)
            msg_id = request.msg_id
            result = await self._dispatch(request)
        except RequestError as exc:
            await self.connection.send(error_reply(exc, exc.msg_id))
        except QmpError as exc:
            await self.connection.send(error_reply(exc, msg_id))
        else:
            await self.connection.send(reply(result, msg_id))

    async def _dispatch(self, request: Request) -> object:
        if not self.negotiated:
            if request.command != "qmp_capabilities":
                raise QmpError(COMMAND_NOT_FOUND, "Expecting capabilities negotiation with 'qmp_capabilities'")
            check_arguments(request.command, request.arguments, SCHEMAS["qmp_capabilities"])
            enable = request.arguments.get("enable", [])
            for capability in enable:
                if capability != "oob":
                    raise QmpError(GENERIC_ERROR, f"Invalid parameter '{capability}'")
            self.negotiated = True
            self.hub.connections.add(self.connection)
            return {}
        if request.command == "qmp_capabilities":
            raise QmpError(COMMAND_NOT_FOUND, "Capabilities negotiation is already complete, command ignored")
        if request.command not in self.handler.commands():
            raise QmpError(COMMAND_NOT_FOUND, f"The command {request.command} has not been found")
        check_arguments(request.command, request.arguments, SCHEMAS.get(request.command, {}))
        return await self.handler.execute(request)


SessionFactory = Callable[[Connection], Awaitable[None]]


class MonitorListener:
    """Serves one monitor socket: each accepted client runs `session_factory`, one at a time."""

    def __init__(self, spec: MonitorSpec, sock: socket.socket, session_factory: SessionFactory) -> None:
        self.spec = spec
        self.sock = sock
        self.session_factory = session_factory
        self._one_client = asyncio.Lock()
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._connections: set[Connection] = set()

    async def start(self) -> None:
        if self.sock.family == socket.AF_UNIX:
            self._server = await asyncio.start_unix_server(self._client, sock=self.sock)
        else:
            self._server = await asyncio.start_server(self._client, sock=self.sock)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        connection = Connection(reader, writer, self.spec.pretty)
        try:
            async with self._one_client:
                self._connections.add(connection)
                try:
                    await self.session_factory(connection)
                except (ConnectionError, asyncio.IncompleteReadError):
                    pass
        except asyncio.CancelledError:
            pass  # the monitor is closing; end this client quietly
        finally:
            self._connections.discard(connection)
            await connection.close()
            if task is not None:
                self._tasks.discard(task)

    async def close(self) -> None:
        """Stop accepting, flush and close every client, remove the socket path."""
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.writer.drain(), 1.0)
            await connection.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=1.0)
        if self.spec.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.spec.path)
        with contextlib.suppress(OSError):
            self.sock.close()
