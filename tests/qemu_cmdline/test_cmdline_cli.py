"""`sevhook cmdline`: output, warnings, exit statuses and --check, on libvirt's and sevhook's fixtures."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sevhook.cli import main
from sevhook.qemu_cmdline.argv import argv_from_text, read_launch_security
from sevhook.qemu_cmdline.passthrough import args_from_commandline

ROOT = Path(__file__).resolve().parents[2]
INVALID = ROOT / "fixtures" / "invalid"
VALID = ROOT / "fixtures" / "valid"
CAPS = """<domainCapabilities><features><sev supported='yes'><cbitpos>47</cbitpos>
<reducedPhysBits>1</reducedPhysBits></sev></features></domainCapabilities>"""


@pytest.fixture(scope="module")
def golden(shared: Path) -> Path:
    return shared / "libvirt-golden"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["cmdline", *args])
    out, err = capsys.readouterr()
    return code, out, err


def golden_object(args_file: Path) -> str:
    found = read_launch_security(argv_from_text(args_file.read_text()), {})
    assert found.object_text is not None
    return found.object_text


def test_prints_one_argv_element_per_line(capsys, golden: Path) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run(capsys, str(golden / "launch-security-sev.xml"))
    assert code == 0
    assert out.splitlines() == [
        "-machine",
        "confidential-guest-support=lsec0",
        "-object",
        golden_object(golden / "launch-security-sev.x86_64-6.0.0.args"),
    ]
    assert "<dhCert> is not valid base64" in err and "(libvirt lets this through; --strict refuses it)" in err
    assert "Traceback" not in err


def test_strict_refuses_what_libvirt_lets_through(capsys, golden: Path) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run(capsys, "--strict", str(golden / "launch-security-sev.xml"))
    assert (code, out) == (1, "")
    assert "--strict refuses" in err and "<session> is not valid base64" in err


def test_missing_platform_info_needs_a_source(capsys, golden: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    xml = str(golden / "launch-security-sev-missing-platform-info.xml")
    code, out, err = run(capsys, xml)
    assert (code, out) == (1, "") and "--domcaps FILE" in err
    caps = tmp_path / "caps.xml"
    caps.write_text(CAPS)
    expected = golden_object(golden / "launch-security-sev-missing-platform-info.x86_64-6.0.0.args")
    code, out, err = run(capsys, xml, "--domcaps", str(caps))
    assert code == 0 and out.splitlines()[3] == expected and f"from {caps}" in err
    code, out, _ = run(capsys, xml, "--cbitpos", "0x2f", "--reduced-phys-bits", "1")
    assert code == 0 and out.splitlines()[3] == expected


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--cbitpos", "47"], "together"),
        (["--cbitpos", "47", "--reduced-phys-bits", "1", "--domcaps", "x"], "give one source"),
        (["--syntax", "json", "--qemu-version", "5.2"], "no JSON -object syntax"),
        (["--qemu-version", "seven"], "not a QEMU version"),
        (["extra-arg"], "a QEMU argv is only read with --check"),
    ],
)
def test_usage_errors_exit_2(capsys, golden: Path, extra: list[str], message: str) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run(capsys, str(golden / "launch-security-sev.xml"), *extra)
    assert code == 2 and message in err


def test_missing_file_exits_2(capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run(capsys, str(tmp_path / "none.xml"))
    assert code == 2 and "no such file" in err


def test_libvirt4_compat_reproduces_the_4x_sample(capsys, golden: Path) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run(capsys, str(golden / "launch-security-sev.xml"), "--libvirt4-compat", "--lib-dir",
                       "/tmp/lib/domain--1-QEMUGuest1")
    old = argv_from_text((golden / "launch-security-sev.args.libvirt-4.x-commit-11ab77fe").read_text())
    assert code == 0
    assert out.splitlines() == ["-machine", "memory-encryption=sev0", "-object", old[old.index("-object") + 1]]


def test_old_qemu_and_auto_version(capsys, golden: Path) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run(capsys, str(golden / "launch-security-sev.xml"), "--qemu-version", "5.2")
    assert (code == 0 and out.splitlines()[1] == "memory-encryption=lsec0"
            and out.splitlines()[3].startswith("sev-guest,id=lsec0,"))
    # auto: the domain's QEMU 7.2
    code, out, _ = run(capsys, str(golden / "launch-security-sev.xml"), "--qemu-version", "auto")
    assert code == 0 and out.splitlines()[1] == "confidential-guest-support=lsec0"


def test_write_files_and_passthrough(capsys, golden: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lib = tmp_path / "guest"
    code, out, err = run(capsys, str(golden / "launch-security-sev.xml"), "--lib-dir", str(lib), "--write-files",
                         "--passthrough")
    assert code == 0
    argv = args_from_commandline(out)
    assert argv[:3] == ["-machine", "confidential-guest-support=lsec0", "-object"]
    assert f'"dh-cert-file":"{lib}/dh_cert.base64"' in argv[3]
    assert (lib / "dh_cert.base64").read_text() == "AQAAAAAOAAAAQAAAAAOAAAAQAAAAAOAAAAQAAAAAOAAAAQAAAAAOAAA"
    assert (lib / "session.base64").read_text() == "IHAVENOIDEABUTJUSTPROVIDINGASTRING"
    assert stat.S_IMODE((lib / "session.base64").stat().st_mode) == 0o600
    assert "wrote" in err


def test_passthrough_with_libvirts_lib_dir_warns(capsys, golden: Path) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run(capsys, str(golden / "launch-security-sev.xml"), "--passthrough")
    assert code == 0 and "use --lib-dir DIR --write-files" in err


def test_json_output(capsys, golden: Path) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run(capsys, str(golden / "launch-security-s390-pv.xml"), "--json")
    assert code == 0
    assert json.loads(out) == {"argv": ["-machine", "confidential-guest-support=lsec0", "-object",
                                        '{"qom-type":"s390-pv-guest","id":"lsec0"}'], "files": []}


@pytest.mark.parametrize(
    "fixture, message",
    [
        ("ls-type-sev-es.xml", "not schema-valid"),
        ("sev-unknown-child.xml", "not schema-valid"),
        ("attestation-ftp-url.xml", "not schema-valid"),
        ("snp-id-block-length.xml", "Unexpected length of 'idBlock'"),
        ("sev-policy-too-large.xml", "failed to get launch security policy"),
        ("sev-wrong-arch.xml", "needs an x86_64 guest"),
        ("domain-bad-vcpu.xml", "libvirt refuses this domain too"),
        ("hostile-billion-laughs.xml", "DOCTYPE"),
        ("tdx-mr-owner-length.xml", "'tdx' is not supported"),
    ],
)
def test_domains_libvirt_refuses_exit_1(capsys, fixture: str, message: str) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run(capsys, str(INVALID / fixture), "--cbitpos", "51", "--reduced-phys-bits", "1")
    assert (code, out) == (1, "") and message in err


@pytest.mark.parametrize("fixture",
                         ["sev-dhcert-wrong-usage.xml", "sev-session-wrong-size.xml", "sev-cbitpos-zero.xml",
                          "snp-bit17-clear.xml"])
def test_problems_libvirt_lets_through_are_warnings(capsys, fixture: str) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run(capsys, str(INVALID / fixture), "--cbitpos", "51", "--reduced-phys-bits", "1")
    assert code == 0 and out.splitlines()[2] == "-object" and "libvirt lets this through" in err
    assert run(capsys, str(INVALID / fixture), "--strict", "--cbitpos", "51", "--reduced-phys-bits", "1")[0] == 1


def test_no_launch_security_exits_1(capsys) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run(capsys, str(VALID / "no-launch-security.xml"))
    assert code == 1 and "nothing to translate" in err


def test_every_fixture_gives_an_answer_never_a_traceback(capsys) -> None:  # type: ignore[no-untyped-def]
    """In process: any exception other than SevhookError would escape main() and fail here."""
    for path in sorted(INVALID.glob("*.xml")) + sorted(VALID.glob("*.xml")):
        code, out, _ = run(capsys, str(path), "--cbitpos", "51", "--reduced-phys-bits", "1")
        assert code in (0, 1), path.name
        assert (code == 0) == bool(out), path.name


def test_stdin(golden: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sevhook.cli", "cmdline", "-"],
        input=(golden / "launch-security-s390-pv.xml").read_bytes(), capture_output=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.decode().splitlines()[3] == '{"qom-type":"s390-pv-guest","id":"lsec0"}'


def test_check_accepts_libvirts_own_argv(capsys, golden: Path) -> None:  # type: ignore[no-untyped-def]
    args_file = golden / "launch-security-sev.x86_64-6.0.0.args"
    code, out, _ = run(capsys, "--check", str(golden / "launch-security-sev.xml"), "--args-file", str(args_file))
    assert code == 0 and "carries exactly" in out
    argv = argv_from_text(args_file.read_text())
    code, out, _ = run(capsys, "--check", str(golden / "launch-security-sev.xml"), "--", *argv)
    assert code == 0
    # the XML without host values: they are taken from the argv, and said so
    code, _, err = run(capsys, "--check", str(golden / "launch-security-sev-missing-platform-info.xml"), "--", *argv)
    assert code == 0 and "cbitpos=47 accepted from the command line" in err


def test_check_reports_differences(capsys, golden: Path) -> None:  # type: ignore[no-untyped-def]
    argv = argv_from_text((golden / "launch-security-sev.x86_64-6.0.0.args").read_text())
    index = next(i for i, a in enumerate(argv) if '"sev-guest"' in a)
    argv[index] = argv[index].replace('"policy":1', '"policy":7')
    code, out, _ = run(capsys, "--check", str(golden / "launch-security-sev.xml"), "--", *argv)
    assert code == 1 and out.splitlines() == ["difference: policy (from <policy>): domain wants 0x1, command line has "
                                              "0x7"]
    code, out, _ = run(capsys, "--json", "--check", str(golden / "launch-security-sev.xml"), "--", *argv)
    assert code == 1 and json.loads(out)["differences"] == ["policy (from <policy>): domain wants 0x1, command line "
                                                            "has 0x7"]


def test_check_a_command_line_without_launch_security(capsys, golden: Path) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run(capsys, "--check", str(golden / "launch-security-s390-pv.xml"), "--", "qemu", "-machine", "q35",
                       "-S")
    assert code == 1 and "carries no launch security" in out


def test_check_needs_an_argv(capsys, golden: Path) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run(capsys, "--check", str(golden / "launch-security-sev.xml"))
    assert code == 2 and "--check needs the QEMU argv" in err


def test_check_with_options_between_domain_and_argv(capsys, golden: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    caps = tmp_path / "caps.xml"
    caps.write_text(CAPS)
    argv = argv_from_text((golden / "launch-security-sev.x86_64-6.0.0.args").read_text())
    xml = str(golden / "launch-security-sev-missing-platform-info.xml")
    code, _out, err = run(capsys, "--check", xml, "--domcaps", str(caps), "--", *argv)
    assert code == 0 and "accepted from the command line" not in err


def test_check_of_a_malformed_argv_is_one_clear_error(capsys, golden: Path) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run(capsys, "--check", str(golden / "launch-security-sev.xml"), "--", "qemu", "-machine",
                       "q35,confidential-guest-support=lsec0", "-object", "{bad")
    assert code == 1 and "not valid JSON" in err and "Traceback" not in err


@pytest.mark.parametrize("content, code, message", [
    (None, 2, "cannot read domain capabilities"),
    ("not xml at all", 1, "not XML"),
    ("<capabilities/>", 1, "not <domainCapabilities>"),
])
def test_a_bad_domcaps_file_is_reported_even_when_the_xml_has_the_values(  # type: ignore[no-untyped-def]
        capsys, golden: Path, tmp_path: Path, content: str | None, code: int, message: str) -> None:
    caps = tmp_path / "caps.xml"
    if content is not None:
        caps.write_text(content)
    xml = str(golden / "launch-security-sev.xml")  # has cbitpos and reducedPhysBits
    for args in ([xml, "--domcaps", str(caps)], ["--check", xml, "--domcaps", str(caps), "--", "qemu"]):
        got, out, err = run(capsys, *args)
        assert (got, out) == (code, "") and message in err and str(caps) in err, err
        assert "Traceback" not in err
    caps.write_text(CAPS)
    assert run(capsys, xml, "--domcaps", str(caps))[0] == 0


def test_domain_id_names_the_running_domain_s_lib_dir(capsys, golden: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    xml = str(golden / "launch-security-sev.xml")
    code, out, err = run(capsys, xml)
    assert code == 0 and "/var/lib/libvirt/qemu/domain--1-QEMUGuest1/dh_cert.base64" in out
    assert "-1 is the id libvirt's tests use for an inactive domain" in err and "--domain-id N" in err
    code, out, err = run(capsys, xml, "--domain-id", "7")
    assert code == 0 and '"dh-cert-file":"/var/lib/libvirt/qemu/domain-7-QEMUGuest1/dh_cert.base64"' in out
    assert '"session-file":"/var/lib/libvirt/qemu/domain-7-QEMUGuest1/session.base64"' in out
    assert "domain--1-" not in out + err and "inactive domain" not in err
    running = tmp_path / "running.xml"
    running.write_text((golden / "launch-security-sev.xml").read_text().replace("<domain type='kvm'>",
                                                                                  "<domain type='kvm' id='12'>", 1))
    code, out, err = run(capsys, str(running))
    assert code == 0 and "/domain-12-QEMUGuest1/" in out and "inactive domain" not in err
    for extra, message in ((["--domain-id", "0"], "1 or more"),
                           (["--domain-id", "3", "--lib-dir", "/tmp/x"], "not both")):
        code, _, err = run(capsys, xml, *extra)
        assert code == 2 and message in err
