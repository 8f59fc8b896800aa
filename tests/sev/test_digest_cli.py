"""`sevhook owner measure`: output formats, --explain, VMSA files, and one clear message per bad input."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest

from sevhook.cli import main

VECTORS = Path(__file__).resolve().parents[1] / "data" / "vectors"
TRIMMED = VECTORS / "sevctl" / "OVMF.amdsev.trimmed.fd"
OVMFX64 = VECTORS / "sev-snp-measure" / "ovmf_OvmfX64_suffix.bin"
AMDSEV = VECTORS / "sev-snp-measure" / "ovmf_AmdSev_suffix.bin"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["owner", "measure", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_default_is_sev_hex(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--firmware", str(TRIMMED))
    assert code == 0 and out.strip() == hashlib.sha256(TRIMMED.read_bytes()).hexdigest()
    code, out, _ = run(capsys, "--firmware", str(TRIMMED), "--output-format", "base64")
    assert base64.b64decode(out.strip()) == hashlib.sha256(TRIMMED.read_bytes()).digest()


def test_vmsa_files_equal_built_old_variant(capsys: pytest.CaptureFixture[str]) -> None:
    vmsa0, vmsa1 = str(VECTORS / "sevctl" / "vmsa0.bin"), str(VECTORS / "sevctl" / "vmsa1.bin")
    _, from_files, _ = run(capsys, "--firmware", str(TRIMMED), "--vmsa", vmsa0, "--vmsa", vmsa1, "--vmsa", vmsa1)
    _, seves_files, _ = run(capsys, "--mode", "seves", "--firmware", str(TRIMMED), "--vmsa", vmsa0,
                            "--vmsa", vmsa1, "--vmsa", vmsa1)
    _, built, _ = run(capsys, "--mode", "seves", "--firmware", str(TRIMMED), "--vcpus", "3",
                      "--vcpu-family", "25", "--vcpu-model", "0x1", "--vcpu-stepping", "1", "--host-kernel", "old")
    assert from_files == seves_files == built
    _, new, _ = run(capsys, "--mode", "seves", "--firmware", str(TRIMMED), "--vcpus", "3", "--vcpu-type", "EPYC-Milan")
    assert new != built


def test_explain_lists_every_component(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel")
    code, out, _ = run(capsys, "--mode", "seves", "--firmware", str(TRIMMED), "--kernel", str(kernel),
                       "--cmdline", "quiet", "--vcpus", "2", "--vcpu-type", "EPYC-v4", "--explain")
    lines = out.splitlines()
    assert code == 0
    assert any(line.startswith("firmware: 4096 bytes, sha256") for line in lines)
    assert any(line.startswith("kernel-hashes table: 176 bytes") for line in lines)
    assert any(line.startswith("VMSA 0 (BSP)") and "0x00800f12" in line for line in lines)
    assert any(line.startswith("VMSA 1 (AP)") and "eip 0x0080b004" in line for line in lines)
    assert lines[-2].endswith(lines[-1]) and len(lines[-1]) == 64


def test_snp_defaults_guest_features_to_snp_active(capsys: pytest.CaptureFixture[str]) -> None:
    common = ("--mode", "snp", "--firmware", str(AMDSEV), "--vcpus", "1", "--vcpu-type", "EPYC-Genoa")
    _, default, _ = run(capsys, *common)
    _, explicit, _ = run(capsys, *common, "--guest-features", "0x1")
    _, other, _ = run(capsys, *common, "--guest-features", "0x21")
    assert default == explicit != other and len(default.strip()) == 96


@pytest.mark.parametrize(("args", "code", "message"), [
    (("--mode", "seves", "--firmware", str(TRIMMED)), 2, "give --vcpus N and --vcpu-type"),
    (("--mode", "seves", "--firmware", str(TRIMMED), "--vcpus", "2", "--vcpu-type", "EPYC-Nope"), 2,
     "unknown vCPU type 'EPYC-Nope'"),
    (("--mode", "seves", "--firmware", str(TRIMMED), "--vcpus", "2", "--vcpu-type", "EPYC",
      "--vcpu-family", "23"), 2, "not both"),
    (("--mode", "seves", "--firmware", str(TRIMMED), "--vcpus", "2", "--vcpu-family", "23"), 2, "give all three"),
    (("--mode", "seves", "--firmware", str(TRIMMED), "--vcpus", "0", "--vcpu-type", "EPYC"), 2, "vCPU count"),
    (("--firmware", str(TRIMMED), "--vcpus", "2"), 2, "only apply when VMSAs are built"),
    (("--mode", "snp", "--firmware", str(AMDSEV), "--vmsa", str(TRIMMED)), 2, "--vmsa is for sev/seves"),
    (("--firmware", str(TRIMMED), "--vmsa", str(VECTORS / "sevctl" / "secret_tik1.bin")), 2, "exactly 4096 bytes"),
    (("--firmware", str(OVMFX64), "--kernel", str(TRIMMED)), 1, "no kernel-hashes table area"),
    (("--firmware", str(TRIMMED), "--initrd", str(TRIMMED)), 2, "needs a kernel"),
    (("--firmware", "/nonexistent/OVMF.fd"), 2, "cannot read firmware file /nonexistent/OVMF.fd"),
    (("--mode", "snp", "--firmware", str(TRIMMED), "--vcpus", "1", "--vcpu-type", "EPYC"), 1, "no SNP metadata"),
])
def test_bad_input_gives_one_clear_message(capsys: pytest.CaptureFixture[str], args: tuple[str, ...], code: int,
                                           message: str) -> None:
    result, out, err = run(capsys, *args)
    assert result == code
    assert message in err and "Traceback" not in err and out == ""


def test_bad_number_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A number option that is not a number is refused by argparse (exit 2), like every other bad option value."""
    with pytest.raises(SystemExit) as exited:
        main(["owner", "measure", "--mode", "seves", "--firmware", str(TRIMMED), "--vcpus", "two",
              "--vcpu-type", "EPYC"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "--vcpus" in err and "'two' is not a number" in err


def test_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("measure", "diagnose-mismatch"):
        with pytest.raises(SystemExit) as exited:
            main(["owner", command, "--help"])
        assert exited.value.code == 0
        assert "examples:" in capsys.readouterr().out
