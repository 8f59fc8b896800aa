"""Fixtures for the broker tests: a throwaway SEV platform chain (made with sevhook.sev.certs, rooted
in a test ARK), the firmware side of a launch (open_session / measurement / unwrap from sevhook.sev),
and real `sevhook broker serve` processes on loopback, stopped by pid."""

from __future__ import annotations

import base64
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sevhook.sev.certs import AmdCertificate, SevCertificate, Usage
from sevhook.sev.measurement import compute_measurement
from sevhook.sev.secret import SecretTable, unwrap_secret
from sevhook.sev.session import open_session

ROOT = Path(__file__).resolve().parents[2]
SEVHOOK = [sys.executable, "-m", "sevhook.cli"]
API = (0, 24)
BUILD = 15
DIGEST_A = bytes.fromhex("6faab2daae389bcd3405a05d6cafe33c0414f7bedd0bae19ba5f38b7fd1664ea")
DIGEST_B = bytes(range(32))
SECRET_GUID = uuid.UUID("736869e5-84f0-4973-92ec-06879ce3da0b")


@dataclass(frozen=True)
class PlatformKeys:
    """A platform's certificates (ARK -> ASK -> CEK -> PEK <- OCA, PEK -> PDH) and its PDH key."""

    pdh_private: ec.EllipticCurvePrivateKey = field(repr=False)
    pdh: bytes
    pek: bytes
    oca: bytes
    cek: bytes
    ask: bytes
    ark: bytes

    @property
    def pdh_b64(self) -> str:
        return base64.b64encode(self.pdh).decode()

    @property
    def chain_b64(self) -> str:
        """PEK|OCA|CEK as QEMU's query-sev-capabilities gives it."""
        return base64.b64encode(self.pek + self.oca + self.cek).decode()

    @property
    def ca(self) -> bytes:
        return self.ask + self.ark

    @property
    def full_b64(self) -> str:
        return base64.b64encode(self.pdh + self.pek + self.oca + self.cek + self.ask + self.ark).decode()


def make_platform(api: tuple[int, int] = API) -> PlatformKeys:
    ark_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ask_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ark_id, ask_id = os.urandom(16), os.urandom(16)
    ark = AmdCertificate.build(ark_id, ark_id, Usage.ARK, ark_key.public_key()).sign(ark_key)
    ask = AmdCertificate.build(ask_id, ark_id, Usage.ASK, ask_key.public_key()).sign(ark_key)
    cek_key, oca_key, pek_key, pdh_key = (ec.generate_private_key(ec.SECP384R1()) for _ in range(4))
    cek = SevCertificate.generate(Usage.CEK, cek_key.public_key(), *api).sign(Usage.ASK, ask_key)
    oca = SevCertificate.generate(Usage.OCA, oca_key.public_key(), *api).sign(Usage.OCA, oca_key)
    pek = (SevCertificate.generate(Usage.PEK, pek_key.public_key(), *api)
           .sign(Usage.OCA, oca_key).sign(Usage.CEK, cek_key))
    pdh = SevCertificate.generate(Usage.PDH, pdh_key.public_key(), *api).sign(Usage.PEK, pek_key)
    return PlatformKeys(pdh_key, pdh.to_bytes(), pek.to_bytes(), oca.to_bytes(), cek.to_bytes(), ask.to_bytes(),
                        ark.to_bytes())


@dataclass
class FirmwareLaunch:
    """The platform side of one launch: unwrap the session, measure, and later open the secret."""

    tek: bytes = field(repr=False)
    tik: bytes = field(repr=False)
    measurement: bytes = b""

    @classmethod
    def start(cls, platform: PlatformKeys, grant: dict) -> FirmwareLaunch:
        tek, tik = open_session(platform.pdh_private, base64.b64decode(grant["godh"]),
                                base64.b64decode(grant["session"]), grant["policy"])
        return cls(tek, tik)

    def measure(self, digest: bytes, policy: int, api: tuple[int, int] = API, build: int = BUILD) -> str:
        mnonce = os.urandom(16)
        self.measurement = compute_measurement(self.tik, api[0], api[1], build, policy, digest, mnonce)
        return base64.b64encode(self.measurement + mnonce).decode()

    def open_secret(self, answer: dict, api: tuple[int, int] = API) -> SecretTable:
        plain = unwrap_secret(self.tek, self.tik, self.measurement, base64.b64decode(answer["secret_header"]),
                              base64.b64decode(answer["secret"]), api[0], api[1])
        return SecretTable.parse(plain)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class BrokerProcess:
    """`sevhook broker serve` in a child process; `stop()` signals exactly that pid."""

    def __init__(self, data_dir: Path, db_url: str | None = None, extra: tuple[str, ...] = (),
                 tls: tuple[Path, Path] | None = None, ca_file: Path | None = None) -> None:
        self.data_dir = data_dir
        self.db_url = db_url or f"sqlite:///{data_dir / 'broker.sqlite3'}"
        self.port = free_port()
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.ca_file = ca_file
        command = [*SEVHOOK, "broker", "serve", "--init", "--data-dir", str(data_dir), "--listen",
                   f"127.0.0.1:{self.port}", *extra]
        if db_url:
            command += ["--db", db_url]
        if tls:
            command += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
        self.log_path = data_dir / f"serve-{self.port}.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()  # never leave a server behind when the fixture fails
            raise

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        verify = self.verify
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"broker exited with {self.process.returncode}: {self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0, verify=verify).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"broker not ready within {timeout} s: {self.log()}")

    @property
    def verify(self) -> ssl.SSLContext | bool:
        return ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def admin_token(self) -> str:
        return (self.data_dir / "admin.token").read_text().strip()

    def admin(self) -> httpx.Client:
        verify = self.verify
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.admin_token}"},
                            timeout=30.0, verify=verify)

    def stop(self) -> None:
        if self._log.closed:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self._log.close()


