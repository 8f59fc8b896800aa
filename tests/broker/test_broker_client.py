"""sevhook.broker.client against real servers on loopback: the broker over TLS with a throwaway CA,
refusals with reason codes, retries on 5xx and connection errors only, and secrets kept out of reprs."""

from __future__ import annotations

import contextlib
import datetime
import http.server
import ipaddress
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sevhook.broker.client import BrokerClient, BrokerRefused, BrokerUnavailable, SecretGrant
from sevhook.errors import UsageError
from tests.broker.conftest import DIGEST_A, BrokerProcess, FirmwareLaunch, Owner, PlatformKeys, free_port, register


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(directory: Path, label: str) -> tuple[Path, ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(label)).issuer_name(_name(label))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path = directory / f"{label}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, key, cert


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("tls")
    ca_path, ca_key, ca_cert = make_ca(directory, "throwaway-ca")
    other_ca, _, _ = make_ca(directory, "other-ca")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name("broker")).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    (directory / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "server.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
    return {"ca": ca_path, "other_ca": other_ca, "cert": directory / "server.pem", "key": directory / "server.key"}


@pytest.fixture(scope="module")
def tls_owner(tmp_path_factory: pytest.TempPathFactory, tls_files: dict[str, Path],
              platform: PlatformKeys) -> Iterator[Owner]:
    process = BrokerProcess(tmp_path_factory.mktemp("broker-tls"), tls=(tls_files["cert"], tls_files["key"]),
                            ca_file=tls_files["ca"])
    yield register(process, platform)
    process.stop()


def test_full_flow_over_tls_with_the_client(tls_owner: Owner, tls_files: dict[str, Path], tmp_path: Path) -> None:
    token_file = tmp_path / "host.token"
    token_file.write_text(tls_owner.host_token + "\n")
    guest = tls_owner.add_guest(secret=b"tls-secret")
    with BrokerClient(tls_owner.broker.url, ca_file=tls_files["ca"], token_file=token_file) as client:
        grant = client.create_launch(guest, tls_owner.platform.pdh_b64, tls_owner.platform.chain_b64)
        firmware = FirmwareLaunch.start(tls_owner.platform, {"godh": grant.godh_b64, "session": grant.session_b64,
                                                             "policy": grant.policy})
        measurement = firmware.measure(DIGEST_A, grant.policy)
        secret = client.attest(grant.launch_id, measurement, 0, 24, 15, grant.policy)
        table = firmware.open_secret({"secret_header": secret.header_b64, "secret": secret.secret_b64})
        assert table.entries[0][1] == b"tls-secret"
        assert client.launch_status(grant.launch_id)["state"] == "released"
        with pytest.raises(BrokerRefused) as refused:
            client.attest(grant.launch_id, measurement, 0, 24, 15, grant.policy)
    assert refused.value.reason == "launch-used"
    assert secret.secret_b64 not in repr(secret) and secret.header_b64 not in repr(secret)


@pytest.mark.parametrize("ca", [None, "other_ca"])
def test_tls_verification_failure_is_unavailable_without_retries(tls_owner: Owner, tls_files: dict[str, Path],
                                                                  ca: str | None) -> None:
    with BrokerClient(tls_owner.broker.url, token=tls_owner.host_token,
                      ca_file=tls_files[ca] if ca else None, retries=5, backoff=5.0) as client:
        with pytest.raises(BrokerUnavailable, match="TLS"):
            client.launch_status("x")


def test_refusal_reasons_and_token_errors(owner: Owner) -> None:
    guest = owner.add_guest()
    with BrokerClient(owner.broker.url, token=owner.host_token) as client:
        grant = client.create_launch(guest, owner.platform.pdh_b64, owner.platform.chain_b64)
        with pytest.raises(BrokerRefused) as wrong:
            client.attest(grant.launch_id, "A" * 64, 0, 24, 15, grant.policy)
        with pytest.raises(BrokerRefused) as unknown:
            client.create_launch("nobody", owner.platform.pdh_b64, owner.platform.chain_b64)
    assert wrong.value.reason == "measurement-mismatch" and "measurement" in wrong.value.message
    assert unknown.value.reason == "unknown-guest"
    with BrokerClient(owner.broker.url, token="wrong") as stranger, pytest.raises(BrokerRefused) as bad_token:
        stranger.launch_status(grant.launch_id)
    assert bad_token.value.reason == "token-invalid"


def test_token_file_and_url_errors_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="token file not found"):
        BrokerClient("http://127.0.0.1:1", token_file=tmp_path / "missing")
    (tmp_path / "bad").write_text("two words\n")
    with pytest.raises(UsageError, match="visible ASCII"):
        BrokerClient("http://127.0.0.1:1", token_file=tmp_path / "bad")
    with pytest.raises(UsageError, match="broker URL"):
        BrokerClient("ftp://broker")
    with pytest.raises(UsageError, match="CA file not found"):
        BrokerClient("https://127.0.0.1:1", ca_file=tmp_path / "none.pem")


