"""`sevhook owner` end to end through a real subprocess: exit codes, printed links and values,
files written 0600, and clear one-line errors (never a traceback) on bad input."""

from __future__ import annotations

import base64
import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sevhook.sev.measurement import compute_measurement
from sevhook.sev.secret import DISK_PASSPHRASE_GUID, SecretTable, unwrap_secret
from sevhook.sev.session import open_session

MEASUREMENT_BLOB = "TLeA7607lZQntLjRY1/i+sbtdSZ+75zxpz4Px9hzpBLwItF5Q2o4prA++3ZZv9ZS"


def sevhook(*args: str | Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "sevhook.cli", "owner", *map(str, args)],
                          capture_output=True, text=True, timeout=60)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_verify_chain_full(naples: Path) -> None:
    proc = sevhook("verify-chain", naples / "full_chain.bin")
    assert proc.returncode == 0, proc.stderr
    assert "ok    PEK -> PDH" in proc.stdout and "certified by AMD Naples" in proc.stdout


def test_verify_chain_qmp_base64_and_bundle(tmp_path: Path, naples: Path, vectors: Path) -> None:
    (tmp_path / "pdh.b64").write_bytes(base64.b64encode((naples / "pdh.cert").read_bytes()))
    (tmp_path / "chain.b64").write_bytes(base64.b64encode((naples / "cert_chain_export.bin").read_bytes()))
    (tmp_path / "ask_ark_naples.cert").write_bytes(
        (vectors / "amd-roots" / "naples_ask.cert").read_bytes()
        + (vectors / "amd-roots" / "naples_ark.cert").read_bytes()
    )
    proc = sevhook("verify-chain", tmp_path / "chain.b64", "--pdh", tmp_path / "pdh.b64",
                   "--ark", tmp_path / "ask_ark_naples.cert")
    assert proc.returncode == 0, proc.stderr


def test_verify_chain_failure_names_the_link(naples: Path, vectors: Path) -> None:
    proc = sevhook("verify-chain", naples / "cert_chain_export.bin", "--pdh", naples / "pdh.cert",
                   "--ark", vectors / "amd-roots" / "milan_ark.cert", "--ask", vectors / "amd-roots" / "milan_ask.cert")
    assert proc.returncode == 1
    assert "FAIL  ASK -> CEK" in proc.stdout and "chain INVALID" in proc.stderr


def test_verify_chain_trust_anchor(tmp_path: Path, platform) -> None:
    (tmp_path / "full.bin").write_bytes(platform.chain.to_full())
    (tmp_path / "sim_ark.cert").write_bytes(platform.chain.ark.to_bytes())
    untrusted = sevhook("verify-chain", tmp_path / "full.bin")
    assert untrusted.returncode == 1 and "--trust-anchor" in untrusted.stdout
    trusted = sevhook("verify-chain", tmp_path / "full.bin", "--trust-anchor", tmp_path / "sim_ark.cert")
    assert trusted.returncode == 0 and "trust anchor 'sim_ark.cert'" in trusted.stdout


@pytest.mark.parametrize(
    "content,code,message",
    [(None, 2, "cannot read"), (b"garbage", 1, "expected PDH"),
     (b"\x01\0\0\0" + bytes(10000), 1, "usage ARK where the PDH belongs")],
)
def test_verify_chain_bad_files(tmp_path: Path, content: bytes | None, code: int, message: str) -> None:
    path = tmp_path / "chain.bin"
    if content is not None:
        path.write_bytes(content)
    proc = sevhook("verify-chain", path)
    assert proc.returncode == code and message in proc.stderr
    assert proc.stderr.count("\n") <= 2


def test_session_round_trip_with_emulated_platform(tmp_path: Path, platform) -> None:
    (tmp_path / "full.bin").write_bytes(platform.chain.to_full())
    (tmp_path / "pdh.cert").write_bytes(platform.chain.pdh.to_bytes())
    (tmp_path / "ark.cert").write_bytes(platform.chain.ark.to_bytes())
    out = tmp_path / "out"
    out.mkdir()
    proc = sevhook("session", "--pdh", tmp_path / "pdh.cert", "--chain", tmp_path / "full.bin",
                   "--trust-anchor", tmp_path / "ark.cert", "--policy", "0x18010037", "--out-dir", out, "--name", "vm1")
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["vm1_godh.b64", "vm1_session.b64", "vm1_tek.bin", "vm1_tik.bin"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in out.iterdir())
    tek, tik = open_session(platform.pdh_key, base64.b64decode((out / "vm1_godh.b64").read_bytes()),
                            base64.b64decode((out / "vm1_session.b64").read_bytes()), 0x18010037)
    assert (tek, tik) == ((out / "vm1_tek.bin").read_bytes(), (out / "vm1_tik.bin").read_bytes())
    assert tek.hex() not in proc.stdout + proc.stderr and tik.hex() not in proc.stdout + proc.stderr


