"""Full QEMU argv -> launch security, and the property-by-property check against a domain."""

from __future__ import annotations

from pathlib import Path

import pytest

from sevhook.errors import FormatError
from sevhook.qemu_cmdline.argv import argv_from_text, read_launch_security, scan
from sevhook.qemu_cmdline.check import compare, fill_from_argv
from sevhook.qemu_cmdline.translate import CmdlineOptions, translate_launch_security
from sevhook.sev.policy import SevPolicy, SnpPolicy
from sevhook.xml.models import SevLaunchSecurity, SevSnpLaunchSecurity

LIB = Path("/var/lib/libvirt/qemu/domain--1-g")
SEV = SevLaunchSecurity(policy=SevPolicy(0x33), cbitpos=51, reduced_phys_bits=1, dh_cert="DH", session="SE")
FILES = {f"{LIB}/dh_cert.base64": "DH", f"{LIB}/session.base64": "SE"}
JSON_OBJ = translate_launch_security(SEV, LIB).object_text


def full_argv(machine: str, obj: str) -> list[str]:
    return [
        "/usr/bin/qemu-system-x86_64", "-name", "guest=g,debug-threads=on", "-S",
        "-object", '{"qom-type":"secret","id":"masterKey0","format":"raw","file":"/x/master-key.aes"}',
        "-machine", machine, "-accel", "kvm", "-m", "size=219136k", "-nodefaults",
        "-append", "-object sev-guest,id=lsec0", "-object", obj, "-msg", "timestamp=on",
    ]  # fmt: skip


def test_json_object_among_other_options() -> None:
    found = read_launch_security(full_argv("pc-q35-7.2,usb=off,confidential-guest-support=lsec0", JSON_OBJ), FILES)
    assert found.model == SEV
    assert (found.syntax, found.machine_property, found.problems) == ("json", "confidential-guest-support", ())


def test_keyval_object_before_the_machine_with_escaped_commas() -> None:
    lib = Path("/srv/x,y")
    text = translate_launch_security(SEV, lib, CmdlineOptions(syntax="keyval")).object_text
    argv = ["qemu", "-object", text, "-M", "pc,usb=off,memory-encryption=lsec0"]
    found = read_launch_security(argv, {f"{lib}/dh_cert.base64": "DH", f"{lib}/session.base64": "SE"})
    assert found.model == SEV and found.syntax == "keyval" and found.machine_property == "memory-encryption"


def test_later_machine_options_merge_and_win() -> None:
    argv = ["qemu", "-machine", "q35,confidential-guest-support=nothing", "--machine",
            "confidential-guest-support=lsec0", "--object", JSON_OBJ]
    assert read_launch_security(argv, FILES).model == SEV


def test_argument_of_another_option_is_never_an_option() -> None:
    cmdline = scan(["qemu", "-append", "-object", "-kernel", "-machine", "-S", "-object", "x"])
    assert [a.text for a in cmdline.object_args] == ["x"] and cmdline.machine_args == ()


def test_option_without_argument_is_a_format_error() -> None:
    with pytest.raises(FormatError, match="needs an argument"):
        scan(["qemu", "-nodefaults", "-object"])


def test_unreferenced_and_missing_objects_are_problems() -> None:
    found = read_launch_security(["qemu", "-object", JSON_OBJ], FILES)
    assert found.model is None and "not the machine's confidential-guest-support" in found.problems[0]
    found = read_launch_security(["qemu", "-machine", "confidential-guest-support=lsec1", "-object", JSON_OBJ], FILES)
    assert found.model is None and any("no -object with that id" in p for p in found.problems)
    argv = ["qemu", "-machine", "confidential-guest-support=pc.ram", "-object", "memory-backend-ram,id=pc.ram,size=1G"]
    assert "not a launch-security object" in read_launch_security(argv, {}).problems[0]


def test_unreadable_files_are_listed_not_guessed() -> None:
    found = read_launch_security(["qemu", "-machine", "confidential-guest-support=lsec0", "-object", JSON_OBJ], {})
    assert found.model is not None and found.model.dh_cert is None  # type: ignore[union-attr]
    assert [path for path, _ in found.unread_files] == list(FILES)


def test_argv_from_libvirt_args_text_and_proc_cmdline() -> None:
    text = ("LC_ALL=C \\\nPATH=/bin \\\n/usr/bin/qemu-system-x86_64 \\\n-name guest=g \\\n"
            "-object 'sev-guest,id=a,\\\npolicy=1' \\\n-S\n")
    assert argv_from_text(text) == ["/usr/bin/qemu-system-x86_64", "-name", "guest=g", "-object",
                                    "sev-guest,id=a,policy=1", "-S"]
    assert argv_from_text("qemu\0-object\0a b\0") == ["qemu", "-object", "a b"]
    log = (
        "2026-01-01 10:00:00.000+0000: starting up libvirt version: 9.0.0\n" + text.replace("-S", "-first")
        + "2026-01-01 10:00:01.000+0000: shutting down, reason=can't start\n"
        + "2026-01-01 11:00:00.000+0000: starting up libvirt version: 9.0.0\n" + text
        + "char device redirected to /dev/pts/3 (label charserial0)\n"
    )
    assert argv_from_text(log) == argv_from_text(text)
    with pytest.raises(FormatError):
        argv_from_text("qemu -object 'unterminated")