def test_connection_refused_is_retried_then_unavailable() -> None:
    with BrokerClient(f"http://127.0.0.1:{free_port()}", token="t", retries=2, backoff=0.01, timeout=2) as client:
        with pytest.raises(BrokerUnavailable, match="cannot connect"):
            client.create_launch("g", "AA==", "AA==")


class _Flaky(http.server.BaseHTTPRequestHandler):
    """Answers 503 to the first `failures` requests, then a valid secret grant."""

    failures = 0
    seen: ClassVar[list[str]] = []

    def do_POST(self) -> None:  # http.server's naming
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        type(self).seen.append(self.path)
        if len(type(self).seen) <= type(self).failures:
            status, body = 503, {"error": "busy", "reason": "database-unavailable"}
        else:
            status, body = 200, {"secret_header": "SEVADER", "secret": "U0VDUkVU"}
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.mark.parametrize(("failures", "retries", "succeeds"), [(2, 2, True), (3, 2, False)])
def test_server_errors_are_retried_with_backoff(failures: int, retries: int, succeeds: bool) -> None:
    _Flaky.failures, _Flaky.seen = failures, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with BrokerClient(f"http://127.0.0.1:{server.server_address[1]}", token="t", retries=retries,
                          backoff=0.01) as client:
            if succeeds:
                assert client.attest("L", "M", 0, 24, 1, 1) == SecretGrant("SEVADER", "U0VDUkVU")
            else:
                with pytest.raises(BrokerUnavailable, match="server error 503"):
                    client.attest("L", "M", 0, 24, 1, 1)
        assert len(_Flaky.seen) == min(failures, retries) + 1
    finally:
        server.shutdown()
        server.server_close()


class _HangsUp(http.server.BaseHTTPRequestHandler):
    """Reads each request, then closes the connection without answering (a broker that crashed)."""

    seen: ClassVar[list[str]] = []

    def do_POST(self) -> None:  # http.server's naming
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        type(self).seen.append(self.path)
        self.close_connection = True

    def log_message(self, *_args: object) -> None:
        pass


class _ClosesIdle(_Flaky):
    """Answers like _Flaky (no failures) but closes every connection after its answer, without
    saying so in a Connection header: the client must not send the next request on it."""

    protocol_version = "HTTP/1.1"  # keep-alive unless told otherwise

    def do_POST(self) -> None:  # http.server's naming
        super().do_POST()
        self.close_connection = True


