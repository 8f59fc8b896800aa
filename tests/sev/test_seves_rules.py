"""SEV-ES strictness, differentially against libvirt's virt-qemu-sev-validate formula (reimplemented
here independently): measurement = HMAC-SHA256(TIK, 0x04 || api_major || api_minor || build ||
policy (u32 LE) || SHA-256(firmware || VMSAs when the policy has the ES bit) || mnonce). The reference
refuses an ES policy it has no VMSAs for, and never hashes VMSAs for a non-ES policy; sevhook's
`owner verify-measurement` must agree on every case: match, mismatch, or refusal (exit 2)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import subprocess
import sys
from pathlib import Path

import pytest

VECTORS = Path(__file__).resolve().parents[1] / "data" / "vectors" / "sevctl"
FIRMWARE = VECTORS / "OVMF.amdsev.trimmed.fd"
VMSAS = (VECTORS / "vmsa0.bin", VECTORS / "vmsa1.bin")
TIK = VECTORS / "measurement_tik1.bin"
API, BUILD = (1, 40), 40
MNONCE = bytes(range(16))
SEVHOOK = [sys.executable, "-m", "sevhook.cli"]


class ReferenceRefuses(Exception):
    """What virt-qemu-sev-validate does for an ES policy with no VMSA source."""


def reference_measurement(policy: int, vmsas: tuple[Path, ...]) -> bytes:
    measured = FIRMWARE.read_bytes()
    if policy & 0x4:
        if not vmsas:
            raise ReferenceRefuses
        measured += b"".join(path.read_bytes() for path in vmsas)
    message = (bytes([0x04, API[0], API[1], BUILD]) + policy.to_bytes(4, "little")
               + hashlib.sha256(measured).digest() + MNONCE)
    return hmac.new(TIK.read_bytes(), message, "sha256").digest()


def verify(measurement: bytes, policy: int, vmsas: tuple[Path, ...]) -> subprocess.CompletedProcess[str]:
    args = ["owner", "verify-measurement", "--measurement", base64.b64encode(measurement + MNONCE).decode(),
            "--tik", str(TIK), "--api-major", str(API[0]), "--api-minor", str(API[1]), "--build-id", str(BUILD),
            "--policy", hex(policy), "--firmware", str(FIRMWARE)]
    for vmsa in vmsas:
        args += ["--vmsa", str(vmsa)]
    return subprocess.run([*SEVHOOK, *args], capture_output=True, text=True, timeout=60)


CASES = list(itertools.product((0x0, 0x1, 0x3, 0x4, 0x5, 0x7), ((), VMSAS)))


@pytest.mark.parametrize(("policy", "vmsas"), CASES, ids=[f"{p:#x}-{len(v)}vmsa" for p, v in CASES])
def test_verify_measurement_agrees_with_the_reference(policy: int, vmsas: tuple[Path, ...]) -> None:
    try:
        expected = reference_measurement(policy, vmsas)
    except ReferenceRefuses:
        # what a digest without VMSAs would give: sevhook must refuse it rather than report a match
        accidental = hmac.new(TIK.read_bytes(), bytes([0x04, API[0], API[1], BUILD]) + policy.to_bytes(4, "little")
                              + hashlib.sha256(FIRMWARE.read_bytes()).digest() + MNONCE, "sha256").digest()
        result = verify(accidental, policy, vmsas)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "SEV-ES" in result.stderr and "--vmsa" in result.stderr and "Traceback" not in result.stderr
        return
    result = verify(expected, policy, vmsas)
    assert result.returncode == 0, result.stdout + result.stderr
    assert ("ignored" in result.stderr) == bool(vmsas and not policy & 0x4)
    flipped = bytes([expected[0] ^ 1]) + expected[1:]
    assert verify(flipped, policy, vmsas).returncode == 1