def test_session_refuses_an_unverified_pdh(tmp_path: Path, naples: Path, platform) -> None:
    proc = sevhook("session", "--pdh", naples / "pdh.cert", "--policy", "1", "--out-dir", tmp_path)
    assert proc.returncode == 2 and "unverified PDH" in proc.stderr and not list(tmp_path.iterdir())
    (tmp_path / "full.bin").write_bytes(platform.chain.to_full())
    (tmp_path / "pdh.cert").write_bytes(platform.chain.pdh.to_bytes())
    proc = sevhook("session", "--pdh", tmp_path / "pdh.cert", "--chain", tmp_path / "full.bin",
                   "--policy", "1", "--out-dir", tmp_path)
    assert proc.returncode == 1 and "ARK" in proc.stderr and not list(tmp_path.glob("*.b64"))
    proc = sevhook("session", "--pdh", naples / "pdh.cert", "--policy", "1", "--out-dir", tmp_path,
                   "--insecure-skip-chain")
    assert proc.returncode == 0 and "NOT verified" in proc.stderr


def test_session_with_real_chain_and_pdh_mismatch(tmp_path: Path, naples: Path, platform) -> None:
    (tmp_path / "other_pdh.cert").write_bytes(platform.chain.pdh.to_bytes())
    proc = sevhook("session", "--pdh", tmp_path / "other_pdh.cert", "--chain", naples / "full_chain.bin",
                   "--policy", "1", "--out-dir", tmp_path)
    assert proc.returncode == 1 and "differs from the PDH inside the chain" in proc.stderr


def test_session_bad_policy_is_a_usage_error(tmp_path: Path, naples: Path) -> None:
    proc = sevhook("session", "--pdh", naples / "pdh.cert", "--policy", "twelve", "--out-dir", tmp_path,
                   "--insecure-skip-chain")
    assert proc.returncode == 2 and "not a number" in proc.stderr


def test_verify_measurement_from_digest_and_firmware(vectors: Path) -> None:
    common = ["--tik", vectors / "sevctl" / "measurement_tik1.bin", "--api-major", "1", "--api-minor", "40",
              "--build-id", "40", "--policy", "0x03"]
    proc = sevhook("verify-measurement", "--measurement",
                   "lswbxWxI9gckya16JQvdFtpYmNO4b+3inAPpqsgoBI7DE/q1EcIWsVBbGy6pkDxA", *common,
                   "--launch-digest", base64.b64decode("xkvRAfyaSizgonxAjZIAkR8TmolUabBKQKb6KJCDDSM=").hex(), "--hex")
    assert proc.returncode == 0, proc.stderr
    assert "96cc1bc56c48f60724c9ad7a250bdd16da5898d3b86fede29c03e9aac828048e" in proc.stdout
    proc = sevhook("verify-measurement", "--measurement",  # by default as libvirt prints it: base64
                   "lswbxWxI9gckya16JQvdFtpYmNO4b+3inAPpqsgoBI7DE/q1EcIWsVBbGy6pkDxA", *common,
                   "--launch-digest", base64.b64decode("xkvRAfyaSizgonxAjZIAkR8TmolUabBKQKb6KJCDDSM=").hex())
    assert proc.returncode == 0, proc.stderr
    assert "expected measurement: lswbxWxI9gckya16JQvdFtpYmNO4b+3inAPpqsgoBI7DE/q1EcIWsVBbGy6pkDxA" in proc.stdout
    proc = sevhook("verify-measurement", "--measurement",
                   "oMDewIouJSpbpNRHj7Mk3p08H2dPZQdsZMU14qIymBnDE/q1EcIWsVBbGy6pkDxA", *common,
                   "--firmware", vectors / "sevctl" / "OVMF.amdsev.trimmed.fd")
    assert proc.returncode == 0, proc.stderr
    proc = sevhook("verify-measurement", "--measurement",
                   "oMDewIouJSpbpNRHj7Mk3p08H2dPZQdsZMU14qIymBnDE/q1EcIWsVBbGy6pkDxA", *common[:-1], "0x01",
                   "--firmware", vectors / "sevctl" / "OVMF.amdsev.trimmed.fd")
    assert proc.returncode == 1 and "MISMATCH" in proc.stderr and "expected measurement" in proc.stdout


