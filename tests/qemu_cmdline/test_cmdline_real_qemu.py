"""Debian's QEMU 7.2 takes the generated arguments: it parses the object and every property and
stops only at SEV/KVM initialisation (this host has no SEV); a wrong property is reported, so these
tests can fail."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from sevhook.qemu_cmdline.libdir import write_files
from sevhook.qemu_cmdline.qemu_version import QemuVersion
from sevhook.qemu_cmdline.translate import CmdlineOptions, Translation, translate_launch_security
from sevhook.sev.policy import SevPolicy, SnpPolicy
from sevhook.xml.models import SevLaunchSecurity, SevSnpLaunchSecurity

QEMU = "/usr/bin/qemu-system-x86_64"
BASE = [QEMU, "-accel", "kvm", "-nodefaults", "-display", "none", "-S"]
REACHED_SEV_INIT = re.compile(r"sev_kvm_init: (cbitpos check failed, host '\d+' requested '\d+'|Failed to open "
                              r"/dev/sev)")
PARSE_ERRORS = re.compile(r"is unexpected|Invalid parameter|expects|JSON|does not accept|Expected '='")

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(
        Path("/dev/sev").exists(),
        reason="this host has /dev/sev: QEMU would really launch; these tests expect the failure at SEV init"
    ),
]


def run_qemu(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(BASE + args, capture_output=True, text=True, timeout=60, check=False)


def assert_accepted(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode != 0, "QEMU cannot start an SEV guest on a host without SEV"
    assert not PARSE_ERRORS.search(proc.stderr), proc.stderr
    assert REACHED_SEV_INIT.search(proc.stderr), proc.stderr


def sev_translation(tmp_path: Path, cbitpos: int, kernel_hashes: bool | None = True, **options: object) -> Translation:
    model = SevLaunchSecurity(
        policy=SevPolicy(0x0007), cbitpos=cbitpos, reduced_phys_bits=1, dh_cert="AAAA\n", session="BBBB",
        kernel_hashes=kernel_hashes
    )
    translation = translate_launch_security(model, tmp_path / "domain--1-g", CmdlineOptions(**options))  # type: ignore[arg-type]
    write_files(translation.files)  # present, as libvirt writes them before QEMU starts
    return translation


@pytest.mark.parametrize("syntax", ["json", "keyval"])
@pytest.mark.parametrize("cbitpos", [47, 0])  # 47: stops at the cbitpos check; 0: passes it and stops opening /dev/sev
def test_qemu_accepts_every_sev_property(tmp_path: Path, syntax: str, cbitpos: int) -> None:
    translation = sev_translation(tmp_path, cbitpos, syntax=syntax, qemu_version=QemuVersion(7, 2))
    assert {"dh-cert-file", "session-file", "kernel-hashes", "policy"} <= set(translation.object.names())
    proc = run_qemu(["-machine", "q35," + translation.machine_text, "-object", translation.object_text])
    assert_accepted(proc)
    if cbitpos == 0:
        assert "Failed to open /dev/sev" in proc.stderr  # got past the cbitpos and reduced-phys-bits checks


def test_separate_machine_option_merges_as_printed(tmp_path: Path) -> None:
    translation = sev_translation(tmp_path, 47)
    assert_accepted(run_qemu(["-machine", "q35", *translation.argv]))


def test_pre_6_0_form_and_libvirt_4x_form_still_accepted(tmp_path: Path) -> None:
    old = sev_translation(tmp_path, 47, kernel_hashes=None, qemu_version=QemuVersion(5, 2))
    assert old.machine_text == "memory-encryption=lsec0"
    compat = translate_launch_security(
        SevLaunchSecurity(policy=SevPolicy(1), cbitpos=47, reduced_phys_bits=1, dh_cert="A", session="B"),
        tmp_path / "old",
        CmdlineOptions(libvirt4_compat=True),
    )
    write_files(compat.files)
    for translation in (old, compat):
        # -object before -machine, as libvirt 4.x placed it last but QEMU takes any order
        assert_accepted(run_qemu(["-object", translation.object_text, "-machine", "q35," + translation.machine_text]))


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda t: t[:-1] + ',"bogus":1}', "Parameter 'bogus' is unexpected"),
        (lambda t: t.replace('"policy":7', '"policy":"7"'), "Parameter 'policy' expects"),
        (lambda t: t[:-1], "JSON"),
    ],
)
def test_qemu_reports_a_wrong_json_property(tmp_path: Path, mangle, message: str) -> None:  # type: ignore[no-untyped-def]
    translation = sev_translation(tmp_path, 47)
    proc = run_qemu(["-machine", "q35," + translation.machine_text, "-object", mangle(translation.object_text)])
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert not REACHED_SEV_INIT.search(proc.stderr)


def test_qemu_reports_a_wrong_keyval_property(tmp_path: Path) -> None:
    translation = sev_translation(tmp_path, 47, syntax="keyval")
    proc = run_qemu(["-machine", "q35," + translation.machine_text, "-object", translation.object_text + ",bogus=1"])
    assert "Invalid parameter 'bogus'" in proc.stderr and not REACHED_SEV_INIT.search(proc.stderr)


def test_snp_is_refused_for_qemu_7_2_as_qemu_7_2_refuses_it(tmp_path: Path) -> None:
    """sevhook's version gate agrees with the binary: 7.2 has no sev-snp-guest."""
    model = SevSnpLaunchSecurity(policy=SnpPolicy(0x30000), cbitpos=47, reduced_phys_bits=1)
    newest = translate_launch_security(model, tmp_path)
    proc = run_qemu(["-machine", "q35," + newest.machine_text, "-object", newest.object_text])
    assert "does not accept value 'sev-snp-guest'" in proc.stderr
    from sevhook.errors import SevhookError

    with pytest.raises(SevhookError, match="not supported with this QEMU binary"):
        translate_launch_security(model, tmp_path, CmdlineOptions(qemu_version=QemuVersion.of_binary(QEMU)))
