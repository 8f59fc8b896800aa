"""Differential test against the sev-snp-measure package (PyPI, Apache-2.0) on generated inputs: cmdlines,
kernel/initrd sizes including empty, vCPU counts 1-64, every CPU type it knows, both OVMF fixtures, for sev,
seves and snp. sev-snp-measure builds the host-kernel >= 6.10 VMSA, so that is the variant compared."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sevsnpmeasure import guest, vcpu_types
from sevsnpmeasure.sev_mode import SevMode

from sevhook.errors import SevhookError
from sevhook.sev.cpu_types import CPU_TYPES, cpu_model
from sevhook.sev.launch_digest import sev_launch_digest, seves_launch_digest
from sevhook.sev.snp import snp_launch_digest

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "data" / "vectors" / "sev-snp-measure"
FIRMWARES = ("ovmf_AmdSev_suffix.bin", "ovmf_OvmfX64_suffix.bin")
MODES = {"sev": SevMode.SEV, "seves": SevMode.SEV_ES, "snp": SevMode.SEV_SNP}


def test_every_cpu_type_it_knows_is_known_here_with_the_same_signature() -> None:
    for name, signature in vcpu_types.CPU_SIGS.items():
        assert name in CPU_TYPES, name
        assert cpu_model(name).signature == signature, name


def _file_size() -> st.SearchStrategy[int]:
    return st.one_of(st.just(0), st.integers(1, 300), st.integers(4000, 70_000))


def _ours(mode: str, firmware: Path, vcpus: int, signature: int, kernel: str | None, initrd: str | None,
          cmdline: str | None, features: int) -> bytes:
    if mode == "sev":
        return sev_launch_digest(firmware, kernel, initrd, cmdline)
    if mode == "seves":
        return seves_launch_digest(firmware, vcpus, signature, kernel, initrd, cmdline)
    return snp_launch_digest(firmware, vcpus, signature, kernel, initrd, cmdline, features)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mode=st.sampled_from(sorted(MODES)),
    firmware_name=st.sampled_from(FIRMWARES),
    vcpus=st.integers(1, 64),
    cpu_type=st.sampled_from(sorted(vcpu_types.CPU_SIGS)),
    direct_boot=st.booleans(),
    kernel_size=_file_size(),
    initrd_size=st.one_of(st.none(), _file_size()),
    cmdline=st.one_of(st.none(), st.just(""), st.text(st.characters(blacklist_characters="\0",
                                                                    blacklist_categories=("Cs",)), max_size=80)),
    features=st.sampled_from([0x1, 0x21, 0x3F]),
    seed=st.binary(min_size=16, max_size=16),
)
def test_digests_equal_sev_snp_measure(mode: str, firmware_name: str, vcpus: int, cpu_type: str, direct_boot: bool,
                                       kernel_size: int, initrd_size: int | None, cmdline: str | None,
                                       features: int, seed: bytes) -> None:
    firmware = FIXTURES / firmware_name
    signature = vcpu_types.CPU_SIGS[cpu_type]
    with tempfile.TemporaryDirectory() as tmp:
        kernel = initrd = None
        if direct_boot:
            kernel = os.path.join(tmp, "vmlinuz")
            Path(kernel).write_bytes((seed * (kernel_size // 16 + 1))[:kernel_size])
            if initrd_size is not None:
                initrd = os.path.join(tmp, "initrd")
                Path(initrd).write_bytes((seed[::-1] * (initrd_size // 16 + 1))[:initrd_size])
        else:
            cmdline = None
        try:
            theirs: bytes | None = guest.calc_launch_digest(
                MODES[mode], vcpus, signature, str(firmware), kernel, initrd, cmdline, features)
        except RuntimeError:
            theirs = None  # e.g. kernel hashes asked of an OVMF build without the area
        try:
            ours: bytes | None = _ours(mode, firmware, vcpus, signature, kernel, initrd, cmdline, features)
        except SevhookError:
            ours = None
    event("both refused" if ours is None else f"{mode} digest compared")
    assert ours == theirs


@pytest.mark.parametrize(("mode", "extra"), [
    ("sev", []),
    ("seves", ["--vcpus", "3", "--vcpu-type", "EPYC-Rome-v2"]),
    ("snp", ["--vcpus", "2", "--vcpu-family", "25", "--vcpu-model", "17", "--vcpu-stepping", "0"]),
])
def test_command_lines_agree(tmp_path: Path, mode: str, extra: list[str]) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k" * 5000)
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"")
    firmware = str(FIXTURES / "ovmf_AmdSev_suffix.bin")
    boot = ["--kernel", str(kernel), "--initrd", str(initrd)]
    ours = subprocess.run(
        [sys.executable, "-m", "sevhook.cli", "owner", "measure", "--mode", mode, "--firmware", firmware, *boot,
         "--cmdline", "root=/dev/vda ro", "--output-format", "base64", *extra],
        check=True, capture_output=True, text=True, cwd=ROOT).stdout.strip()
    theirs = subprocess.run(
        [str(Path(sys.executable).with_name("sev-snp-measure")), "--mode", mode, "--ovmf", firmware, *boot,
         "--append", "root=/dev/vda ro", "--output-format", "base64", *extra],
        check=True, capture_output=True, text=True).stdout.strip()
    assert ours == theirs
