"""sevhook-qemu's parts that need no libvirtd: the pass-through for probes, emulator.conf, the platform
export cache, and the sev-guest argument rewrite."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sevhook.wrapper.config import DEFAULT_QEMU, ConfigError, read_config
from sevhook.wrapper.launch import sev_object_with_files

WRAPPER = str(Path(sys.executable).with_name("sevhook-qemu"))


@pytest.mark.qemu
def test_probes_pass_straight_through_to_the_real_qemu():
    """-version and libvirt's -machine none probe: the real QEMU's own answer, exec'd (same pid)."""
    begin = time.monotonic()
    wrapped = subprocess.run([WRAPPER, "-version"], capture_output=True, text=True, timeout=30)
    elapsed = time.monotonic() - begin
    direct = subprocess.run([DEFAULT_QEMU, "-version"], capture_output=True, text=True, timeout=30)
    assert wrapped.returncode == direct.returncode == 0
    assert wrapped.stdout == direct.stdout
    assert elapsed < 5


def test_config_defaults_and_settings(tmp_path):
    assert read_config(tmp_path / "absent.conf")["qemu"] == DEFAULT_QEMU
    conf = tmp_path / "emulator.conf"
    conf.write_text("# host settings\nqemu = /opt/qemu/bin/qemu-system-x86_64\n\nplatform-cache = /srv/cache  # x\n")
    assert read_config(conf) == {"qemu": "/opt/qemu/bin/qemu-system-x86_64", "platform-cache": "/srv/cache",
                                 "libvirt-state-dir": "/run/libvirt/qemu"}


@pytest.mark.parametrize("line", ["qemu /usr/bin/qemu", "emulator = /usr/bin/qemu", "qemu = relative/qemu"])
def test_config_errors_name_the_file_and_line(tmp_path, line):
    conf = tmp_path / "emulator.conf"
    conf.write_text(f"qemu = /usr/bin/qemu-system-x86_64\n{line}\n")
    with pytest.raises(ConfigError, match=rf"^{conf}:2: expected `qemu = /ABSOLUTE/PATH`"):
        read_config(conf)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_config_parser_fuzz(tmp_path_factory, text):
    conf = tmp_path_factory.mktemp("conf") / "emulator.conf"
    conf.write_text(text, encoding="utf-8")
    try:
        settings_read = read_config(conf)
    except ConfigError as exc:
        assert str(exc).startswith(f"{conf}:")
    else:
        assert set(settings_read) == {"qemu", "platform-cache", "libvirt-state-dir"}
        assert all(value.startswith("/") for value in settings_read.values())


def test_sev_object_gets_the_launch_files_in_either_syntax():
    files = Path("/run/sevhook/web,1")
    libvirt_json = '{"qom-type":"sev-guest","id":"lsec0","cbitpos":47,"reduced-phys-bits":1,"policy":1}'
    props = json.loads(sev_object_with_files(libvirt_json, files))
    assert props == {"qom-type": "sev-guest", "id": "lsec0", "cbitpos": 47, "reduced-phys-bits": 1, "policy": 1,
                     "dh-cert-file": "/run/sevhook/web,1/godh.b64", "session-file": "/run/sevhook/web,1/session.b64"}
    keyval = sev_object_with_files("sev-guest,id=lsec0,cbitpos=47,reduced-phys-bits=1,policy=0x1", files)
    assert keyval == ("sev-guest,id=lsec0,cbitpos=47,reduced-phys-bits=1,policy=0x1,"
                      "dh-cert-file=/run/sevhook/web,,1/godh.b64,session-file=/run/sevhook/web,,1/session.b64")


def _prepare(tmp_path: Path, source_xml: str, *args: str) -> tuple[subprocess.CompletedProcess[str], str]:
    source = tmp_path / "in.xml"
    source.write_text(source_xml)
    out = tmp_path / "out.xml"
    result = subprocess.run([sys.executable, "-m", "sevhook.cli", "prepare-domain", str(source), "--broker",
                             "http://127.0.0.1:9", "--guest", "vm", "-o", str(out), *args],
                            capture_output=True, text=True, timeout=60)
    return result, out.read_text() if out.exists() else ""


