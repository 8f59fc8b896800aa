"""Fixtures for the wrapper tests (the simulated world itself: sevhook/sim/world.py)."""

from __future__ import annotations

import http.client
import http.server
import threading
import time
from collections.abc import Iterator

import pytest

from sevhook.sim.world import SimWorld
from tests.monitor.qemu_process import short_dir  # noqa: F401

SLOW_ATTESTATION_SECONDS = 20.0  # far beyond the deadline the slow-broker tests give their guests


class _SlowAttestation(http.server.BaseHTTPRequestHandler):
    """A real HTTP proxy to the world's broker that relays launch creation at once and answers an
    attestation only after SLOW_ATTESTATION_SECONDS (a broker slower than the guest's deadline)."""

    upstream = ""

    def do_POST(self) -> None:  # http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path.endswith("/attestation"):
            time.sleep(SLOW_ATTESTATION_SECONDS)
            return
        host, port = self.upstream.rsplit(":", 1)
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        connection.request("POST", self.path, body, {k: v for k, v in self.headers.items() if k.lower() != "host"})
        answer = connection.getresponse()
        data = answer.read()
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.getheader("Content-Type", "application/json"))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        connection.close()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def slow_broker(world: SimWorld) -> Iterator[str]:
    """The URL of a broker that makes launches at once but is slower than any test deadline to attest."""
    handler = type("SlowAttestation", (_SlowAttestation,), {"upstream": world.broker_url.removeprefix("http://")})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
