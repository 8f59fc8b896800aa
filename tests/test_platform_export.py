"""`sevhook platform export`: what the firmware exports (PDH, PEK|OCA|CEK with the CEK unsigned, chip id),
read from the QEMU stand-in over QMP as libvirt probes it (--emulator) or from a running monitor (--qmp),
and with --full the chain with the simulated KDS's signed CEK, as `sevctl export --full` writes it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sevhook.errors import SevhookError
from sevhook.sev.certs import SEV_CERT_SIZE, SevCertificate
from sevhook.sev.platform_export import PlatformExport, read_chip_id, read_export
from sevhook.sim.kds import SimulatedKds
from sevhook.sim.platform import SoftwarePlatform, init_platform
from sevhook.sim.state import StateDir

SEVHOOK = [sys.executable, "-m", "sevhook.cli"]
SIM_QEMU = str(Path(sys.executable).with_name("sevhook-sim-qemu"))


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> SoftwarePlatform:
    return init_platform(StateDir(tmp_path_factory.mktemp("sim") / "state"), rsa_bits=2048)[0]


def export(platform: SoftwarePlatform, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SEVHOOK, "platform", "export", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SEVHOOK_SIM_DIR": str(platform.state.path)})


def check_firmware_files(platform: SoftwarePlatform, out: Path) -> None:
    assert (out / "pdh.cert").read_bytes() == platform.cert("pdh")
    chain = (out / "cert_chain.cert").read_bytes()
    assert len(chain) == 3 * SEV_CERT_SIZE
    cek = SevCertificate.parse(chain[2 * SEV_CERT_SIZE:])
    assert all(slot.usage == 0x1000 and slot.algorithm == 0 for slot in cek.signatures)  # as firmware exports it
    assert (out / "chip_id.hex").read_text().strip() == platform.get_id().hex().upper()
    assert os.stat(out).st_mode & 0o077 == 0


def test_emulator_probe_writes_what_the_firmware_exports(platform: SoftwarePlatform, tmp_path: Path) -> None:
    result = export(platform, "--emulator", SIM_QEMU, "--out-dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    check_firmware_files(platform, tmp_path / "out")
    assert not (tmp_path / "out" / "full_chain.bin").exists()
    pdh_b64, chain_b64, cpu0 = read_export(tmp_path / "out").launch_fields()
    assert cpu0 is not None and len(chain_b64) > len(pdh_b64)


def test_qmp_of_a_running_qemu(platform: SoftwarePlatform, tmp_path: Path) -> None:
    monitor = Path("/tmp") / f"sevhook-pe-{os.getpid()}.qmp"
    process = subprocess.Popen([SIM_QEMU, "--sim-standalone", "--sim-state-dir", str(platform.state.path), "-S",
                                "-nodefaults", "-nographic", "-machine", "none", "-qmp",
                                f"unix:{monitor},server=on,wait=off"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not monitor.exists():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        result = export(platform, "--qmp", str(monitor), "--out-dir", str(tmp_path / "out"))
        assert result.returncode == 0, result.stderr
        check_firmware_files(platform, tmp_path / "out")
    finally:
        process.terminate()
        process.wait(timeout=15)


def test_full_fetches_the_signed_cek_from_the_kds(platform: SoftwarePlatform, tmp_path: Path) -> None:
    ca = tmp_path / "ask_ark.cert"
    ca.write_bytes(platform.cert("ask") + platform.cert("ark"))
    ark = tmp_path / "ark.cert"
    ark.write_bytes(platform.cert("ark"))
    with SimulatedKds([platform.state]) as kds:
        result = export(platform, "--emulator", SIM_QEMU, "--out-dir", str(tmp_path / "out"), "--full",
                        "--kds-url", kds.url, "--ca", str(ca))
    assert result.returncode == 0, result.stderr
    check_firmware_files(platform, tmp_path / "out")
    full = tmp_path / "out" / "full_chain.bin"
    assert full.read_bytes() == platform.full_chain()
    verified = subprocess.run([*SEVHOOK, "owner", "verify-chain", str(full), "--trust-anchor", str(ark)],
                              capture_output=True, text=True, timeout=60)
    assert verified.returncode == 0 and "chain valid" in verified.stdout


def test_full_with_the_kds_down_or_no_ca_is_refused(platform: SoftwarePlatform, tmp_path: Path) -> None:
    no_ca = export(platform, "--emulator", SIM_QEMU, "--out-dir", str(tmp_path / "a"), "--full")
    assert no_ca.returncode == 2 and "--ca" in no_ca.stderr
    ca = tmp_path / "ask_ark.cert"
    ca.write_bytes(platform.cert("ask") + platform.cert("ark"))
    down = export(platform, "--emulator", SIM_QEMU, "--out-dir", str(tmp_path / "b"), "--full",
                  "--kds-url", "http://127.0.0.1:9", "--ca", str(ca))
    assert down.returncode != 0 and "127.0.0.1:9" in down.stderr and "Traceback" not in down.stderr
    assert not (tmp_path / "b" / "full_chain.bin").exists()


def test_a_missing_emulator_is_one_clear_line(platform: SoftwarePlatform, tmp_path: Path) -> None:
    result = export(platform, "--emulator", str(tmp_path / "no-such-qemu"), "--out-dir", str(tmp_path / "out"))
    assert result.returncode != 0 and "no-such-qemu" in result.stderr and "Traceback" not in result.stderr


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["pdh", "cert-chain", "cpu0-id"]),
                       st.one_of(st.text(max_size=64), st.binary(max_size=64).map(lambda b: b.hex()), st.integers())))
def test_capabilities_parser_fails_cleanly(capabilities: dict) -> None:
    with pytest.raises(SevhookError):
        PlatformExport.from_qmp(capabilities)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_chip_id_reader_fails_cleanly(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("chip") / "chip_id.hex"
    path.write_bytes(data)
    try:
        chip_id = read_chip_id(path)
    except SevhookError:
        return
    assert chip_id.hex().upper() == data.decode().strip().upper()
