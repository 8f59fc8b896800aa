"""The per-domain runtime files the hook manages: the private QMP monitor's socket and its
directory. QEMU creates the socket itself (server=on); the hook prepares the directory before QEMU
starts and removes what a crashed QEMU left behind."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sevhook.hook.plan import HookFailure


def prepare_monitor_directory(socket: Path) -> None:
    """`start`: the socket's directory exists and is private (0700), and no stale socket is left
    (QEMU would fail to bind, or a hook would talk to a dead one)."""
    directory = socket.parent
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.stat()
        if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) != 0o700:
            directory.chmod(0o700)
    except OSError as exc:
        raise HookFailure("runtime-dir", f"cannot create the private monitor directory {directory}: "
                          f"{exc.strerror or exc}") from None
    remove_socket(socket, "runtime-dir")


def remove_socket(socket: Path, step: str) -> None:
    """Remove the domain's socket if one is there; refuse to delete anything that is not a socket."""
    try:
        info = socket.lstat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise HookFailure(step, f"cannot inspect {socket}: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(info.st_mode):
        raise HookFailure(step, f"{socket} exists and is not a socket; remove it or choose another "
                          "<sevhook:monitor socket=...>")
    try:
        socket.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise HookFailure(step, f"cannot remove the stale socket {socket}: {exc.strerror or exc}") from None