def test_verify_measurement_usage_errors(tmp_path: Path, vectors: Path) -> None:
    tik = vectors / "sevctl" / "measurement_tik1.bin"
    base = ["verify-measurement", "--measurement", MEASUREMENT_BLOB, "--tik", tik, "--api-major", "1",
            "--api-minor", "40", "--build-id", "40", "--policy", "3"]
    assert sevhook(*base).returncode == 2  # neither --launch-digest nor --firmware
    proc = sevhook(*base, "--launch-digest", "abcd")
    assert proc.returncode == 2 and "64 hex digits" in proc.stderr
    proc = sevhook(*base, "--firmware", tmp_path / "missing.fd")
    assert proc.returncode == 2 and "no such file" in proc.stderr
    proc = sevhook(*base[:2], "short", *base[3:], "--launch-digest", "00" * 32)
    assert proc.returncode == 1 and "--measurement" in proc.stderr


def test_secret_known_answer_and_files(tmp_path: Path, vectors: Path) -> None:
    sevctl = vectors / "sevctl"
    proc = sevhook("secret", "--tek", sevctl / "secret_tek1.bin", "--tik", sevctl / "secret_tik1.bin",
                   "--measurement", MEASUREMENT_BLOB, "--iv", "rFR07U3TLH2YnsUj2SVZ7A==",
                   "--secret", f"{DISK_PASSPHRASE_GUID}:{sevctl / 'secret_secret1.txt'}", "--out-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["header"] == "AAAAAKxUdO1N0yx9mJ7FI9klWey8FSzeYQ4X8K71VzNKLU/KQsIsQxLjtbhaPUewqshX5Q=="
    assert result["secret"].startswith("0U3e5PcXv0UW+H4tSBFKOdCYfKE1")
    assert "not NUL-terminated" in proc.stderr
    assert (tmp_path / "secret_header.bin").read_bytes() == base64.b64decode(result["header"])
    assert (tmp_path / "secret_payload.b64").read_text() == result["secret"]
    assert stat.S_IMODE((tmp_path / "secret_payload.bin").stat().st_mode) == 0o600


def test_secret_disk_passphrase_adds_the_nul(tmp_path: Path) -> None:
    tek, tik = bytes(range(16)), bytes(range(16, 32))
    (tmp_path / "tek.bin").write_bytes(tek)
    (tmp_path / "tik.bin").write_bytes(tik)
    (tmp_path / "pass.txt").write_bytes(b"hunter2\n")
    (tmp_path / "other.bin").write_bytes(b"\x00\x01raw")
    measurement = compute_measurement(tik, 0, 16, 1, 0, bytes(32), bytes(16))
    b64 = base64.b64encode(measurement + bytes(16)).decode()
    proc = sevhook("secret", "--tek", tmp_path / "tek.bin", "--tik", tmp_path / "tik.bin", "--measurement", b64,
                   "--disk-passphrase", tmp_path / "pass.txt", "--api-major", "0", "--api-minor", "16",
                   "--secret", f"e6f5a162-d67f-4750-a67c-5d065f2a9910:{tmp_path / 'other.bin'}")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    table = unwrap_secret(tek, tik, measurement, base64.b64decode(result["header"]),
                          base64.b64decode(result["secret"]), 0, 16)
    entries = dict(SecretTable.parse(table).entries)
    assert entries[DISK_PASSPHRASE_GUID] == b"hunter2\0"
    assert b"\x00\x01raw" in entries.values()
    assert "hunter2" not in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--secret", "nonsense"], "GUID:FILE"),
        (["--secret", "not-a-guid:/etc/hostname"], "is not a GUID"),
        ([], "nothing to send"),
        (["--secret", f"{DISK_PASSPHRASE_GUID}:/etc/hostname", "--disk-passphrase", "/etc/hostname"], "more than once"),
        (["--api-major", "1", "--secret", f"{DISK_PASSPHRASE_GUID}:/etc/hostname"], "both --api-major"),
        (["--iv", "AAAA", "--secret", f"{DISK_PASSPHRASE_GUID}:/etc/hostname"], "expected 16"),
    ],
)
def test_secret_usage_errors(tmp_path: Path, extra: list[str], message: str) -> None:
    (tmp_path / "k.bin").write_bytes(bytes(16))
    proc = sevhook("secret", "--tek", tmp_path / "k.bin", "--tik", tmp_path / "k.bin", "--measurement",
                   MEASUREMENT_BLOB, *extra)
    assert proc.returncode == 2 and message in proc.stderr


def test_secret_too_large_for_ovmf(tmp_path: Path) -> None:
    (tmp_path / "k.bin").write_bytes(bytes(16))
    (tmp_path / "big.bin").write_bytes(bytes(4000))
    proc = sevhook("secret", "--tek", tmp_path / "k.bin", "--tik", tmp_path / "k.bin", "--measurement",
                   MEASUREMENT_BLOB, "--secret", f"{DISK_PASSPHRASE_GUID}:{tmp_path / 'big.bin'}")
    assert proc.returncode == 1 and "secret area" in proc.stderr


def test_owner_without_subcommand_shows_help() -> None:
    proc = sevhook()
    assert proc.returncode == 2 and "verify-chain" in proc.stderr