def test_prepare_domain_converts_between_modes_without_hand_editing(tmp_path):
    """emulator (the default, no broker call) -> start -> emulator; a hook-mode domain's monitor and
    session go away in emulator mode."""
    from sevhook.xml import load_domain
    from tests.hook.domains import domain_xml

    hook_mode = domain_xml("web1", socket="/run/sevhook/web1.qmp", godh_b64="", launch_id="L1")
    result, emulator_xml = _prepare(tmp_path, hook_mode, "--qemu", "/opt/qemu/bin/qemu-system-x86_64")
    assert result.returncode == 0, result.stderr
    document = load_domain(emulator_xml.encode())
    assert document.valid, [str(problem) for problem in document.errors]
    attestation = document.domain.attestation
    assert (attestation.mode, attestation.emulator_qemu, attestation.launch_id, attestation.socket) == (
        "emulator", "/opt/qemu/bin/qemu-system-x86_64", None, None)
    assert f"<emulator>{WRAPPER}</emulator>" in emulator_xml
    assert "commandline" not in emulator_xml and "<dhCert>" not in emulator_xml

    result, start_xml = _prepare(tmp_path, emulator_xml, "--mode", "start")
    assert result.returncode == 0, result.stderr
    assert load_domain(start_xml.encode()).domain.attestation.mode == "start"
    assert "<emulator>/opt/qemu/bin/qemu-system-x86_64</emulator>" in start_xml  # the wrapper gave way

    result, again = _prepare(tmp_path, start_xml)
    assert result.returncode == 0, result.stderr
    assert load_domain(again.encode()).domain.attestation.emulator_qemu == "/usr/bin/qemu-system-x86_64"


@pytest.mark.parametrize(("args", "words"), [
    (["--mode", "start", "--qemu", "/usr/bin/qemu"],
     "--qemu /usr/bin/qemu: give an absolute path, with --mode emulator"),
    (["--socket", "/run/x.qmp"], "--socket is for --mode hook only"),
    (["--qemu", "qemu"], "--qemu qemu: give an absolute path"),
])
def test_prepare_domain_mode_errors_are_one_line(tmp_path, args, words):
    from tests.hook.domains import domain_xml

    result, written = _prepare(tmp_path, domain_xml("web1", socket=None, metadata=False), *args)
    assert result.returncode == 2, result.stderr
    assert words in result.stderr and "Traceback" not in result.stderr and written == ""


@pytest.mark.parametrize(("operation", "status"), [("prepare", 0), ("start", 0), ("started", 0), ("release", 0),
                                                   ("migrate", 1), ("restore", 1)])
def test_the_installed_hook_leaves_emulator_mode_guests_to_the_wrapper(tmp_path, operation, status):
    """The hook has no monitor of an emulator-mode guest: it must not refuse or attest its starts, and
    still refuses moving its launch state."""
    from sevhook.hook.install import install
    from tests.hook.domains import domain_xml

    result, emulator_xml = _prepare(tmp_path, domain_xml("web1", socket=None, metadata=False))
    assert result.returncode == 0, result.stderr
    hook = install(tmp_path / "hooks")
    env = {"PATH": "/usr/bin:/bin", "SEVHOOK_HOOK_LOG": str(tmp_path / "hook.log")}
    run = subprocess.run([str(hook), "web1", operation, "begin", "-"], input=emulator_xml, capture_output=True,
                         text=True, timeout=60, env=env)
    assert run.returncode == status, run.stderr
    assert run.stdout == ""
    if status:
        assert run.stderr.startswith(f"sevhook: web1: {operation}: an attested SEV guest cannot be migrated")