def _serve(handler: type[http.server.BaseHTTPRequestHandler]) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_an_attestation_is_not_resent_after_its_answer_was_lost() -> None:
    _HangsUp.seen = []
    server = _serve(_HangsUp)
    try:
        with BrokerClient(f"http://127.0.0.1:{server.server_address[1]}", token="t", retries=3,
                          backoff=0.01) as client:
            with pytest.raises(BrokerUnavailable, match="while talking to the broker"):
                client.attest("L", "M", 0, 24, 1, 1)
            assert len(_HangsUp.seen) == 1  # the launch may be spent: never sent twice
            with pytest.raises(BrokerUnavailable, match="while talking to the broker"):
                client.create_launch("g", "AA==", "AA==")
            assert len(_HangsUp.seen) == 1 + 4  # a launch request is safe to repeat
    finally:
        server.shutdown()
        server.server_close()


class _CountsClosures(http.server.ThreadingHTTPServer):
    """Signals each connection it has closed, so a test can act once the close is on the wire."""

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.closed = threading.Semaphore(0)

    def shutdown_request(self, request: object) -> None:
        super().shutdown_request(request)  # type: ignore[arg-type]
        self.closed.release()


def test_a_connection_the_broker_closed_is_not_reused() -> None:
    _ClosesIdle.failures, _ClosesIdle.seen = 0, []
    server = _CountsClosures(_ClosesIdle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with BrokerClient(f"http://127.0.0.1:{server.server_address[1]}", token="t", retries=0) as client:
            for _ in range(3):  # no retries: each attestation must go out on a connection that is open
                assert client.attest("L", "M", 0, 24, 1, 1) == SecretGrant("SEVADER", "U0VDUkVU")
                assert server.closed.acquire(timeout=10)
        assert len(_ClosesIdle.seen) == 3
    finally:
        server.shutdown()
        server.server_close()


def test_client_errors_are_not_retried(owner: Owner) -> None:
    with BrokerClient(owner.broker.url, token=owner.host_token, retries=3, backoff=5.0) as client:
        with pytest.raises(BrokerRefused) as refused:
            client.launch_status("no-such-launch")
    assert refused.value.reason == "unknown-launch"


def test_rate_limited_answers_are_retried(tmp_path: Path, platform: PlatformKeys) -> None:
    process = BrokerProcess(tmp_path / "data", extra=("--rate-limit", "5", "--burst", "3"))
    try:
        limited = register(process, platform)
        with BrokerClient(process.url, token=limited.host_token, retries=3, backoff=0.01) as client:
            for _ in range(5):
                with pytest.raises(BrokerRefused) as refused:  # 404 each time, never a 429 that leaked through
                    client.launch_status("none")
                assert refused.value.reason == "unknown-launch"
    finally:
        process.stop()


def test_client_from_a_domain_broker_reference(owner: Owner, tmp_path: Path) -> None:
    from sevhook.xml.models import BrokerRef

    (tmp_path / "token").write_text(owner.host_token)
    with BrokerClient.from_ref(BrokerRef(owner.broker.url, None, str(tmp_path / "token")), timeout=5) as client:
        with pytest.raises(BrokerRefused) as refused:
            client.launch_status("none")
    assert refused.value.reason == "unknown-launch"


class _SlowPeer:
    """A loopback server that runs `behave(connection)` for each client, on a thread of its own, and
    closes what it accepted when stopped. A real socket: the client's deadline meets real I/O."""

    def __init__(self, behave: Callable[[socket.socket], None]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._behave = behave
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.accepted.append(connection)
            threading.Thread(target=self._run, args=(connection,), daemon=True).start()

    def _run(self, connection: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self._behave(connection)

    def wait(self, seconds: float) -> bool:
        """Sleep `seconds` unless stopped first; True while the peer should go on."""
        return not self._stop.wait(seconds)

    def stop(self) -> None:
        self._stop.set()
        self.listener.close()
        for connection in self.accepted:
            connection.close()


def _read_request(connection: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            return
        data += chunk


@contextlib.contextmanager
def _slow_peer(behave: Callable[[_SlowPeer, socket.socket], None]) -> Iterator[_SlowPeer]:
    holder: list[_SlowPeer] = []
    peer = _SlowPeer(lambda connection: behave(holder[0], connection))
    holder.append(peer)
    try:
        yield peer
    finally:
        peer.stop()


def _dribble_headers(peer: _SlowPeer, connection: socket.socket) -> None:
    """A status line, then one header line a second, never the end of the headers (for 30 s)."""
    _read_request(connection)
    connection.sendall(b"HTTP/1.1 200 OK\r\n")
    for line in range(30):
        if not peer.wait(1.0):
            return
        connection.sendall(b"X-Slow: %d\r\n" % line)


def _dribble_body(peer: _SlowPeer, connection: socket.socket) -> None:
    """Complete headers announcing a body, then the body one byte every half second."""
    _read_request(connection)
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 60\r\n\r\n")
    for _ in range(60):
        if not peer.wait(0.5):
            return
        connection.sendall(b" ")


def _stall(peer: _SlowPeer, connection: socket.socket) -> None:
    """Accept the TCP connection and say nothing: a TLS handshake waits for a ServerHello forever."""
    peer.wait(30.0)


BUDGET = 2.5


@pytest.mark.parametrize("behave", [_dribble_headers, _dribble_body], ids=["headers", "body"])
def test_a_dribbling_broker_cannot_hold_a_call_past_its_deadline(behave: Callable[[_SlowPeer, socket.socket], None]
                                                                 ) -> None:
    """Every read gets the time left, not a fresh timeout: one header line a second keeps each read
    short, and the call must still end when its budget does, retries included."""
    with _slow_peer(behave) as peer, BrokerClient(f"http://127.0.0.1:{peer.port}", token="t", timeout=BUDGET,
                                                  retries=2, backoff=0.01) as client:
        begin = time.monotonic()
        with pytest.raises(BrokerUnavailable, match=rf"no answer within {BUDGET:g} s"):
            client.create_launch("g", "AA==", "AA==")
        elapsed = time.monotonic() - begin
    assert BUDGET - 0.1 <= elapsed < BUDGET + 0.75


def test_a_stalled_tls_handshake_ends_at_the_deadline(tls_files: dict[str, Path]) -> None:
    with _slow_peer(_stall) as peer, BrokerClient(f"https://127.0.0.1:{peer.port}", token="t", timeout=BUDGET,
                                                  retries=3, backoff=0.01, ca_file=tls_files["ca"]) as client:
        begin = time.monotonic()
        with pytest.raises(BrokerUnavailable, match=rf"cannot connect \(no answer within {BUDGET:g} s\)"):
            client.create_launch("g", "AA==", "AA==")
        elapsed = time.monotonic() - begin
    assert BUDGET - 0.1 <= elapsed < BUDGET + 0.75


def test_retry_pauses_stay_within_the_deadline() -> None:
    """Backoff and Retry-After pauses that would end past the budget are not taken."""
    with BrokerClient(f"http://127.0.0.1:{free_port()}", token="t", retries=5, backoff=4.0, timeout=1.0) as client:
        begin = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="cannot connect"):
            client.create_launch("g", "AA==", "AA==")
        assert time.monotonic() - begin < 1.0
    _RateLimited.seen = 0
    server = _serve(_RateLimited)
    try:
        with BrokerClient(f"http://127.0.0.1:{server.server_address[1]}", token="t", retries=3,
                          timeout=1.0) as client:
            begin = time.monotonic()
            with pytest.raises(BrokerUnavailable, match=r"rate limited \(429\)"):
                client.create_launch("g", "AA==", "AA==")
            assert time.monotonic() - begin < 1.0
            assert _RateLimited.seen == 1
    finally:
        server.shutdown()
        server.server_close()


class _RateLimited(http.server.BaseHTTPRequestHandler):
    """Always 429 with a Retry-After of 3 s."""

    seen = 0

    def do_POST(self) -> None:  # http.server's naming
        type(self).seen += 1
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(429)
        self.send_header("Retry-After", "3")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        pass
