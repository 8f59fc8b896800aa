"""`sevhook broker` admin commands on a data directory, then the server they configured; and the
broker's chain check on AMD's real Naples chain from ../shared/vectors."""

from __future__ import annotations

import base64
import json
import stat
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest

from conftest import API, SEVHOOK, BrokerProcess, FirmwareLaunch, PlatformKeys, ROOT
from sevhook.sev.secret import DISK_PASSPHRASE_GUID

OVMF_X64_DIGEST = "b4c021e085fb83ceffe6571a3d357b4a98773c83c474e47f76c876708fe316da"


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
                    "--firmware", shared / "vectors/sev-snp-measure/ovmf_OvmfX64_suffix.bin",
                    "--policy", "0x1", "--policy", "5", "--min-api", "0.17", "--min-build", "10",
                    "--disk-passphrase", tmp_path / "pass", "--secret", f"{other_guid}:{tmp_path / 'blob'}").stdout
    assert OVMF_X64_DIGEST in added and "correct horse" not in added
    listing = json.loads(sevhook("broker", "list-guests", "--json", "--data-dir", data).stdout)
    assert listing[0]["policies"] == [1, 5] and listing[0]["min_api"] == "0.17"
    assert [d["digest"] for d in listing[0]["digests"]] == ["00" * 32, OVMF_X64_DIGEST]

    broker = BrokerProcess(data)
    try:
        host = httpx.Client(base_url=broker.url, headers={"Authorization": f"Bearer {token_file.read_text().strip()}"})
        grant = host.post("/v1/launches", json={"guest": "web1", "pdh": platform.pdh_b64,
                                                "cert_chain": platform.chain_b64}).json()
        firmware = FirmwareLaunch.start(platform, grant)
        answer = host.post(f"/v1/launches/{grant['launch_id']}/attestation", json={
            "measurement": firmware.measure(bytes.fromhex(OVMF_X64_DIGEST), 0x1), "api_major": API[0],
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
])
def test_bad_admin_input_gives_one_clear_message(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
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
