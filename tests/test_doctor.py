"""`sevhook doctor`: the pure checks on built facts, and the whole command against real libvirtd."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sevhook import doctor
from sevhook.doctor import HostFacts, run_checks

READY = HostFacts(
    cpu_flags=frozenset({"sev", "sev_es"}), kvm_amd_sev="Y\n", dev_sev=True, dev_kvm=True,
    libvirt_version=(9, 0, 0), qemu_version=(7, 2, 0), domcaps_sev=True,
    firmware_features={"60-ovmf.json": frozenset({"amd-sev", "amd-sev-es"})},
    firmware_secret_areas={"/usr/share/OVMF/OVMF.amdsev.fd": True},
    hook_path=Path("/etc/libvirt/hooks/qemu.d/50-sevhook"), hook_installed=True, hook_mtime=100.0,
    daemon_started=200.0,
)


def by_name(facts: HostFacts) -> dict[str, doctor.Check]:
    return {c.name: c for c in run_checks(facts)}


def test_a_ready_host_passes_every_check():
    assert {c.status for c in run_checks(READY)} == {"ok"}


@pytest.mark.parametrize(
    ("change", "name", "status", "fix_words"),
    [
        ({"cpu_flags": frozenset({"svm"})}, "CPU", "fail", "sevhook demo"),
        ({"kvm_amd_sev": None}, "kvm_amd sev parameter", "fail", "modprobe kvm_amd sev=1"),
        ({"kvm_amd_sev": "N\n"}, "kvm_amd sev parameter", "fail", "sev=1"),
        ({"dev_sev": False}, "/dev/sev", "fail", "dmesg"),
        ({"libvirt_version": (7, 10, 0)}, "libvirt", "fail", "libvirt >= 8.0.0"),
        ({"qemu_version": (5, 2, 0)}, "QEMU", "warn", ">= 6.0.0"),
        ({"domcaps_sev": False}, "domcapabilities", "fail", "restart libvirtd"),
        ({"firmware_features": {}}, "OVMF firmware", "fail", "install OVMF"),
        ({"firmware_features": {"a.json": frozenset({"amd-sev"})}}, "OVMF firmware", "warn", "AmdSev"),
        ({"firmware_secret_areas": {"/usr/share/OVMF/OVMF_CODE.fd": False}}, "OVMF secret area", "warn",
         "OvmfPkg/AmdSev"),
        ({"hook_installed": False}, "sevhook hook", "warn", "sevhook hook install"),
        ({"daemon_started": 50.0}, "sevhook hook", "fail", "restart libvirtd"),
    ],
)
def test_each_failed_check_says_what_to_fix(change, name, status, fix_words):
    check = by_name(HostFacts(**{**READY.__dict__, **change}))[name]
    assert check.status == status
    assert fix_words in check.fix


@pytest.mark.libvirt
def test_doctor_against_real_libvirtd(libvirt_uri, services, tmp_path):
    hooks = tmp_path / "hooks"
    (hooks / "qemu.d").mkdir(parents=True)
    hook = hooks / "qemu.d" / doctor.HOOK_NAME
    hook.write_text("#!/bin/sh\nexit 0\n")
    hook.chmod(0o755)
    os.utime(hook, (time.time() + 3600, time.time() + 3600))  # "installed" after the daemon started
    cmd = [sys.executable, "-m", "sevhook.cli", "doctor", "-c", libvirt_uri, "--hooks-dir", str(hooks),
           "--daemon-pidfile", services["SEVHOOK_TEST_LIBVIRTD_PIDFILE"], "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    report = json.loads(proc.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert proc.returncode == 1 and report["ready"] is False  # no SEV hardware here
    assert checks["libvirt"]["status"] == "ok" and checks["libvirt"]["found"].startswith("libvirt 9.")
    assert checks["QEMU"]["status"] == "ok"
    assert checks["domcapabilities"]["found"] == "<sev supported='no'>"
    assert checks["sevhook hook"]["status"] == "fail"
    assert proc.stderr == ""


def test_doctor_plain_output_without_libvirt(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sevhook.cli", "doctor", "-c", "test:///nonexistent/x.xml",
                           "--hooks-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "host is NOT ready for SEV guests" in proc.stdout
    assert "Traceback" not in proc.stderr and "\x1b[" not in proc.stdout


NO_HARDWARE = HostFacts(**{**READY.__dict__, "cpu_flags": frozenset({"svm"}), "kvm_amd_sev": None,
                           "dev_sev": False})


def test_a_software_platform_stands_in_for_missing_hardware():
    assert {c.name for c in run_checks(NO_HARDWARE) if c.status == "fail"} == {"CPU", "kvm_amd sev parameter",
                                                                               "/dev/sev"}
    pointed = HostFacts(**{**NO_HARDWARE.__dict__, "emulator": Path("/usr/local/bin/qemu-sim"),
                           "emulator_sev": "query-sev-capabilities answers"})
    checks = by_name(pointed)
    assert {c.status for c in checks.values()} == {"ok", "warn"}
    assert checks["CPU"].status == "warn" and "software platform" in checks["CPU"].fix
    assert checks["emulator"].status == "ok"
    broken = HostFacts(**{**NO_HARDWARE.__dict__, "emulator": Path("/x"), "emulator_error": "exited with status 1"})
    assert by_name(broken)["emulator"].status == "fail" and by_name(broken)["CPU"].status == "fail"


def test_the_plain_output_fits_100_columns():
    from sevhook.commands.doctor import render

    long = HostFacts(**{**READY.__dict__, "firmware_features": {f"/usr/share/qemu/firmware/{n}-edk2.json":
                                                                frozenset({"amd-sev"}) for n in range(40)}})
    lines = render(run_checks(long) + run_checks(NO_HARDWARE))
    assert lines and all(len(text) <= 100 for text, _status in lines)
    assert lines[0][0].startswith("ok    CPU: ")


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """The software platform's QEMU stand-in behind a wrapper naming its state directory, as an
    administrator points libvirt's <emulator> at it."""
    root = tmp_path_factory.mktemp("doctor-sim")
    subprocess.run([sys.executable, "-m", "sevhook.cli", "sim", "platform", "init", "--state-dir", str(root / "sim"),
                    "--rsa-bits", "2048"], check=True, capture_output=True, timeout=120)
    wrapper = root / "qemu-sim"
    wrapper.write_text(f"#!/bin/sh\nexec {Path(sys.executable).with_name('sevhook-sim-qemu')} "
                       f"--sim-state-dir {root / 'sim'} \"$@\"\n")
    wrapper.chmod(0o755)
    return wrapper


