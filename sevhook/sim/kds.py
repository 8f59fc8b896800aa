"""A simulated AMD Key Distribution Service: the one place a simulated platform's ASK-signed CEK comes
from, as AMD's KDS (https://kdsintf.amd.com) is for real chips, since firmware exports its CEK unsigned.

It answers `GET /cek/id/{chip id as hex}` with the raw 2084-byte signed CEK (application/octet-stream),
404 for a chip it does not know, and, when a test asks for it, 429 with Retry-After. Start it
in-process (`SimulatedKds(...).start()`, then `.url`, `.stop()`) or as `sevhook sim kds serve`."""

from __future__ import annotations

import re
import socketserver
import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from sevhook.errors import UsageError
from sevhook.sim.platform import SoftwarePlatform, is_initialised
from sevhook.sim.state import StateDir

CEK_PATH = re.compile(r"^/cek/id/([0-9A-Fa-f]{2,256})$")


class _Server(ThreadingHTTPServer):
    """No reverse DNS lookup of the listening address (HTTPServer's getfqdn can stall for seconds)."""

    daemon_threads = True

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT or [IPv6]:PORT for `sevhook sim kds serve --listen`."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise UsageError(f"--listen {text!r}: use HOST:PORT, e.g. 127.0.0.1:8099")
    return host.strip("[]") or "127.0.0.1", int(port_text)


class SimulatedKds:
    """The KDS of one or more simulated platforms (each a state directory), plus CEKs put by hand."""

    def __init__(self, states: Iterable[StateDir | Path | str] = (), host: str = "127.0.0.1", port: int = 0) -> None:
        self.states = [state if isinstance(state, StateDir) else StateDir(state) for state in states]
        self.host = host
        self.port = port
        self.extra: dict[str, bytes] = {}
        self.requests: list[str] = []  # every path asked for, so tests can count fetches
        self.delay = 0.0  # seconds to think before each answer (tests: overlapping requests)
        self._throttled = 0
        self._retry_after = 1
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # configuration ------------------------------------------------------------------------------
    def put(self, chip_id_hex: str, cek: bytes) -> None:
        """Serve `cek` for this chip (tests: a CEK for another key, a chip with no platform here)."""
        self.extra[chip_id_hex.upper()] = bytes(cek)

    def throttle(self, count: int, retry_after: int = 1) -> None:
        """Answer the next `count` requests 429 Too Many Requests with `Retry-After: retry_after`."""
        with self._lock:
            self._throttled = count
            self._retry_after = retry_after

    def lookup(self, chip_id_hex: str) -> bytes | None:
        """The signed CEK for a chip id (any case of hex), or None for a chip this KDS does not know."""
        wanted = chip_id_hex.upper()
        if wanted in self.extra:
            return self.extra[wanted]
        for state in self.states:
            if is_initialised(state):
                platform = SoftwarePlatform(state)
                if platform.chip_id_hex == wanted:
                    return platform.signed_cek()
        return None

    def _take_throttle(self) -> int | None:
        with self._lock:
            if self._throttled <= 0:
                return None
            self._throttled -= 1
            return self._retry_after

    # lifecycle -----------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self._server is None:
            raise UsageError("the simulated KDS is not running: call start() first")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> SimulatedKds:
        """Listen (port 0: a free one) and serve from a daemon thread."""
        self._server = self.bind()
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="sim-kds", daemon=True)
        self._thread.start()
        return self

    def bind(self) -> ThreadingHTTPServer:
        try:
            server = _Server((self.host, self.port), _handler_for(self))
        except OSError as exc:
            raise UsageError(f"simulated KDS: cannot listen on {self.host}:{self.port} ({exc.strerror or exc}); "
                             "pick another --listen address") from exc
        self._server = server
        return server

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> SimulatedKds:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _handler_for(kds: SimulatedKds) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "sevhook-sim-kds"

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: tests and the CLI report what matters themselves."""

        def _reply(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            kds.requests.append(self.path)
            if kds.delay:
                time.sleep(kds.delay)
            retry_after = kds._take_throttle()
            if retry_after is not None:
                self._reply(429, b"Too Many Requests\n", "text/plain", {"Retry-After": str(retry_after)})
                return
            match = CEK_PATH.match(self.path)
            if match is None:
                self._reply(404, b"Not Found: ask for /cek/id/{chip id hex}\n", "text/plain")
                return
            cek = kds.lookup(match.group(1))
            if cek is None:
                self._reply(404, b"Not Found: unknown chip id\n", "text/plain")
                return
            self._reply(200, cek, "application/octet-stream")

    return Handler
