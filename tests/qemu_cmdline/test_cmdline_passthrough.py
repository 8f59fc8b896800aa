"""The <qemu:commandline> form: valid for libvirt's own schema, and passed by real libvirtd to real
QEMU, which then stops at SEV init exactly as with libvirt's native <launchSecurity>."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from lxml import etree

from sevhook.errors import FormatError
from sevhook.qemu_cmdline.argv import argv_from_text, read_launch_security
from sevhook.qemu_cmdline.libdir import write_files
from sevhook.qemu_cmdline.passthrough import args_from_commandline, commandline_element, commandline_xml
from sevhook.qemu_cmdline.translate import CmdlineOptions, translate_launch_security
from sevhook.sev.policy import SevPolicy
from sevhook.xml.models import QEMU_NS, SevLaunchSecurity

LIBVIRT_RNG = Path("/usr/share/libvirt/schemas/domain.rng")
MODEL = SevLaunchSecurity(policy=SevPolicy(0x3), cbitpos=47, reduced_phys_bits=1, dh_cert="AAAA", session="BBBB")


def domain_with_passthrough(name: str, argv: list[str]) -> bytes:
    root = etree.fromstring(
        f"""<domain type='kvm' xmlns:qemu='{QEMU_NS}'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
</domain>"""
    )
    root.append(commandline_element(argv))
    return etree.tostring(root, pretty_print=True)


def test_block_round_trips_and_escapes_json_quotes(tmp_path: Path) -> None:
    argv = translate_launch_security(MODEL, tmp_path).argv
    text = commandline_xml(argv)
    assert text.startswith(f'<qemu:commandline xmlns:qemu="{QEMU_NS}">')
    assert "&quot;qom-type&quot;" in text
    assert args_from_commandline(text) == argv
    assert args_from_commandline(domain_with_passthrough("g", argv)) == argv


def test_not_xml_is_a_format_error() -> None:
    with pytest.raises(FormatError, match="not XML"):
        args_from_commandline("<qemu:commandline")


def test_libvirts_installed_schema_accepts_the_block(tmp_path: Path) -> None:
    schema = etree.RelaxNG(etree.parse(str(LIBVIRT_RNG)))
    for options in (CmdlineOptions(), CmdlineOptions(syntax="keyval")):
        argv = translate_launch_security(MODEL, tmp_path, options).argv
        document = etree.fromstring(domain_with_passthrough("g", argv))
        assert schema.validate(document), schema.error_log


@pytest.mark.libvirt
@pytest.mark.qemu
def test_real_libvirtd_passes_the_block_to_qemu(libvirt_uri: str, tmp_path: Path) -> None:
    translation = translate_launch_security(MODEL, tmp_path / "lib")
    write_files(translation.files)
    name = f"sevhook-cmdline-passthrough-{os.getpid()}"
    xml = tmp_path / "domain.xml"
    xml.write_bytes(domain_with_passthrough(name, translation.argv))

    def virsh(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["virsh", "-c", libvirt_uri, *args], capture_output=True, text=True, timeout=120,
                              check=False)

    defined = virsh("define", str(xml))
    assert defined.returncode == 0, defined.stderr
    try:
        assert args_from_commandline(virsh("dumpxml", name).stdout) == translation.argv
        started = virsh("start", name)
        assert started.returncode != 0, "no SEV on this host: the start must fail at SEV init"
        assert "sev_kvm_init" in started.stderr, started.stderr
        assert "is unexpected" not in started.stderr and "Invalid parameter" not in started.stderr
        # libvirt's domain log records the command it ran: the launch security reads back from it
        log = Path("/var/log/libvirt/qemu") / f"{name}.log"
        found = read_launch_security(argv_from_text(log.read_text()))
        assert found.model == MODEL and found.problems == ()
    finally:
        virsh("destroy", name)
        virsh("undefine", name)
        Path("/var/log/libvirt/qemu", f"{name}.log").unlink(missing_ok=True)
