"""The hook's fail-closed plumbing against real QEMU 7.2 (TCG, no SEV on this machine): the
private monitor, paused detection, refusing to attest a guest that is not encrypted, the runtime
directory and clean-up, bounded waits, and the step log."""

from __future__ import annotations

import os
import socket
import stat
import time
from pathlib import Path

import pytest

from sevhook.monitor.qmp import QmpMonitor
from tests.hook.domains import domain_xml

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(90)]


@pytest.fixture
def managed(session_blobs, short_dir):
    godh, session = session_blobs

    def make(name: str = "g1", **options: object) -> tuple[str, Path]:
        path = short_dir / "run" / f"{name}.qmp"
        return domain_xml(name, socket=str(path), godh_b64=godh, session_b64=session, **options), path

    return make


def test_prepare_accepts_a_prepared_domain(run_hook, managed):
    xml, _socket = managed()
    result = run_hook("g1", "prepare", xml)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_prepare_refuses_a_domain_that_cannot_be_attested(run_hook, short_dir):
    xml = domain_xml("g1", socket=str(short_dir / "g1.qmp"), launch_id=None)  # no dhCert/session, no launch
    result = run_hook("g1", "prepare", xml)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and all(line.startswith("sevhook: g1: validate: ") for line in lines)
    assert "<dhCert>/<session>" in lines[0] and "launch=" in lines[1]


def test_start_makes_a_private_directory_and_removes_a_stale_socket(run_hook, managed):
    xml, path = managed()
    result = run_hook("g1", "start", xml)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    assert path.exists()
    assert run_hook("g1", "start", xml).returncode == 0
    assert not path.exists()


def test_start_will_not_delete_a_file_that_is_not_a_socket(run_hook, managed):
    xml, path = managed()
    path.parent.mkdir(mode=0o700)
    path.write_text("precious")
    result = run_hook("g1", "start", xml)
    assert result.returncode == 1
    assert "is not a socket" in result.stderr and path.read_text() == "precious"


def test_started_refuses_to_attest_a_guest_that_is_not_encrypted(run_hook, managed, qemu_factory, hook_log):
    xml, path = managed()
    path.parent.mkdir(mode=0o700)
    _process, _socket = qemu_factory(socket=path)
    result = run_hook("g1", "started", xml)
    assert result.returncode == 1
    assert result.stderr.startswith("sevhook: g1: query-sev: QEMU reports SEV is not enabled")
    assert "refusing to attest" in result.stderr and len(result.stderr.splitlines()) == 1
    with QmpMonitor(path, timeout=5) as monitor:  # the hook let go of the monitor; the guest never ran
        assert monitor.status().status == "prelaunch"
    log = hook_log.read_text().splitlines()
    assert [line.split()[4:6] for line in log] == [["load", "ok"], ["monitor", "ok"], ["paused-check", "ok"],
                                                    ["query-sev", "failed"], ["total", "failed"]]
    assert all(line.split()[2:4] == ["g1", "started"] for line in log)
    assert all(line.split()[6].endswith("ms") for line in log)


def test_started_detects_a_guest_started_running_and_stops_it(run_hook, managed, qemu_factory):
    xml, path = managed()
    path.parent.mkdir(mode=0o700)
    _process, _socket = qemu_factory(socket=path, paused=False)
    result = run_hook("g1", "started", xml)
    assert result.returncode == 1
    assert result.stderr.startswith("sevhook: g1: paused-check: the guest was started running")
    assert "virsh start --paused g1" in result.stderr and "sevhook start" not in result.stderr
    with QmpMonitor(path, timeout=5) as monitor:
        assert not monitor.status().running  # never left running without a verdict


def test_started_without_the_private_monitor_names_the_fix(run_hook, managed):
    xml, path = managed(declare_monitor=False)
    result = run_hook("g1", "started", xml)
    assert result.returncode == 1
    assert result.stderr.startswith(f"sevhook: g1: monitor: cannot connect to the QEMU monitor {path}")
    assert "<qemu:commandline>" in result.stderr and "prepare-domain" in result.stderr


def test_started_gives_up_on_a_monitor_that_never_answers(run_hook, managed):
    xml, path = managed(timeout=1)
    path.parent.mkdir(mode=0o700)
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(str(path))
    silent.listen()
    try:
        begin = time.monotonic()
        result = run_hook("g1", "started", xml, timeout=30)
        assert time.monotonic() - begin < 10
    finally:
        silent.close()
    assert result.returncode == 1
    assert result.stderr.startswith("sevhook: g1: monitor: QEMU monitor") and "within" in result.stderr


def test_stopped_and_release_remove_the_socket(run_hook, managed):
    xml, path = managed()
    for operation in ("stopped", "release"):
        path.parent.mkdir(mode=0o700, exist_ok=True)
        leftover = socket.socket(socket.AF_UNIX)
        leftover.bind(str(path))
        leftover.close()
        result = run_hook("g1", operation, xml, subop="end")
        assert (result.returncode, result.stderr) == (0, "")
        assert not path.exists()
    assert run_hook("g1", "release", xml, subop="end").returncode == 0  # nothing left: still fine


def test_log_falls_back_when_the_file_cannot_be_written(run_hook, managed, tmp_path):
    xml, _path = managed()
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    result = run_hook("g1", "prepare", xml, env={"SEVHOOK_HOOK_LOG": str(blocker / "hook.log")})
    assert (result.returncode, result.stderr) == (0, "")
    assert os.path.isfile(blocker)
