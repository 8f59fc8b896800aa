"""`sevhook broker` admin commands on a data directory, then the server they configured; and the
broker's chain check on AMD's real Naples chain from tests/data/vectors."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import stat
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from sevhook.sev.secret import DISK_PASSPHRASE_GUID
from tests.broker.conftest import API, ROOT, SEVHOOK, BrokerProcess, FirmwareLaunch, PlatformKeys

# a plain SEV launch digest is SHA-256 of the flash image (the firmware has a secret area for the secrets)
AMDSEV_DIGEST = hashlib.sha256(
    (ROOT / "tests/data/vectors/sev-snp-measure/ovmf_AmdSev_suffix.bin").read_bytes()).hexdigest()


def sevhook(*args: str | Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*SEVHOOK, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    if ok:
        assert result.returncode == 0, result.stderr
    return result


def test_admin_commands_configure_a_working_broker(tmp_path: Path, platform: PlatformKeys, shared: Path) -> None:
    data = tmp_path / "data"
    assert "created admin token" in sevhook("broker", "init", "--data-dir", data).stdout
    assert stat.S_IMODE((data / "admin.token").stat().st_mode) == 0o600
    ca = tmp_path / "ca.bin"
    ca.write_bytes(platform.ca)
    refused = sevhook("broker", "add-root", "lab", "--ca", ca, "--data-dir", data, ok=False)
    assert refused.returncode == 2 and "not one of AMD's published roots" in refused.stderr
    assert "test root" in sevhook("broker", "add-root", "lab", "--ca", ca, "--test", "--data-dir", data).stdout
    token_file = tmp_path / "host1.token"
    sevhook("broker", "add-host", "host1", "--token-file", token_file, "--data-dir", data)
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    (tmp_path / "pass").write_text("correct horse\n")
    (tmp_path / "blob").write_bytes(b"\x00\x01binary")
    other_guid = uuid.uuid4()
    added = sevhook("broker", "add-guest", "web1", "--data-dir", data, "--digest", "00" * 32,
                    "--firmware", shared / "vectors/sev-snp-measure/ovmf_AmdSev_suffix.bin",
                    "--policy", "0x1", "--policy", "5", "--min-api", "0.17", "--min-build", "10",
                    "--disk-passphrase", tmp_path / "pass", "--secret", f"{other_guid}:{tmp_path / 'blob'}").stdout
    assert AMDSEV_DIGEST in added and "correct horse" not in added
    listing = json.loads(sevhook("broker", "list-guests", "--json", "--data-dir", data).stdout)
    assert listing[0]["policies"] == [1, 5] and listing[0]["min_api"] == "0.17"
    assert [d["digest"] for d in listing[0]["digests"]] == ["00" * 32, AMDSEV_DIGEST]

    broker = BrokerProcess(data)
    try:
        host = httpx.Client(base_url=broker.url, headers={"Authorization": f"Bearer {token_file.read_text().strip()}"})
        grant = host.post("/v1/launches", json={"guest": "web1", "pdh": platform.pdh_b64,
                                                "cert_chain": platform.chain_b64}).json()
        firmware = FirmwareLaunch.start(platform, grant)
        answer = host.post(f"/v1/launches/{grant['launch_id']}/attestation", json={
            "measurement": firmware.measure(bytes.fromhex(AMDSEV_DIGEST), 0x1), "api_major": API[0],
            "api_minor": API[1], "build_id": 15, "policy": 0x1})
        assert answer.status_code == 200, answer.text
        assert dict(firmware.open_secret(answer.json()).entries) == {
            DISK_PASSPHRASE_GUID: b"correct horse\0", other_guid: b"\x00\x01binary"}
        host.close()
    finally:
        broker.stop()

    assert "revoked" in sevhook("broker", "revoke-guest", "web1", "--data-dir", data).stdout
    missing = sevhook("broker", "revoke-guest", "nope", "--data-dir", data, ok=False)
    assert missing.returncode == 1 and "not registered" in missing.stderr and "Traceback" not in missing.stderr
    audit = json.loads(sevhook("broker", "audit", "--json", "--guest", "web1", "--data-dir", data).stdout)
    assert [(e["action"], e["reason"]) for e in audit] == [
        ("add-guest", "ok"), ("create-launch", "ok"), ("attest", "released"), ("revoke-guest", "ok")]
    text = sevhook("broker", "audit", "--data-dir", data).stdout
    assert "released" in text and "correct horse" not in text


@pytest.mark.parametrize("args, message", [
    (("add-guest", "g", "--policy", "1"), "--digest HEX or --firmware"),
    (("add-guest", "g", "--digest", "abc"), "64 hex digits"),
    (("add-guest", "g", "--digest", "00" * 32, "--secret", "nope"), "GUID:FILE"),
    (("add-guest", "g", "--digest", "00" * 32, "--min-api", "x"), "MAJOR.MINOR"),
    (("add-guest", "g", "--digest", "00" * 32, "--kernel", "k"), "--firmware"),
    (("add-root", "r", "--ca", "/nonexistent"), "cannot read"),
    (("serve", "--listen", "nowhere"), "ADDR:PORT"),
    (("serve", "--tls-cert", "/nonexistent"), "--tls-key"),
    (("serve", "--init", "--tls-cert", "/missing.crt", "--tls-key", "/missing.key"),
     "--tls-cert /missing.crt: file not found"),
    (("serve", "--listen", "127.0.0.1:0"), "run `sevhook broker init --data-dir"),
    (("add-host", "h", "--token-file", "/proc/sevhook-h.token"), "/proc/sevhook-h.token: cannot write ("),
    (("revoke-host", "nope"), "not registered"),
])
def test_bad_admin_input_gives_one_clear_message(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    if args[0] in ("add-host", "revoke-host"):
        sevhook("broker", "init", "--data-dir", tmp_path / "data")
    result = sevhook("broker", *args, "--data-dir", tmp_path / "data", ok=False)
    assert result.returncode in (1, 2) and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_real_naples_chain_verifies_only_under_the_registered_amd_root(tmp_path: Path, shared: Path) -> None:
    chains = shared / "vectors/chains/naples"
    roots = shared / "vectors/amd-roots"
    data = tmp_path / "data"
    sevhook("broker", "init", "--data-dir", data)
    token_file = tmp_path / "host.token"
    sevhook("broker", "add-host", "h", "--token-file", token_file, "--data-dir", data)
    sevhook("broker", "add-guest", "g", "--digest", "11" * 32, "--data-dir", data)
    body = {"guest": "g", "pdh": base64.b64encode((chains / "pdh.cert").read_bytes()).decode(),
            "cert_chain": base64.b64encode((chains / "cert_chain_export.bin").read_bytes()).decode()}
    full = dict(body, cert_chain=base64.b64encode((chains / "full_chain.bin").read_bytes()).decode())
    broker = BrokerProcess(data)
    try:
        host = httpx.Client(base_url=broker.url, headers={"Authorization": f"Bearer {token_file.read_text().strip()}"})
        assert host.post("/v1/launches", json=full).json()["reason"] == "unknown-root"
        bundle = tmp_path / "naples.cert"
        bundle.write_bytes((roots / "naples_ask.cert").read_bytes() + (roots / "naples_ark.cert").read_bytes())
        assert "AMD root" in sevhook("broker", "add-root", "naples", "--ca", bundle, "--data-dir", data).stdout
        for request in (full, body):
            response = host.post("/v1/launches", json=request)
            assert response.status_code == 200, response.text
            assert len(base64.b64decode(response.json()["godh"])) == 2084
        host.close()
    finally:
        broker.stop()


def test_a_failed_token_write_registers_nothing_and_a_taken_name_leaves_no_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    sevhook("broker", "init", "--data-dir", data)
    failed = sevhook("broker", "add-host", "host1", "--token-file", "/proc/host1.token", "--data-dir", data, ok=False)
    assert failed.returncode == 2 and "choose a writable location" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert json.loads(sevhook("broker", "list-hosts", "--json", "--data-dir", data).stdout) == []
    token_file = tmp_path / "host1.token"
    sevhook("broker", "add-host", "host1", "--token-file", token_file, "--data-dir", data)  # the name is free
    taken = sevhook("broker", "add-host", "host1", "--token-file", tmp_path / "second.token", "--data-dir", data,
                    ok=False)
    assert taken.returncode == 2 and "already registered" in taken.stderr
    assert not (tmp_path / "second.token").exists() and token_file.exists()


def test_hosts_are_listed_and_a_revoked_host_is_refused(tmp_path: Path, platform: PlatformKeys) -> None:
    data = tmp_path / "data"
    sevhook("broker", "init", "--data-dir", data)
    for name in ("host1", "host2"):
        sevhook("broker", "add-host", name, "--token-file", tmp_path / f"{name}.token", "--data-dir", data)
    sevhook("broker", "add-guest", "g", "--digest", "11" * 32, "--data-dir", data)
    revoked = sevhook("broker", "revoke-host", "host1", "--data-dir", data).stdout
    assert "host1: revoked" in revoked
    listing = sevhook("broker", "list-hosts", "--data-dir", data).stdout.splitlines()
    assert [line.split("\t")[:2] for line in listing] == [["host1", "revoked"], ["host2", "active"]]
    hosts = json.loads(sevhook("broker", "list-hosts", "--json", "--data-dir", data).stdout)
    assert [(h["name"], h["revoked"]) for h in hosts] == [("host1", True), ("host2", False)]
    assert all("token" not in key for host in hosts for key in host)
    again = sevhook("broker", "add-host", "host1", "--token-file", tmp_path / "again.token", "--data-dir", data,
                    ok=False)
    assert again.returncode == 2 and "never reused" in again.stderr
    body = {"guest": "g", "pdh": platform.pdh_b64, "cert_chain": platform.chain_b64}
    broker = BrokerProcess(data)
    try:
        for name, status, reason in (("host1", 403, "host-revoked"), ("host2", 403, "unknown-root")):
            token = (tmp_path / f"{name}.token").read_text().strip()
            answer = httpx.post(f"{broker.url}/v1/launches", json=body, headers={"Authorization": f"Bearer {token}"})
            assert (answer.status_code, answer.json()["reason"]) == (status, reason), answer.text
    finally:
        broker.stop()


def test_a_revoked_guest_id_is_not_offered_for_reuse(tmp_path: Path) -> None:
    data = tmp_path / "data"
    sevhook("broker", "init", "--data-dir", data)
    sevhook("broker", "add-guest", "web1", "--digest", "11" * 32, "--data-dir", data)
    sevhook("broker", "revoke-guest", "web1", "--data-dir", data)
    again = sevhook("broker", "add-guest", "web1", "--digest", "11" * 32, "--data-dir", data, ok=False)
    assert again.returncode == 2 and "never reused" in again.stderr and "pick another id" in again.stderr
    assert "revoke it" not in again.stderr


@pytest.mark.parametrize("url", [
    "postgresql+nodriver://owner:hunter2-secret@127.0.0.1/db",
    "postgresql+psycopg://owner:hunter2-secret@127.0.0.1:notaport/db",
    "postgresql+psycopg://owner:hunter2-secret@127.0.0.1:1/db",  # nothing listens: the connection fails
    "mysql://owner:hunter2-secret@127.0.0.1/db",
])
def test_database_password_is_never_printed(tmp_path: Path, url: str) -> None:
    data = tmp_path / "data"
    sevhook("broker", "init", "--data-dir", data)
    result = sevhook("broker", "list-guests", "--data-dir", data, "--db", url, ok=False)
    assert result.returncode == 2, result.stderr
    assert "hunter2" not in result.stderr + result.stdout and "owner:***@127.0.0.1" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_an_uninitialised_data_dir_unless_told_and_logs_the_bound_port(tmp_path: Path) -> None:
    typo = tmp_path / "typo"
    refused = sevhook("broker", "serve", "--data-dir", typo, "--listen", "127.0.0.1:0", ok=False)
    assert refused.returncode == 2 and "not an initialised broker data directory" in refused.stderr
    assert "--init" in refused.stderr and not typo.exists()
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        process = subprocess.Popen([*SEVHOOK, "broker", "serve", "--init", "--data-dir", str(typo), "--listen",
                                    "127.0.0.1:0"], cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not re.search(r"broker on http://127\.0\.0\.1:(\d+),", log.read_text()):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        port = int(re.search(r"broker on http://127\.0\.0\.1:(\d+),", log.read_text()).group(1))
        assert port != 0
        while True:
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).json() == {"status": "ok"}
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
    finally:
        process.terminate()
        process.wait(timeout=15)
    assert (typo / "storage.key").exists()