def expected(model=SEV):  # type: ignore[no-untyped-def]
    return translate_launch_security(model, LIB)


def check(argv: list[str], files=FILES, strict: bool = False):  # type: ignore[no-untyped-def]
    return compare(expected(), read_launch_security(argv, files), files, strict)


def test_identical_command_line_passes_in_either_form() -> None:
    assert check(["q", "-machine", "confidential-guest-support=lsec0", "-object", JSON_OBJ]).ok
    old = translate_launch_security(SEV, LIB, CmdlineOptions(libvirt4_compat=True))
    result = check(["q", *old.argv])
    assert result.ok and "QEMU treats both alike" in result.notes[0]


@pytest.mark.parametrize(
    "obj, difference",
    [
        (JSON_OBJ.replace('"policy":51', '"policy":1'),
         "policy (from <policy>): domain wants 0x33, command line has 0x1"),
        (JSON_OBJ.replace('"cbitpos":51,', ""), "cbitpos (from <cbitpos>): domain wants 51, command line has absent"),
        (JSON_OBJ[:-1] + ',"handle":5}',
         "handle (from <handle> (libvirt never passes it)): domain wants absent, command line has 5"),
        (JSON_OBJ[:-1] + ',"kernel-hashes":false}',
         "kernel-hashes (from kernelHashes=): domain wants absent, command line has false"),
        (JSON_OBJ.replace("session.base64", "other.base64"), "session-file (from <session>): domain wants"),
        (JSON_OBJ.replace("sev-guest", "sev-snp-guest").replace(',"dh-cert-file"', '}').split("}")[0] + "}",
         "object type: domain wants sev-guest"),
        (JSON_OBJ[:-1] + ',"bogus":1}', "QEMU's sev-guest has no property 'bogus'"),
    ],
)
def test_each_difference_is_named(obj: str, difference: str) -> None:
    result = check(["q", "-machine", "confidential-guest-support=lsec0", "-object", obj])
    assert not result.ok
    assert any(difference in d for d in result.differences), result.differences


def test_file_content_is_compared_when_readable(tmp_path: Path) -> None:
    exp = translate_launch_security(SEV, tmp_path)
    argv = ["q", *exp.argv]
    (tmp_path / "dh_cert.base64").write_text("DH")
    (tmp_path / "session.base64").write_text("not the session")
    from sevhook.qemu_cmdline.argv import DiskFiles

    result = compare(exp, read_launch_security(argv), DiskFiles())
    assert result.differences == (
        f"session-file '{tmp_path}/session.base64' does not hold the exact text of <session>",)
    (tmp_path / "session.base64").write_text("SE")
    assert compare(exp, read_launch_security(argv), DiskFiles()).ok


def test_unreadable_file_is_a_note_or_under_strict_a_difference() -> None:
    argv = ["q", "-machine", "confidential-guest-support=lsec0", "-object", JSON_OBJ]
    lenient = check(argv, files={})
    assert lenient.ok and any("not readable here" in n for n in lenient.notes)
    assert not check(argv, files={}, strict=True).ok


def test_no_launch_security_at_all() -> None:
    result = check(["q", "-machine", "q35"])
    assert result.differences == ("the command line carries no launch security (expected sev-guest via -machine "
                                  "confidential-guest-support=lsec0)",)


def test_host_values_missing_from_the_xml_are_taken_from_the_argv() -> None:
    model = SevSnpLaunchSecurity(policy=SnpPolicy(0x30000))
    text = translate_launch_security(SevSnpLaunchSecurity(policy=SnpPolicy(0x30000), cbitpos=51, reduced_phys_bits=1),
                                     LIB).object_text
    found = read_launch_security(["q", "-machine", "confidential-guest-support=lsec0", "-object", text], {})
    filled, notes = fill_from_argv(model, found)
    assert (filled.cbitpos, filled.reduced_phys_bits) == (51, 1) and len(notes) == 2  # type: ignore[union-attr]
    assert compare(translate_launch_security(filled, LIB), found, {}).ok


def test_disk_files_never_hang_on_devices_fifos_or_huge_files(tmp_path: Path) -> None:
    import os

    from sevhook.qemu_cmdline.argv import MAX_LAUNCH_FILE_BYTES, DiskFiles

    regular = tmp_path / "dh_cert.base64"
    regular.write_text("AAAA")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    huge = tmp_path / "huge"
    huge.write_bytes(b"A" * (MAX_LAUNCH_FILE_BYTES + 1))
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe")
    disk = DiskFiles()
    assert disk.get(str(regular)) == "AAAA"
    for path in ("/dev/zero", str(fifo), str(huge), str(binary), str(tmp_path), str(tmp_path / "absent"), "a\0b"):
        assert disk.get(path) is None, path


def test_json_is_recognised_only_by_a_leading_brace_as_qemu_does() -> None:
    with pytest.raises(FormatError, match="expected '=' after parameter"):  # QEMU reads ' {...' as keyval too
        read_launch_security(["q", "-machine", "confidential-guest-support=lsec0", "-object", " " + JSON_OBJ], FILES)
