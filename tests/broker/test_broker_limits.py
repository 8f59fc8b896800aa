"""Slow, idle, greedy and token-guessing clients against a real `sevhook broker serve` with tight limits:
real sockets, real timeouts. Also: a database lock held by another process stalls neither /healthz nor
reads, and the strict bearer syntax."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.broker.conftest import BrokerProcess, Owner, PlatformKeys, register

TIMEOUT = 1.0  # the broker's header, body and keep-alive timeouts in this module


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory, platform: PlatformKeys) -> Iterator[Owner]:
    process = BrokerProcess(tmp_path_factory.mktemp("broker-tight"), extra=(
        "--header-timeout", str(TIMEOUT), "--body-timeout", str(TIMEOUT), "--keepalive-timeout", str(TIMEOUT),
        "--max-header-bytes", "4096", "--max-connections", "12", "--auth-failure-rate", "0.2",
        "--auth-failure-burst", "5"))
    yield register(process, platform)
    process.stop()


def _connect(owner: Owner) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", owner.broker.port), timeout=10)
    return sock


def _read_until_closed(sock: socket.socket, limit: float = 10.0) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started = time.monotonic()
    sock.settimeout(limit)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - started


def test_an_idle_connection_is_closed_after_the_header_timeout(tight: Owner) -> None:
    with _connect(tight) as sock:
        data, waited = _read_until_closed(sock)
    assert waited < TIMEOUT + 2.0
    assert data == b"" or data.startswith(b"HTTP/1.1 408")


def test_a_slowloris_header_is_cut_off_at_the_header_deadline(tight: Owner) -> None:
    with _connect(tight) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: broker\r\n")
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < 6 * TIMEOUT:  # one header byte every 0.2 s: each read is "on time"
            try:
                sock.sendall(b"X")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.2)
        data, _ = _read_until_closed(sock, limit=3)
    assert closed or data.startswith(b"HTTP/1.1 408"), data
    assert time.monotonic() - started < 6 * TIMEOUT + 3


def test_a_stalled_body_is_cut_off_at_the_body_deadline(tight: Owner) -> None:
    with _connect(tight) as sock:
        sock.sendall(b"POST /v1/launches HTTP/1.1\r\nHost: broker\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + tight.host_token.encode() + b"\r\nContent-Length: 500\r\n\r\n{\"gu")
        data, waited = _read_until_closed(sock)
    assert waited < TIMEOUT + 2.0
    assert b"200 OK" not in data


def test_an_idle_keep_alive_connection_is_closed(tight: Owner) -> None:
    with _connect(tight) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: broker\r\n\r\n")
        data, waited = _read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 200") and waited < TIMEOUT + 2.0


def test_an_oversized_header_gets_431_without_being_buffered(tight: Owner) -> None:
    with _connect(tight) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: broker\r\nX-Big: ")
        sent = 0
        try:
            while sent < 4 * 1024 * 1024:  # far past the 4 KiB budget: the server must stop reading long before
                sock.sendall(b"a" * 65536)
                sent += 65536
        except (BrokenPipeError, ConnectionResetError):
            pass
        data, _ = _read_until_closed(sock, limit=5)
    assert sent < 4 * 1024 * 1024 or data.startswith(b"HTTP/1.1 431"), data[:100]
    assert data == b"" or data.startswith(b"HTTP/1.1 431"), data[:100]


def test_connections_past_the_limit_are_refused_and_health_recovers(tight: Owner) -> None:
    idle = [_connect(tight) for _ in range(12)]
    try:
        time.sleep(0.2)
        with _connect(tight) as extra:
            extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: broker\r\n\r\n")
            data, _ = _read_until_closed(extra, limit=5)
        assert data.startswith(b"HTTP/1.1 503"), data[:100]
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if httpx.get(f"{tight.broker.url}/healthz", timeout=5).status_code == 200:
            break
        time.sleep(0.1)
    else:
        pytest.fail("/healthz did not recover after the idle connections closed")


def test_random_tokens_are_rate_limited_by_address_and_a_real_host_is_not(tight: Owner) -> None:
    with tight.host() as host:  # the real host authenticates once, so its token is known to the broker
        assert host.get("/v1/launches/none").json()["reason"] == "unknown-launch"
    statuses = []
    for _ in range(12):  # a fresh random token each time: a per-token limiter would never trigger
        token = base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")
        with tight.host(token) as guesser:
            statuses.append(guesser.get("/v1/launches/none").status_code)
    assert statuses[:5] == [401] * 5 and statuses[-1] == 429, statuses
    time.sleep(2.5)  # past the broker's 2-second token cache: the real host is vouched for, not cached
    with tight.host() as host:
        assert host.get("/v1/launches/none").json()["reason"] == "unknown-launch"


@pytest.mark.parametrize("header, accepted", [
    ("Bearer {token}", True),
    ("bearer {token}", True),  # RFC 7235: the scheme is case-insensitive
    ("BEARER {token}", True),
    ("Bearer  {token}", False),  # two spaces
    ("Bearer {token} x", False),
    ("Bearer\t{token}", False),
    ("Basic {token}", False),
    ("Bearer", False),
])
def test_bearer_syntax(owner: Owner, header: str, accepted: bool) -> None:
    response = httpx.get(f"{owner.broker.url}/v1/launches/none", timeout=10,
                         headers={"Authorization": header.format(token=owner.host_token)})
    if accepted:
        assert response.json()["reason"] == "unknown-launch", response.text
    else:
        assert response.status_code == 401 and response.json()["reason"] == "token-invalid", response.text


LOCK_HOLDER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
conn.execute("UPDATE hosts SET created_at = created_at")
print("locked", flush=True)
sys.stdin.read()
conn.execute("ROLLBACK")
"""


def test_a_lock_held_by_another_process_stalls_neither_health_nor_reads(owner: Owner) -> None:
    if not owner.broker.db_url.startswith("sqlite"):
        pytest.skip("the lock is an SQLite write transaction")
    database = owner.broker.db_url.removeprefix("sqlite:///")
    guest = owner.add_guest()
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, database], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    writer_done: list[httpx.Response] = []

    def write() -> None:  # a host API write: it used to run on the event loop and freeze every request
        with owner.host() as writer_client:
            writer_done.append(writer_client.post("/v1/launches", json={
                "guest": guest, "pdh": owner.platform.pdh_b64, "cert_chain": owner.platform.chain_b64}))

    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with owner.broker.admin() as admin:
            # a write that must wait for the lock, on the broker's side, while we check the rest
            writer = threading.Thread(target=write)
            writer.start()
            time.sleep(0.5)
            for path in ("/healthz", "/admin/guests", "/admin/hosts"):
                started = time.monotonic()
                response = admin.get(path, timeout=5)
                assert response.status_code == 200, (path, response.text)
                assert time.monotonic() - started < 2.0, path
            with owner.host() as host:
                started = time.monotonic()
                assert host.get("/v1/launches/none", timeout=5).json()["reason"] == "unknown-launch"
                assert time.monotonic() - started < 2.0
            started = time.monotonic()
            ready = admin.get("/readyz", timeout=10)
            assert ready.status_code == 503 and ready.json()["reason"] == "database-unavailable", ready.text
            assert time.monotonic() - started < 4.0
            assert writer.is_alive()  # still waiting for the lock
    finally:
        holder.communicate("", timeout=10)  # release the lock
    writer.join(30)
    assert writer_done and writer_done[0].status_code in (200, 503), writer_done
    with owner.broker.admin() as admin:
        assert admin.get("/readyz").status_code == 200
