"""The hook's runtime files: the private monitor socket's directory is created private or checked,
never changed, and a directory another user owns or may write is refused with a clear reason."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from sevhook.hook import runtime
from sevhook.hook.plan import HookFailure
from tests.hook.domains import domain_xml

NOBODY = 65534


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _listening_socket(path: Path) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    return server


def test_missing_directories_are_created_private(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        runtime.prepare_monitor_directory(tmp_path / "run" / "sevhook" / "g" / "qmp.sock")
    finally:
        os.umask(old)
    for directory in (tmp_path / "run", tmp_path / "run" / "sevhook", tmp_path / "run" / "sevhook" / "g"):
        assert _mode(directory) == 0o700


def test_a_shared_directory_is_refused_and_left_alone(tmp_path: Path) -> None:
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(HookFailure) as failure:
        runtime.prepare_monitor_directory(shared / "g.qmp")
    assert failure.value.step == "runtime-dir"
    assert failure.value.reason.startswith(f"the monitor socket's directory {shared} is writable by its group and "
                                           "others (mode 1777): another user could replace")
    assert "/run/sevhook/NAME/" in failure.value.reason
    assert _mode(shared) == 0o1777  # never chmodded


def test_a_group_writable_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir(mode=0o770)
    (tmp_path / "d").chmod(0o770)
    with pytest.raises(HookFailure, match=r"is writable by its group \(mode 0770\)"):
        runtime.prepare_monitor_directory(tmp_path / "d" / "g.qmp")
    assert _mode(tmp_path / "d") == 0o770


def test_an_existing_private_enough_directory_keeps_its_mode(tmp_path: Path) -> None:
    directory = tmp_path / "sockets"
    directory.mkdir()
    directory.chmod(0o755)
    runtime.prepare_monitor_directory(directory / "g.qmp")
    assert _mode(directory) == 0o755  # root's and not writable by others: used as it is


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "theirs"
    directory.mkdir(mode=0o700)
    os.chown(directory, NOBODY, NOBODY)
    with pytest.raises(HookFailure, match=rf"{directory} is owned by uid {NOBODY}, not by the hook's user"):
        runtime.prepare_monitor_directory(directory / "g.qmp")


def test_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(HookFailure, match="is a symbolic link"):
        runtime.prepare_monitor_directory(tmp_path / "link" / "g.qmp")


def test_a_stale_socket_is_removed_and_anything_else_refused(tmp_path: Path) -> None:
    stale = tmp_path / "g.qmp"
    with _listening_socket(stale):
        pass
    runtime.prepare_monitor_directory(stale)
    assert not stale.exists()
    stale.write_text("not a socket")
    with pytest.raises(HookFailure, match="exists and is not a socket"):
        runtime.prepare_monitor_directory(stale)


def test_the_default_socket_has_a_directory_of_its_own() -> None:
    assert runtime.default_monitor_socket("web1") == Path("/run/sevhook/web1/qmp.sock")
    with pytest.raises(Exception, match="cannot name a file"):
        runtime.default_monitor_socket("../etc")


def test_the_hook_refuses_a_socket_in_a_shared_directory(run_hook, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    result = run_hook("g", "start", domain_xml("g", socket=str(shared / "g.qmp")))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"sevhook: g: runtime-dir: the monitor socket's directory {shared} is writable by its group and others "
        "(mode 1777): another user could replace the guest's monitor socket; keep the socket in a directory only "
        "root can write, such as the default /run/sevhook/NAME/ (run `sevhook prepare-domain` without --socket), "
        "and do not loosen or chmod a shared directory for it"]
    assert _mode(shared) == 0o1777
