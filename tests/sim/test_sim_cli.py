"""`sevhook sim platform init|status|export` and `sevhook sim secrets`, run as a user would."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

from sevhook.sev.certs import SevCertificate
from sevhook.sev.secret import DISK_PASSPHRASE_GUID, SecretTable, wrap_secret
from sevhook.sim.platform import SoftwarePlatform
from sevhook.sim.state import StateDir
from tests.sim.sim_support import make_session

SEVHOOK = str(Path(sys.executable).with_name("sevhook"))


def sevhook(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([SEVHOOK, *args], capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_init_status_and_reconfigure(tmp_path: Path) -> None:
    state = str(tmp_path / "sim")
    assert "created" in sevhook("sim", "platform", "init", "--state-dir", state, "--rsa-bits", "2048").stdout
    ark = (tmp_path / "sim" / "ark.cert").read_bytes()
    assert "unchanged" in sevhook("sim", "platform", "init", "--state-dir", state).stdout
    sevhook("sim", "platform", "init", "--state-dir", state, "--api-major", "0", "--api-minor", "16", "--no-es")
    status = json.loads(sevhook("sim", "platform", "status", "--state-dir", state, "--json").stdout)
    assert (status["api_major"], status["api_minor"], status["es"], status["build_id"]) == (0, 16, False, 21)
    assert (tmp_path / "sim" / "ark.cert").read_bytes() == ark  # the keys are kept
    bad = sevhook("sim", "platform", "init", "--state-dir", state, "--api-minor", "300", check=False)
    assert bad.returncode != 0 and "0..255" in bad.stderr and "Traceback" not in bad.stderr


def test_export_layouts_verify_with_the_owner_tools(platform: SoftwarePlatform, tmp_path: Path) -> None:
    state = str(platform.state.path)
    sevhook("sim", "platform", "export", "--state-dir", state, "--out-dir", str(tmp_path))
    sizes = {name: (tmp_path / name).stat().st_size for name in
             ("full_chain.bin", "pdh.cert", "cert_chain.cert", "chip_id.hex", "ask_ark.cert", "ark.cert")}
    assert sizes["pdh.cert"] == 2084 and sizes["cert_chain.cert"] == 3 * 2084
    assert sizes["full_chain.bin"] == 4 * 2084 + sizes["ask_ark.cert"]
    verified = sevhook("owner", "verify-chain", str(tmp_path / "full_chain.bin"), "--trust-anchor",
                       str(tmp_path / "ark.cert"))
    assert "chain valid" in verified.stdout
    untrusted = sevhook("owner", "verify-chain", str(tmp_path / "full_chain.bin"), check=False)
    assert untrusted.returncode != 0  # a simulated root is never trusted implicitly
    pdh_b64 = sevhook("sim", "platform", "export", "--state-dir", state, "--format", "pdh", "--base64").stdout
    assert SevCertificate.parse(base64.b64decode(pdh_b64)).to_bytes() == platform.cert("pdh")


def test_secrets_hides_values_unless_asked(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "sim")
    sevhook("sim", "platform", "init", "--state-dir", str(state.path), "--rsa-bits", "2048")
    platform = SoftwarePlatform(state)
    session = make_session(platform)
    guest = platform.launch_start(1, session.godh_cert, session.session, label="web1")
    guest.launch_update_data(b"fw")
    measurement = guest.launch_measure()[:32]
    table = SecretTable(((DISK_PASSPHRASE_GUID, b"luks-pass\0"),)).build()
    header, ciphertext = wrap_secret(session.tek, session.tik, measurement, table, api_major=1, api_minor=55)
    guest.launch_secret(header.to_bytes(), ciphertext, 0x80C000)
    plain = sevhook("sim", "secrets", "--state-dir", str(state.path), "--domain", "web1").stdout
    assert str(DISK_PASSPHRASE_GUID) in plain and "10 bytes" in plain and "luks-pass" not in plain
    shown = sevhook("sim", "secrets", "--state-dir", str(state.path), "--domain", "web1", "--show-values").stdout
    assert "'luks-pass' (NUL-terminated)" in shown
    [record] = json.loads(sevhook("sim", "secrets", "--state-dir", str(state.path), "--json").stdout)
    assert "value_b64" not in json.dumps(record)
    missing = sevhook("sim", "secrets", "--state-dir", str(state.path), "--domain", "nope", check=False)
    assert missing.returncode == 1 and "no guest named 'nope'" in missing.stderr


def test_uninitialised_state_dir_says_what_to_do(tmp_path: Path) -> None:
    result = sevhook("sim", "platform", "status", "--state-dir", str(tmp_path / "none"), check=False)
    assert result.returncode == 1 and "sevhook sim platform init" in result.stderr
    result = sevhook("sim", "platform", "export", "--state-dir", str(tmp_path / "none"), "--out", "x", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