@pytest.mark.libvirt
def test_doctor_with_the_stand_in_says_ready(libvirt_uri, stand_in, tmp_path):
    cmd = [sys.executable, "-m", "sevhook.cli", "doctor", "-c", libvirt_uri, "--hooks-dir", str(tmp_path),
           "--emulator", str(stand_in)]
    plain = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert plain.stdout.splitlines()[-1] == "host is ready for SEV guests"
    assert all(len(line) <= 100 for line in plain.stdout.splitlines())
    report = json.loads(subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=120).stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["ready"] is True
    assert checks["emulator"]["status"] == "ok" and "query-sev-capabilities answers" in checks["emulator"]["found"]
    assert checks["domcapabilities"]["found"] == f"<sev supported='yes'> for {stand_in}"


def test_doctor_with_an_emulator_without_sev(tmp_path):
    fake = tmp_path / "qemu-broken"
    fake.write_text("#!/bin/sh\necho 'qemu: no such machine' >&2\nexit 1\n")
    fake.chmod(0o755)
    proc = subprocess.run([sys.executable, "-m", "sevhook.cli", "doctor", "-c", "test:///nonexistent/x.xml",
                           "--hooks-dir", str(tmp_path), "--emulator", str(fake), "--json"],
                          capture_output=True, text=True, timeout=60)
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert proc.returncode == 1
    assert checks["emulator"]["found"] == f"{fake}: exited with status 1: qemu: no such machine"
    assert checks["CPU"]["status"] == "fail"  # nothing stands in for the hardware
