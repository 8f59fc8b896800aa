"""Start mode (metadata without <sevhook:monitor>): `sevhook start` attests the guest through
libvirt, so the hook steps aside while a live `sevhook start` holds the domain's marker and refuses
every other start. The decision (pure), the marker file, and the installed script driven as libvirtd
drives it, against the real runtime directory."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator

import pytest

from sevhook.errors import SevhookError
from sevhook.hook import plan
from sevhook.hook.plan import Action
from sevhook.hook.runtime import (
    RUNTIME_DIR,
    MarkerState,
    StartMarker,
    process_start_ticks,
    remove_stale_start_marker,
    start_marker,
    start_marker_path,
    start_marker_state,
)
from tests.hook.domains import domain_xml

OPERATIONS = ["prepare", "start", "started", "stopped", "release", "migrate", "restore", "reconnect"]


@pytest.mark.parametrize("operation", OPERATIONS)
def test_a_live_sevhook_start_owns_every_operation(operation):
    assert plan.start_mode_action(plan.action_for(operation), True) is Action.NOTHING


@pytest.mark.parametrize(
    ("operation", "action"),
    [("prepare", Action.REFUSE_START_MODE), ("start", Action.REFUSE_START_MODE),
     ("started", Action.REFUSE_START_MODE), ("stopped", Action.REMOVE_STALE_MARKER),
     ("release", Action.REMOVE_STALE_MARKER), ("migrate", Action.REFUSE_MOVE), ("restore", Action.REFUSE_MOVE),
     ("reconnect", Action.NOTHING)],
)
def test_without_an_owner_a_start_mode_guest_is_refused_and_cleaned_up(operation, action):
    assert plan.start_mode_action(plan.action_for(operation), False) is action


def test_the_refusal_says_how_to_start_it():
    failure = plan.start_mode_refusal("web1")
    assert failure.step == "metadata"
    assert "`sevhook start web1`" in failure.reason and "<sevhook:monitor>" in failure.reason
    assert "`sevhook prepare-domain`" in failure.reason and "\n" not in failure.reason


def test_marker_round_trip_and_garbage():
    marker = StartMarker(4242, 987654)
    assert StartMarker.parse(marker.to_bytes()) == marker
    for garbage in (b"", b"12", b"0 5", b"-1 5", b"1 2 3", b"x 1", b"\xff\xfe", b"1 5\n\n junk"):
        assert StartMarker.parse(garbage) is None


def test_marker_is_live_only_while_held_by_a_running_process(tmp_path):
    assert start_marker_state("g", tmp_path) is MarkerState.ABSENT
    with start_marker("g", tmp_path) as path:
        assert path == start_marker_path("g", tmp_path) == tmp_path / "g.start"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert StartMarker.parse(path.read_bytes()) == StartMarker(os.getpid(), process_start_ticks(os.getpid()))
        assert start_marker_state("g", tmp_path) is MarkerState.LIVE
        remove_stale_start_marker("g", "clean-up", tmp_path)  # a live marker is not touched
        assert path.exists()
    assert start_marker_state("g", tmp_path) is MarkerState.ABSENT
    assert list(tmp_path.iterdir()) == []


def test_marker_is_removed_even_when_the_start_fails(tmp_path):
    with pytest.raises(RuntimeError), start_marker("g", tmp_path):
        raise RuntimeError("libvirt refused")
    assert not (tmp_path / "g.start").exists()


def test_dead_or_reused_pids_and_odd_files_are_not_owners(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    marker = start_marker_path("g", tmp_path)
    marker.write_bytes(StartMarker(int(finished.stdout), 1).to_bytes())
    assert start_marker_state("g", tmp_path) is MarkerState.STALE
    marker.write_bytes(StartMarker(os.getpid(), process_start_ticks(os.getpid()) + 1).to_bytes())  # pid reused
    assert start_marker_state("g", tmp_path) is MarkerState.STALE
    marker.write_text("not a marker")
    assert start_marker_state("g", tmp_path) is MarkerState.STALE
    remove_stale_start_marker("g", "clean-up", tmp_path)
    assert not marker.exists()
    real = tmp_path / "elsewhere"
    real.write_bytes(StartMarker(os.getpid(), process_start_ticks(os.getpid())).to_bytes())
    marker.symlink_to(real)  # a link to a live marker is still not a marker
    assert start_marker_state("g", tmp_path) is MarkerState.STALE


@pytest.mark.parametrize("name", ["", "../etc/passwd", "a/b", ".hidden"])
def test_names_that_leave_the_directory_are_refused(name, tmp_path):
    with pytest.raises(SevhookError):
        start_marker_path(name, tmp_path)


# The installed script, as libvirtd runs it, with the real runtime directory (the hook's is fixed).

def _start_mode_xml(name: str) -> str:
    return domain_xml(name, socket=None, declare_monitor=False, launch_id=None)


@pytest.fixture
def name() -> Iterator[str]:
    marker = start_marker_path(f"shk-startmode-{os.getpid()}")
    yield marker.name.removesuffix(".start")
    marker.unlink(missing_ok=True)


@pytest.mark.parametrize("operation", ["prepare", "start", "started"])
def test_the_hook_refuses_a_start_mode_guest_nobody_attests(run_hook, name, operation):
    result = run_hook(name, operation, _start_mode_xml(name))
    assert result.returncode == 1
    assert result.stderr.strip() == (f"sevhook: {name}: metadata: this guest is attested by `sevhook start` (its "
                                     f"metadata declares no <sevhook:monitor>): start it with `sevhook start {name}`"
                                     ", or run `sevhook prepare-domain` so the hook can attest it")
    assert result.stdout == ""


def test_the_hook_steps_aside_while_sevhook_start_holds_the_marker(run_hook, name, hook_log):
    xml = _start_mode_xml(name)
    with start_marker(name) as marker:
        assert RUNTIME_DIR in marker.parents
        for operation in OPERATIONS:
            result = run_hook(name, operation, xml)
            assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), operation
        assert marker.exists()
    assert run_hook(name, "prepare", xml).returncode == 1  # released: refused again
    assert f"{name} started owner ok" in hook_log.read_text()


def test_stopped_and_release_remove_a_stale_marker(run_hook, name):
    xml = _start_mode_xml(name)
    marker = start_marker_path(name)
    marker.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    marker.write_bytes(StartMarker(os.getpid(), 1).to_bytes())  # this pid, another start time: stale
    assert run_hook(name, "prepare", xml).returncode == 1
    assert not marker.exists()  # the refusal cleared it
    marker.write_bytes(StartMarker(os.getpid(), 1).to_bytes())
    for operation in ("stopped", "release"):
        result = run_hook(name, operation, xml, subop="end")
        assert result.returncode == 0, result.stderr
        assert not marker.exists()
