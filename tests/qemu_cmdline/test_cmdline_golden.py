"""libvirt's own test data as the oracle: the -object argument byte for byte, the machine property,
the host values filled from capabilities, and libvirt 4.x's keyval form."""

from __future__ import annotations

from pathlib import Path

import pytest

from sevhook.qemu_cmdline.argv import argv_from_text, machine_properties, read_launch_security, scan
from sevhook.qemu_cmdline.check import compare
from sevhook.qemu_cmdline.domain_input import load_for_cmdline
from sevhook.qemu_cmdline.platform import DomainCapabilitiesFile, ExplicitValues, fill_platform
from sevhook.qemu_cmdline.translate import CmdlineOptions, translate

# libvirt's QEMU 6.0 test capabilities (as the golden README quotes them), in `virsh domcapabilities` form.
DOMCAPS_QEMU_6_0 = b"""<domainCapabilities>
  <path>/usr/bin/qemu-system-x86_64</path>
  <domain>kvm</domain>
  <features>
    <gic supported='no'/>
    <sev supported='yes'>
      <cbitpos>47</cbitpos>
      <reducedPhysBits>1</reducedPhysBits>
    </sev>
  </features>
</domainCapabilities>
"""


def golden_pairs(shared: Path) -> list[tuple[Path, Path]]:
    """Every libvirt input XML with the .args libvirt produced from it."""
    golden = shared / "libvirt-golden"
    pairs = []
    for args in sorted(golden.glob("*.args")):
        stem = args.name.split(".")[0]
        pairs.append((golden / f"{stem}.xml", args))
    return pairs


def launch_security_args(argv: list[str]) -> tuple[str, str]:
    """The machine property and the launch-security -object text of a libvirt argv."""
    found = read_launch_security(argv, {})
    assert found.object_text is not None and found.machine_property is not None and not found.problems
    machine = machine_properties(scan(argv).machine_args)
    return f"{found.machine_property}={machine[found.machine_property]}", found.object_text


def test_there_is_golden_data(shared: Path) -> None:
    names = {xml.name for xml, _ in golden_pairs(shared)}
    assert names == {"launch-security-sev.xml", "launch-security-sev-missing-platform-info.xml",
                     "launch-security-s390-pv.xml"}


def test_every_golden_input_gives_libvirts_object_byte_for_byte(shared: Path) -> None:
    for xml, args in golden_pairs(shared):
        loaded = load_for_cmdline(xml)
        model, _ = fill_platform(loaded.launch_security, ExplicitValues(47, 1))
        ours = translate(loaded.domain, CmdlineOptions(), model)
        machine, object_text = launch_security_args(argv_from_text(args.read_text()))
        assert ours.object_text == object_text, xml.name
        assert ours.machine_text == machine, xml.name


def test_missing_platform_info_is_filled_from_domcaps(shared: Path, tmp_path: Path) -> None:
    golden = shared / "libvirt-golden"
    loaded = load_for_cmdline(golden / "launch-security-sev-missing-platform-info.xml")
    assert loaded.launch_security.cbitpos is None  # type: ignore[union-attr]
    caps = tmp_path / "domcaps.xml"
    caps.write_bytes(DOMCAPS_QEMU_6_0)
    model, info = fill_platform(loaded.launch_security, DomainCapabilitiesFile(caps))
    assert info is not None and (info.cbitpos, info.reduced_phys_bits, info.source) == (47, 1, str(caps))
    expected = launch_security_args(argv_from_text(
        (golden / "launch-security-sev-missing-platform-info.x86_64-6.0.0.args").read_text()))
    assert (translate(loaded.domain, model=model).machine_text,
            translate(loaded.domain, model=model).object_text) == expected


def test_libvirt_4x_sample_in_keyval_compat_mode(shared: Path) -> None:
    golden = shared / "libvirt-golden"
    old_argv = argv_from_text((golden / "launch-security-sev.args.libvirt-4.x-commit-11ab77fe").read_text())
    loaded = load_for_cmdline(golden / "launch-security-sev.xml")
    ours = translate(loaded.domain, CmdlineOptions(libvirt4_compat=True, lib_dir=Path("/tmp/lib/domain--1-QEMUGuest1")))
    object_text = old_argv[old_argv.index("-object") + 1]
    assert ours.object_text == object_text
    assert object_text == (
        "sev-guest,id=sev0,cbitpos=47,reduced-phys-bits=1,policy=0x1,"
        "dh-cert-file=/tmp/lib/domain--1-QEMUGuest1/dh_cert.base64,"
        "session-file=/tmp/lib/domain--1-QEMUGuest1/session.base64"
    )
    machine = old_argv[old_argv.index("-machine") + 1]
    assert machine.endswith("," + ours.machine_text) and ours.machine_text == "memory-encryption=sev0"


@pytest.mark.parametrize("lib_dir", [None, "/tmp/lib/domain--1-QEMUGuest1"])
def test_golden_argvs_check_clean_against_their_domains(shared: Path, lib_dir: str | None) -> None:
    golden = shared / "libvirt-golden"
    cases = [(golden / "launch-security-sev.xml", golden / "launch-security-sev.x86_64-6.0.0.args")]
    if lib_dir:
        cases = [(golden / "launch-security-sev.xml", golden / "launch-security-sev.args.libvirt-4.x-commit-11ab77fe")]
    for xml, args in cases:
        loaded = load_for_cmdline(xml)
        expected = translate(loaded.domain, CmdlineOptions(lib_dir=Path(lib_dir) if lib_dir else None))
        found = read_launch_security(argv_from_text(args.read_text()), {})
        assert found.model is not None and found.model.policy.value == 1  # type: ignore[union-attr]
        assert compare(expected, found, {}).ok


def test_round_trip_of_the_golden_domains(shared: Path) -> None:
    for xml, _ in golden_pairs(shared):
        loaded = load_for_cmdline(xml)
        model, _ = fill_platform(loaded.launch_security, ExplicitValues(47, 1))
        for options in (CmdlineOptions(), CmdlineOptions(syntax="keyval")):
            ours = translate(loaded.domain, options, model)
            files = {str(path): text for path, text in ours.files.items()}
            assert read_launch_security(["qemu", *ours.argv], files).model == model
