"""`sevhook owner` review fixes through a real subprocess: secret's optional measurement check, bounded reads and
non-regular files (never a hang), empty and footer-less firmware, --json output and exit 2 for every bad number."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sevhook.sev.measurement import LaunchMeasurement
from sevhook.sev.secret import DISK_PASSPHRASE_GUID

MATCHING_MEASUREMENT = "oMDewIouJSpbpNRHj7Mk3p08H2dPZQdsZMU14qIymBnDE/q1EcIWsVBbGy6pkDxA"
LAUNCH = ("--api-major", "1", "--api-minor", "40", "--build-id", "40")


def sevhook(*args: str | Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "sevhook.cli", "owner", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.fixture()
def sevctl(vectors: Path) -> Path:
    return vectors / "sevctl"


def secret_args(tmp_path: Path, sevctl: Path) -> list[str | Path]:
    (tmp_path / "tek.bin").write_bytes(bytes(range(16)))
    (tmp_path / "pass.txt").write_bytes(b"hunter2\n")
    return ["secret", "--tek", tmp_path / "tek.bin", "--tik", sevctl / "measurement_tik1.bin",
            "--measurement", MATCHING_MEASUREMENT, "--disk-passphrase", tmp_path / "pass.txt"]


def test_secret_checks_the_measurement_when_the_launch_is_given(tmp_path: Path, sevctl: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    firmware = sevctl / "OVMF.amdsev.trimmed.fd"
    good = sevhook(*secret_args(tmp_path, sevctl), *LAUNCH, "--policy", "0x03", "--firmware", firmware,
                   "--out-dir", out)
    assert good.returncode == 0, good.stderr
    assert "measurement matches" in good.stderr and "NOT checked" not in good.stderr
    assert set(json.loads(good.stdout)) == {"header", "secret"} and len(list(out.iterdir())) == 4
    for path in out.iterdir():
        path.unlink()
    bad = sevhook(*secret_args(tmp_path, sevctl), *LAUNCH, "--policy", "0x01", "--firmware", firmware,
                  "--out-dir", out)
    assert bad.returncode == 1 and "MISMATCH" in bad.stderr and "nothing written" in bad.stderr
    assert bad.stdout == "" and not list(out.iterdir())
    digest = base64.b64decode("xkvRAfyaSizgonxAjZIAkR8TmolUabBKQKb6KJCDDSM=").hex()  # not this launch's digest
    wrong_digest = sevhook(*secret_args(tmp_path, sevctl), *LAUNCH, "--policy", "3", "--launch-digest", digest)
    assert wrong_digest.returncode == 1 and wrong_digest.stdout == ""


def test_secret_without_the_launch_says_it_did_not_check(tmp_path: Path, sevctl: Path) -> None:
    proc = sevhook(*secret_args(tmp_path, sevctl))
    assert proc.returncode == 0 and "the measurement was NOT checked" in proc.stderr
    help_text = sevhook("secret", "--help").stdout
    assert "NOT checked" in help_text and "--launch-digest" in help_text


def test_secret_check_needs_the_whole_launch(tmp_path: Path, sevctl: Path) -> None:
    proc = sevhook(*secret_args(tmp_path, sevctl), "--policy", "3", "--launch-digest", "00" * 32)
    assert proc.returncode == 2 and "--api-major, --api-minor, --build-id" in proc.stderr
    proc = sevhook(*secret_args(tmp_path, sevctl), *LAUNCH, "--policy", "3")
    assert proc.returncode == 2 and "--launch-digest or --firmware" in proc.stderr
    short = base64.b64encode(LaunchMeasurement.parse(MATCHING_MEASUREMENT).measurement).decode()
    args = secret_args(tmp_path, sevctl)
    args[args.index("--measurement") + 1] = short
    proc = sevhook(*args, *LAUNCH, "--policy", "3", "--launch-digest", "00" * 32)
    assert proc.returncode == 2 and "48 bytes" in proc.stderr


@pytest.mark.parametrize("command", [
    ("verify-chain", "/dev/zero"),
    ("verify-chain", "CHAIN", "--pdh", "/dev/zero"),
    ("secret", "--tek", "KEY", "--tik", "KEY", "--measurement", MATCHING_MEASUREMENT,
     "--secret", f"{DISK_PASSPHRASE_GUID}:/dev/zero"),
])
def test_endless_small_inputs_are_refused_quickly(tmp_path: Path, naples: Path, command: tuple[str, ...]) -> None:
    (tmp_path / "k.bin").write_bytes(bytes(16))
    args = [{"CHAIN": str(naples / "cert_chain_export.bin"), "KEY": str(tmp_path / "k.bin")}.get(a, a) for a in command]
    proc = sevhook(*args, timeout=20)
    assert proc.returncode == 2
    assert "/dev/zero: larger than the 1 MiB limit" in proc.stderr


def test_endless_key_and_anchor_files_are_refused(tmp_path: Path, naples: Path, sevctl: Path) -> None:
    proc = sevhook("verify-measurement", "--measurement", MATCHING_MEASUREMENT, "--tik", "/dev/zero", *LAUNCH,
                   "--policy", "3", "--launch-digest", "00" * 32, timeout=20)
    assert proc.returncode == 1 and "more than 4096 bytes" in proc.stderr
    proc = sevhook("verify-chain", naples / "full_chain.bin", "--trust-anchor", "/dev/zero", timeout=20)
    assert proc.returncode == 2 and "too large for an ARK" in proc.stderr


def test_small_inputs_still_come_through_a_pipe(tmp_path: Path, naples: Path) -> None:
    fifo = tmp_path / "chain.fifo"
    os.mkfifo(fifo)
    writer = subprocess.Popen(["sh", "-c", f"cat '{naples / 'full_chain.bin'}' > '{fifo}'"])
    try:
        proc = sevhook("verify-chain", fifo, timeout=20)
    finally:
        writer.wait(timeout=20)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("option", ["--firmware", "--kernel", "--initrd"])
@pytest.mark.parametrize("special", ["/dev/zero", "DIR", "FIFO"])
def test_measure_refuses_what_is_not_a_regular_file(tmp_path: Path, sevctl: Path, option: str, special: str) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # no writer: opening it must not block either
    path = {"DIR": str(tmp_path), "FIFO": str(fifo)}.get(special, special)
    inputs = {"--firmware": str(sevctl / "OVMF.amdsev.trimmed.fd"),
              "--kernel": str(sevctl / "measurement_vmlinuz-fake")}
    if option == "--initrd":
        inputs["--initrd"] = path
    else:
        inputs[option] = path
    proc = sevhook("measure", *[word for pair in inputs.items() for word in pair], timeout=20)
    kind = {"/dev/zero": "a character device", "DIR": "a directory", "FIFO": "a pipe (FIFO)"}[special]
    what = option.removeprefix("--")
    assert proc.returncode == 2 and proc.stdout == ""
    assert f"{what} file {path} is {kind}: give a regular file" in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_verify_measurement_refuses_a_device_as_firmware(sevctl: Path) -> None:
    proc = sevhook("verify-measurement", "--measurement", MATCHING_MEASUREMENT, "--tik",
                   sevctl / "measurement_tik1.bin", *LAUNCH, "--policy", "3", "--firmware", "/dev/zero", timeout=20)
    assert proc.returncode == 2 and "is a character device" in proc.stderr


def test_empty_firmware_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty.fd").write_bytes(b"")
    proc = sevhook("measure", "--firmware", tmp_path / "empty.fd")
    assert proc.returncode == 1 and proc.stdout == "" and "is empty" in proc.stderr


def test_firmware_without_footer_warns_but_measures(tmp_path: Path, sevctl: Path) -> None:
    plain = tmp_path / "plain.fd"
    plain.write_bytes(os.urandom(8192))
    proc = sevhook("measure", "--firmware", plain)
    assert proc.returncode == 0 and len(proc.stdout.strip()) == 64
    assert "not an SEV-capable OVMF build" in proc.stderr
    proc = sevhook("measure", "--firmware", sevctl / "OVMF.amdsev.trimmed.fd")
    assert proc.returncode == 0 and proc.stderr == ""


def test_measure_json(tmp_path: Path, sevctl: Path) -> None:
    firmware = sevctl / "OVMF.amdsev.trimmed.fd"
    text = sevhook("measure", "--firmware", firmware).stdout.strip()
    plain = json.loads(sevhook("measure", "--firmware", firmware, "--json").stdout)
    assert plain == {"digest": text, "algorithm": "sha256", "mode": "sev", "format": "hex", "warnings": []}
    explained = json.loads(sevhook("measure", "--mode", "seves", "--firmware", firmware, "--vcpus", "2",
                                   "--vcpu-type", "EPYC-Milan", "--json", "--explain").stdout)
    assert [c["name"] for c in explained["components"]] == ["firmware", "VMSA 0 (BSP)", "VMSA 1 (AP)"]
    assert explained["mode"] == "seves" and explained["firmware"][0].endswith("mapped at 0xfffff000")
    b64 = json.loads(sevhook("measure", "--firmware", firmware, "--json", "--output-format", "base64").stdout)
    assert base64.b64decode(b64["digest"]).hex() == text
    (tmp_path / "plain.fd").write_bytes(bytes(4096))
    assert json.loads(sevhook("measure", "--firmware", tmp_path / "plain.fd", "--json").stdout)["warnings"]


def test_verify_chain_json(naples: Path, vectors: Path) -> None:
    proc = sevhook("verify-chain", naples / "full_chain.bin", "--json")
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["ok"] is True and report["root"] == "AMD Naples"
    assert all(link["ok"] and link["why"] for link in report["links"])
    assert "PEK -> PDH" in [link["name"] for link in report["links"]]
    proc = sevhook("verify-chain", naples / "cert_chain_export.bin", "--pdh", naples / "pdh.cert", "--json",
                   "--ark", vectors / "amd-roots" / "milan_ark.cert", "--ask", vectors / "amd-roots" / "milan_ask.cert")
    report = json.loads(proc.stdout)
    assert proc.returncode == 1 and report["ok"] is False
    failed = [link for link in report["links"] if not link["ok"]]
    assert any(link["name"] == "ASK -> CEK" and link["why"] for link in failed)


def test_verify_measurement_json(sevctl: Path) -> None:
    common = ["verify-measurement", "--measurement", MATCHING_MEASUREMENT, "--tik", sevctl / "measurement_tik1.bin",
              *LAUNCH, "--firmware", sevctl / "OVMF.amdsev.trimmed.fd", "--json"]
    match = sevhook(*common, "--policy", "3", "--hex")
    result = json.loads(match.stdout)
    assert match.returncode == 0 and result["match"] is True and result["expected"] == result["actual"]
    assert result["actual"] == LaunchMeasurement.parse(MATCHING_MEASUREMENT).measurement.hex()
    as_libvirt = json.loads(sevhook(*common, "--policy", "3").stdout)  # default: base64, as libvirt prints it
    assert as_libvirt["actual"] == as_libvirt["expected"] == MATCHING_MEASUREMENT
    mismatch = sevhook(*common, "--policy", "1")
    result = json.loads(mismatch.stdout)
    assert mismatch.returncode == 1 and result["match"] is False and result["expected"] != result["actual"]
    assert "MISMATCH" in mismatch.stderr


def test_diagnose_json(sevctl: Path) -> None:
    proc = sevhook("diagnose-mismatch", "--measurement", MATCHING_MEASUREMENT, "--tik",
                   sevctl / "measurement_tik1.bin", *LAUNCH, "--policy", "3",
                   "--firmware", sevctl / "OVMF.amdsev.trimmed.fd", "--json")
    result = json.loads(proc.stdout)
    assert proc.returncode == 0 and result["match"] is True and result["tried"] >= 1 and result["searched"]
    assert result["matches"][0]["kernel_hashes"] is False and result["matches"][0]["vcpus"] is None
    proc = sevhook("diagnose-mismatch", "--measurement", MATCHING_MEASUREMENT, "--tik",
                   sevctl / "measurement_tik1.bin", *LAUNCH, "--policy", "1",
                   "--firmware", sevctl / "OVMF.amdsev.trimmed.fd", "--json")
    result = json.loads(proc.stdout)
    assert proc.returncode == 1 and result["match"] is False and result["matches"] == []


def test_session_json_names_the_files_not_the_keys(tmp_path: Path, naples: Path) -> None:
    proc = sevhook("session", "--pdh", naples / "pdh.cert", "--chain", naples / "full_chain.bin", "--policy", "0x3",
                   "--out-dir", tmp_path, "--name", "vm", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["policy"] == 3 and result["chain_root"] == "AMD Naples"
    assert sorted(Path(p).name for p in result["files"].values()) == [
        "vm_godh.b64", "vm_session.b64", "vm_tek.bin", "vm_tik.bin"]
    assert (tmp_path / "vm_tek.bin").read_bytes().hex() not in proc.stdout


@pytest.mark.parametrize("command", [
    ("session", "--pdh", "PDH", "--policy", "0xZZ", "--out-dir", "TMP", "--insecure-skip-chain"),
    ("measure", "--firmware", "FW", "--mode", "seves", "--vcpus", "2", "--vcpu-type", "EPYC", "--guest-features",
     "0xZZ"),
    ("measure", "--firmware", "FW", "--mode", "seves", "--vcpus", "two", "--vcpu-type", "EPYC"),
    ("measure", "--firmware", "FW", "--mode", "seves", "--vcpus", "2", "--vcpu-family", "x", "--vcpu-model", "1",
     "--vcpu-stepping", "1"),
    ("verify-measurement", "--measurement", MATCHING_MEASUREMENT, "--tik", "TIK", "--api-major", "1",
     "--api-minor", "40", "--build-id", "0xZZ", "--policy", "3", "--launch-digest", "00" * 32),
    ("secret", "--tek", "TIK", "--tik", "TIK", "--measurement", MATCHING_MEASUREMENT, "--policy", "0xZZ"),
    ("diagnose-mismatch", "--measurement", MATCHING_MEASUREMENT, "--tik", "TIK", "--api-major", "1", "--api-minor",
     "40", "--build-id", "40", "--policy", "0xZZ", "--firmware", "FW"),
    ("diagnose-mismatch", "--measurement", MATCHING_MEASUREMENT, "--tik", "TIK", "--api-major", "1", "--api-minor",
     "40", "--build-id", "40", "--policy", "3", "--firmware", "FW", "--max-vcpus", "many"),
    ("session", "--pdh", "PDH", "--policy", "-1", "--out-dir", "TMP", "--insecure-skip-chain"),
])
def test_every_bad_number_is_a_usage_error(tmp_path: Path, naples: Path, sevctl: Path,
                                           command: tuple[str, ...]) -> None:
    names = {"PDH": str(naples / "pdh.cert"), "TMP": str(tmp_path), "FW": str(sevctl / "OVMF.amdsev.trimmed.fd"),
             "TIK": str(sevctl / "measurement_tik1.bin")}
    proc = sevhook(*[names.get(word, word) for word in command])
    assert proc.returncode == 2, proc.stderr
    assert "error: argument --" in proc.stderr and ("is not a number" in proc.stderr or "is negative" in proc.stderr)
    assert not list(tmp_path.iterdir())
