"""`sevhook validate`, run as a user runs it (subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
VALID = FIXTURES / "valid"
INVALID = FIXTURES / "invalid"


def sevhook(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "sevhook.cli", *args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in proc.stderr
    return proc


def test_valid_files_exit_0_and_say_valid() -> None:
    files = [str(VALID / "sev.xml"), str(VALID / "sev-snp.xml")]
    proc = sevhook("validate", *files)
    assert proc.returncode == 0
    assert proc.stdout.splitlines() == [f"{f}: valid" for f in files]
    assert proc.stderr == ""


def test_warnings_are_printed_but_exit_0_unless_strict() -> None:
    path = str(VALID / "warn-sev-key-sharing.xml")
    proc = sevhook("validate", path)
    assert proc.returncode == 0
    assert proc.stdout.splitlines() == [
        f"{path}:25: warning: SEV policy 0x0031 allows key sharing (NOKS, bit 1, is clear): other guests of the "
        "same owner may share this guest's memory key; set bit 1 (policy 0x0033)"
    ]
    assert sevhook("validate", "--strict", path).returncode == 1


def test_errors_exit_1_in_file_line_level_format() -> None:
    path = str(INVALID / "sev-policy-reserved-bits.xml")
    proc = sevhook("validate", str(VALID / "sev.xml"), path)
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [
        f"{VALID / 'sev.xml'}: valid",
        f"{path}:25: error: SEV policy 0x0073 sets reserved bits 6-15 (0x0040); the firmware rejects it at "
        "LAUNCH_START: clear them (policy 0x0033)",
    ]


def test_every_invalid_fixture_exits_1() -> None:
    proc = sevhook("validate", *map(str, sorted(INVALID.glob("*.xml"))))
    assert proc.returncode == 1
    assert all(": error: " in line or ": warning: " in line for line in proc.stdout.splitlines())


def test_missing_file_exits_2_with_a_clear_message_and_still_checks_the_others() -> None:
    proc = sevhook("validate", "/nonexistent/guest.xml", str(VALID / "sev.xml"))
    assert proc.returncode == 2
    assert proc.stderr == "sevhook: error: /nonexistent/guest.xml: no such file: check the path\n"
    assert proc.stdout == f"{VALID / 'sev.xml'}: valid\n"


def test_usage_errors_exit_2() -> None:
    assert sevhook("validate").returncode == 2
    assert sevhook("validate", "--bogus", str(VALID / "sev.xml")).returncode == 2


def test_require_sev() -> None:
    path = str(VALID / "no-launch-security.xml")
    assert sevhook("validate", path).returncode == 0
    proc = sevhook("validate", "--require-sev", path)
    assert proc.returncode == 1
    assert proc.stdout.startswith(f"{path}:1: error: the domain has no <launchSecurity>")


def test_json_output() -> None:
    good, warned, bad = VALID / "sev.xml", VALID / "warn-sev-no-uefi.xml", INVALID / "snp-bit17-clear.xml"
    proc = sevhook("validate", "--json", str(good), str(warned), str(bad))
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert [entry["file"] for entry in report] == [str(good), str(warned), str(bad)]
    assert [entry["valid"] for entry in report] == [True, True, False]
    assert report[0]["problems"] == []
    assert report[1]["problems"][0]["level"] == "warning" and report[1]["problems"][0]["line"] == 7
    assert report[2]["problems"] == [
        {
            "level": "error",
            "line": 25,
            "message": "SEV-SNP policy 0x00010000 has bit 17 clear; the firmware requires it set (reserved, must be "
            "one): use policy 0x00030000",
        }
    ]
    strict = json.loads(sevhook("validate", "--json", "--strict", str(warned)).stdout)
    assert strict[0]["valid"] is False


def test_json_reports_unreadable_files_too() -> None:
    proc = sevhook("validate", "--json", "/nonexistent.xml")
    assert proc.returncode == 2
    assert json.loads(proc.stdout) == [
        {
            "file": "/nonexistent.xml",
            "valid": False,
            "problems": [{"level": "error", "line": None, "message": "/nonexistent.xml: no such file: check the path"}],
        }
    ]


def test_standard_input() -> None:
    proc = sevhook("validate", "-", stdin=(INVALID / "ls-type-sev-es.xml").read_bytes())
    assert proc.returncode == 1
    assert proc.stdout.startswith(
        "-:22: error: Invalid value for attribute 'type' in element 'launchSecurity': 'sev-es'."
    )


def test_help_has_examples() -> None:
    proc = sevhook("validate", "--help")
    assert proc.returncode == 0 and "examples:" in proc.stdout and "exit status" in proc.stdout