@dataclass
class Owner:
    """A running broker with a registered test root, a host token and helpers to register guests."""

    broker: BrokerProcess
    platform: PlatformKeys
    host_token: str
    host_name: str

    def host(self, token: str | None = None) -> httpx.Client:
        token = self.host_token if token is None else token
        verify = self.broker.verify
        return httpx.Client(base_url=self.broker.url, headers={"Authorization": f"Bearer {token}"},
                            timeout=30.0, verify=verify)

    def add_guest(self, digests: tuple[bytes, ...] = (DIGEST_A,), policies: tuple[int, ...] = (0x1,),
                  secret: bytes = b"passphrase\0", reusable: bool = False, min_api: tuple[int, int] = (0, 0),
                  min_build: int = 0) -> str:
        guest_id = f"guest-{uuid.uuid4().hex[:12]}"
        body = {"id": guest_id, "digests": [d.hex() for d in digests], "policies": list(policies),
                "min_api_major": min_api[0], "min_api_minor": min_api[1], "min_build": min_build,
                "secrets": [{"guid": str(SECRET_GUID), "value": base64.b64encode(secret).decode()}],
                "reusable": reusable}
        with self.broker.admin() as admin:
            response = admin.post("/admin/guests", json=body)
        assert response.status_code == 200, response.text
        return guest_id

    def launch(self, guest_id: str, platform: PlatformKeys | None = None, **extra: object) -> dict:
        platform = platform or self.platform
        with self.host() as host:
            response = host.post("/v1/launches", json={"guest": guest_id, "pdh": platform.pdh_b64,
                                                        "cert_chain": platform.chain_b64, **extra})
        assert response.status_code == 200, response.text
        return response.json()

    def attest(self, launch_id: str, measurement: str, policy: int = 0x1, api: tuple[int, int] = API,
               build: int = BUILD, token: str | None = None) -> httpx.Response:
        with self.host(token) as host:
            return host.post(f"/v1/launches/{launch_id}/attestation",
                             json={"measurement": measurement, "api_major": api[0], "api_minor": api[1],
                                   "build_id": build, "policy": policy})


def register(broker: BrokerProcess, platform: PlatformKeys, root_name: str = "test-root") -> Owner:
    host_name = f"host-{uuid.uuid4().hex[:8]}"
    with broker.admin() as admin:
        roots = admin.get("/admin/roots").json()
        if not any(r["name"] == root_name for r in roots):
            response = admin.post("/admin/roots", json={"name": root_name, "test": True,
                                                        "ca": base64.b64encode(platform.ca).decode()})
            assert response.status_code == 200, response.text
        response = admin.post("/admin/hosts", json={"name": host_name})
        assert response.status_code == 200, response.text
    return Owner(broker, platform, response.json()["token"], host_name)


@pytest.fixture(scope="session")
def platform() -> PlatformKeys:
    return make_platform()


@pytest.fixture(scope="session")
def other_platform() -> PlatformKeys:
    """A second platform under a root the broker does not know."""
    return make_platform()


@pytest.fixture(scope="session")
def pg_database(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh database on the test PostgreSQL server, dropped afterwards."""
    import psycopg
    from sqlalchemy.engine import make_url

    base = make_url(request.getfixturevalue("postgres_url"))
    name = f"broker_{uuid.uuid4().hex[:10]}"
    server = base.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield base.set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def broker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """One real broker process per test module and database backend."""
    db_url = request.getfixturevalue("pg_database") if request.param == "postgresql" else None
    process = BrokerProcess(tmp_path_factory.mktemp(f"broker-{request.param}"), db_url=db_url)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def owner(broker: BrokerProcess, platform: PlatformKeys) -> Owner:
    return register(broker, platform, root_name=f"test-root-{uuid.uuid4().hex[:6]}")
