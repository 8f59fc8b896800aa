"""The broker's data directory and database under damage and misuse: file modes, empty and corrupt
databases, database passwords kept off the command line, TLS files that are not what they claim, and
the rule that unauthenticated platform fields (API < 0.17) cannot satisfy a version rule."""

from __future__ import annotations

import datetime
import json
import os
import sqlite3
import stat
import subprocess
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import make_url

from sevhook.broker.server import database_url
from sevhook.errors import UsageError
from tests.broker.conftest import (
    DIGEST_A,
    ROOT,
    SEVHOOK,
    BrokerProcess,
    FirmwareLaunch,
    PlatformKeys,
    make_platform,
    register,
)


def sevhook(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SEVHOOK, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def one_clear_line(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert result.returncode in (1, 2), result
    assert "Traceback" not in result.stderr and "SELECT" not in result.stderr and "INSERT" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr


def test_api_0_16_cannot_satisfy_a_minimum_build(tmp_path: Path) -> None:
    """Below API 0.17 the measurement covers neither version nor build: a claimed build 255 must not pass
    a minimum of 200 on a build-15 platform."""
    old = make_platform(api=(0, 16))
    process = BrokerProcess(tmp_path / "data")
    try:
        owner = register(process, old)
        guest = owner.add_guest(min_build=200)
        grant = owner.launch(guest)
        firmware = FirmwareLaunch.start(old, grant)
        answer = owner.attest(grant["launch_id"], firmware.measure(DIGEST_A, 0x1, api=(0, 16), build=255),
                              api=(0, 16), build=255)
        assert answer.status_code == 403 and answer.json()["reason"] == "version-unauthenticated", answer.text
        assert "secret" not in answer.json() and "0.17" in answer.json()["error"]
        # without a version rule the same platform still gets its secret
        plain = owner.add_guest()
        grant = owner.launch(plain)
        firmware = FirmwareLaunch.start(old, grant)
        answer = owner.attest(grant["launch_id"], firmware.measure(DIGEST_A, 0x1, api=(0, 16), build=15),
                              api=(0, 16), build=15)
        assert answer.status_code == 200, answer.text
        assert firmware.open_secret(answer.json(), api=(0, 16)).entries
    finally:
        process.stop()


def test_init_makes_the_data_directory_and_database_files_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    assert sevhook("broker", "init", "--data-dir", data).returncode == 0
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    database = data / "broker.sqlite3"
    for member in (database, data / "broker.sqlite3-wal", data / "broker.sqlite3-shm"):
        if member.exists():
            assert stat.S_IMODE(member.stat().st_mode) == 0o600, member
    assert stat.S_IMODE(database.stat().st_mode) == 0o600
    database.chmod(0o644)
    assert sevhook("broker", "list-hosts", "--data-dir", data).returncode == 0
    assert stat.S_IMODE(database.stat().st_mode) == 0o600


def test_a_data_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to hand the directory to another user")
    data = tmp_path / "data"
    assert sevhook("broker", "init", "--data-dir", data).returncode == 0
    os.chown(data, 65534, 65534)
    one_clear_line(sevhook("broker", "list-hosts", "--data-dir", data), "belongs to uid 65534")
    one_clear_line(sevhook("broker", "init", "--data-dir", data), "belongs to uid 65534")


def test_an_empty_or_missing_database_is_refused_not_served_empty(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert sevhook("broker", "init", "--data-dir", data).returncode == 0
    database = data / "broker.sqlite3"
    database.write_bytes(b"")
    one_clear_line(sevhook("broker", "list-guests", "--data-dir", data), "empty (0 bytes)", "restore it")
    one_clear_line(sevhook("broker", "serve", "--listen", "127.0.0.1:0", "--data-dir", data), "empty (0 bytes)")
    one_clear_line(sevhook("broker", "serve", "--init", "--listen", "127.0.0.1:0", "--data-dir", data),
                   "empty (0 bytes)")
    database.unlink()
    one_clear_line(sevhook("broker", "list-guests", "--data-dir", data), "missing", "broker init")
    sqlite3.connect(database).execute("CREATE TABLE other (x)").connection.close()  # some other database
    one_clear_line(sevhook("broker", "list-guests", "--data-dir", data), "no broker tables")


def _corrupt(database: Path) -> None:
    """Overwrite every page but the first (the schema stays readable, the tables do not)."""
    conn = sqlite3.connect(database)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    size = database.stat().st_size
    with database.open("r+b") as handle:
        handle.seek(page)
        handle.write(b"\xa5" * (size - page))


def test_database_errors_are_one_line_without_sql(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert sevhook("broker", "init", "--data-dir", data).returncode == 0
    for index in range(40):
        assert sevhook("broker", "add-guest", f"g{index}", "--digest", f"{index:02x}" * 32, "--data-dir",
                       data).returncode == 0
    _corrupt(data / "broker.sqlite3")
    one_clear_line(sevhook("broker", "list-guests", "--data-dir", data), "malformed", "backup")
    token_file = tmp_path / "h.token"
    one_clear_line(sevhook("broker", "add-host", "h", "--token-file", token_file, "--data-dir", data), "database")
    assert not token_file.exists()  # the failed registration took its token file with it
    one_clear_line(sevhook("broker", "revoke-guest", "g1", "--data-dir", data), "database")


def test_health_and_readiness_tell_the_truth_about_a_corrupt_database(tmp_path: Path, platform: PlatformKeys) -> None:
    process = BrokerProcess(tmp_path / "data")
    try:
        owner = register(process, platform)
        for _ in range(30):
            owner.add_guest()
        with process.admin() as admin:
            assert admin.get("/healthz").status_code == 200 and admin.get("/readyz").status_code == 200
            _corrupt(process.data_dir / "broker.sqlite3")
            for path in ("/healthz", "/readyz"):
                response = httpx.get(f"{process.url}{path}", timeout=10)
                assert response.status_code == 503, (path, response.text)
                assert response.json()["reason"] == "database-unavailable"
            listing = admin.get("/admin/guests")
            assert listing.status_code == 503 and "SELECT" not in listing.text
    finally:
        process.stop()


def test_a_password_in_the_database_url_is_refused(tmp_path: Path) -> None:
    result = sevhook("broker", "list-hosts", "--data-dir", tmp_path, "--db",
                     "postgresql+psycopg://owner:s3cret-pw@127.0.0.1:5432/broker")
    one_clear_line(result, "--db-password-file", "SEVHOOK_DB_PASSWORD")
    assert "s3cret-pw" not in result.stderr


def test_the_password_comes_from_a_private_file_or_the_environment(tmp_path: Path) -> None:
    url = "postgresql+psycopg://owner@db.example.org:5432/broker"
    password_file = tmp_path / "db.password"
    password_file.write_text("from-the-file\n")
    password_file.chmod(0o644)
    with pytest.raises(UsageError, match="chmod 600"):
        database_url(url, tmp_path, password_file, environ={})
    password_file.chmod(0o600)
    assert database_url(url, tmp_path, password_file, environ={}).password == "from-the-file"
    assert database_url(url, tmp_path, None, environ={"SEVHOOK_DB_PASSWORD": "from-env"}).password == "from-env"
    assert database_url(url, tmp_path, None, environ={}).password is None
    with pytest.raises(UsageError, match="PostgreSQL only"):
        database_url(None, tmp_path, password_file, environ={})
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(UsageError, match="not a regular file"):
        database_url(url, tmp_path, fifo, environ={})
    shown = make_url(url).set(password="x").render_as_string(hide_password=True)
    assert "***" in shown


@pytest.mark.postgres
def test_the_environment_password_reaches_postgresql(tmp_path: Path, pg_database: str) -> None:
    url = make_url(pg_database)
    bare = url.set(password=None).render_as_string(hide_password=False)
    env = {"SEVHOOK_DB_PASSWORD": url.password or "unused-by-trust-auth"}
    assert sevhook("broker", "init", "--data-dir", tmp_path / "data", "--db", bare, env=env).returncode == 0
    listing = sevhook("broker", "list-hosts", "--json", "--data-dir", tmp_path / "data", "--db", bare, env=env)
    # the session's shared database may hold other tests' hosts: the listing itself shows the login worked
    assert listing.returncode == 0 and isinstance(json.loads(listing.stdout), list), listing.stderr


@pytest.mark.parametrize("cert, key, expected", [
    ("/dev/zero", "KEY", "--tls-cert /dev/zero: is a character device, not a regular file"),
    ("CERT", "/dev/zero", "--tls-key /dev/zero: is a character device, not a regular file"),
    ("GARBAGE", "KEY", "not a PEM certificate"),
    ("CERT", "GARBAGE", "not a PEM private key"),
    ("CERT", "OTHER_KEY", "the key does not belong to the certificate"),
    ("DIR", "KEY", "not a regular file"),
])
def test_tls_files_get_an_accurate_message(tmp_path: Path, cert: str, key: str, expected: str) -> None:
    def pem_key(private: ec.EllipticCurvePrivateKey) -> bytes:
        return private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())

    private, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "broker")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
                   .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
                   .sign(private, hashes.SHA256()))
    files = {"CERT": certificate.public_bytes(serialization.Encoding.PEM), "KEY": pem_key(private),
             "OTHER_KEY": pem_key(other), "GARBAGE": b"not pem at all\n"}
    paths = {}
    for label, content in files.items():
        paths[label] = tmp_path / f"{label.lower()}.pem"
        paths[label].write_bytes(content)
    paths["DIR"] = tmp_path
    result = sevhook("broker", "serve", "--init", "--listen", "127.0.0.1:0", "--data-dir", tmp_path / "data",
                     "--tls-cert", paths.get(cert, cert), "--tls-key", paths.get(key, key))
    one_clear_line(result, expected)
