"""diagnose-mismatch finds the input planted in generated launches, and says so when nothing matches."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sevhook.cli import main
from sevhook.sev.cpu_types import CPU_TYPES, CpuModel
from sevhook.sev.diagnose import diagnose_mismatch
from sevhook.sev.launch_digest import sev_launch_digest, seves_launch_digest
from sevhook.sev.measurement import LaunchMeasurement, compute_measurement
from sevhook.sev.vmsa import DEBUG_SWAP, HostKernel

FIRMWARE = Path(__file__).resolve().parents[1] / "data" / "vectors" / "sevctl" / "OVMF.amdsev.trimmed.fd"
KERNEL = b"\x7fELF fake kernel" * 64
INITRD = b"initrd" * 100
CMDLINE = "console=ttyS0 root=/dev/vda"


def _launch(tik: bytes, mnonce: bytes, api: tuple[int, int], build: int, policy: int, launch_digest: bytes,
            pre_017: bool) -> LaunchMeasurement:
    """What a platform would report; the pre-0.17 form is what old firmware (API < 0.17) MACs."""
    major, minor = (0, 16) if pre_017 else api
    return LaunchMeasurement(compute_measurement(tik, major, minor, build, policy, launch_digest, mnonce), mnonce)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tik=st.binary(min_size=16, max_size=16), mnonce=st.binary(min_size=16, max_size=16),
    api=st.tuples(st.integers(0, 255), st.integers(0, 255)).filter(lambda api: api >= (0, 17)),
    build=st.integers(0, 255), extra_policy=st.sampled_from([0x1, 0x3, 0x30001, 0x0]),
    es=st.booleans(), vcpus=st.integers(1, 64), cpu_name=st.sampled_from(sorted(CPU_TYPES)),
    host_kernel=st.sampled_from(list(HostKernel)), features=st.sampled_from([0, DEBUG_SWAP]),
    kernel_hashes=st.booleans(), pre_017=st.booleans(),
)
def test_finds_the_planted_combination(tik: bytes, mnonce: bytes, api: tuple[int, int], build: int,
                                       extra_policy: int, es: bool, vcpus: int, cpu_name: str,
                                       host_kernel: HostKernel, features: int, kernel_hashes: bool,
                                       pre_017: bool) -> None:
    policy = extra_policy | (0x4 if es else 0)
    boot = (KERNEL, INITRD, CMDLINE) if kernel_hashes else (None, None, None)
    cpu = CPU_TYPES[cpu_name]
    if es:
        launch_digest = seves_launch_digest(FIRMWARE, vcpus, cpu.signature, *boot, features, host_kernel)
    else:
        launch_digest = sev_launch_digest(FIRMWARE, *boot)
    reported = _launch(tik, mnonce, api, build, policy, launch_digest, pre_017)

    diagnosis = diagnose_mismatch(reported, tik, *api, build, policy, FIRMWARE, KERNEL, INITRD, CMDLINE)

    assert len(diagnosis.matches) == 1, diagnosis.report()
    found, found_digest = diagnosis.matches[0]
    assert found_digest == launch_digest
    assert (found.kernel_hashes, found.pre_017_form) == (kernel_hashes, pre_017)
    if es:
        assert (found.vcpus, found.cpu, found.host_kernel, found.sev_features) == (vcpus, cpu, host_kernel, features)
        assert cpu_name in found.cpu_names
    else:
        assert found.vcpus is None


def test_host_passthrough_cpu_is_tried_when_given() -> None:
    tik, mnonce = bytes(range(16)), bytes(16)
    host = CpuModel(25, 0x11, 2)  # a Genoa stepping no QEMU model has
    launch_digest = seves_launch_digest(FIRMWARE, 8, host.signature)
    reported = _launch(tik, mnonce, (1, 55), 21, 0x5, launch_digest, False)
    assert not diagnose_mismatch(reported, tik, 1, 55, 21, 0x5, FIRMWARE).matches
    found = diagnose_mismatch(reported, tik, 1, 55, 21, 0x5, FIRMWARE, extra_cpus=[host]).matches
    assert [(candidate.cpu, candidate.vcpus) for candidate, _ in found] == [(host, 8)]


def test_cli_reports_match_and_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tik = bytes(range(16))
    (tmp_path / "tik.bin").write_bytes(tik)
    (tmp_path / "vmlinuz").write_bytes(KERNEL)
    launch_digest = seves_launch_digest(FIRMWARE, 6, CPU_TYPES["EPYC-Milan"].signature, tmp_path / "vmlinuz",
                                        None, "quiet", 0, HostKernel.OLD)
    reported = _launch(tik, b"n" * 16, (1, 51), 3, 0x7, launch_digest, False).b64
    common = ["owner", "diagnose-mismatch", "--tik", str(tmp_path / "tik.bin"), "--api-major", "1",
              "--api-minor", "51", "--build-id", "3", "--policy", "0x7", "--firmware", str(FIRMWARE),
              "--kernel", str(tmp_path / "vmlinuz"), "--cmdline", "quiet"]
    assert main([*common, "--measurement", reported]) == 0
    out = capsys.readouterr().out
    assert "MATCH: kernel hashes on, 6 vCPUs" in out and "EPYC-Milan" in out and "host kernel old" in out

    wrong = base64.b64encode(bytes(48)).decode()
    assert main([*common, "--measurement", wrong]) == 1
    out = capsys.readouterr().out
    assert "no combination reproduces the measurement" in out and "TIK" in out

    assert main([*common, "--measurement", "not base64!"]) == 1
    assert "--measurement" in capsys.readouterr().err
