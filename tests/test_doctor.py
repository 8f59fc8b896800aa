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
