"""The per-domain runtime files the hook manages: the private QMP monitor's socket and its
directory, and the marker with which `sevhook start` tells the hook that it owns a launch.

QEMU creates the socket itself (server=on); the hook prepares the directory before QEMU starts (a
per-domain one under RUNTIME_DIR by default, created 0700; an existing directory is checked, never
changed) and removes what a crashed QEMU left behind. The marker, RUNTIME_DIR/NAME.start, exists only while
`sevhook start` asks libvirt to start NAME; it holds that process's pid and start time, so a marker
left by a killed process (or a pid reused since) is never taken for a live one."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from sevhook.errors import SevhookError
from sevhook.hook.plan import HookFailure

RUNTIME_DIR = Path("/run/sevhook")  # the default monitor socket directory too (prepare-domain)
START_MARKER_SUFFIX = ".start"
MONITOR_SOCKET_NAME = "qmp.sock"
MAX_MARKER_BYTES = 64


def default_monitor_socket(domain_name: str) -> Path:
    """RUNTIME_DIR/NAME/qmp.sock: each guest's monitor in a directory of its own that the hook
    creates (root's, 0700), so no other user can reach or replace the socket."""
    return RUNTIME_DIR / _file_name(domain_name, RUNTIME_DIR) / MONITOR_SOCKET_NAME


def prepare_monitor_directory(socket: Path) -> None:
    """`start`: the socket's directory exists, only the hook's user can write it, and no stale socket
    is left (QEMU would fail to bind, or a hook would talk to a dead one).

    Missing directories are created 0700. An existing one is never changed (a socket path may name
    a shared directory such as /tmp, whose mode is not sevhook's to change): it is refused when
    another user owns it or may write to it, since that user could replace the guest's monitor."""
    directory = socket.parent
    try:
        _create_missing_directories(directory)
        info = directory.lstat()
    except OSError as exc:
        raise HookFailure("runtime-dir", f"cannot create the private monitor directory {directory}: "
                          f"{exc.strerror or exc}") from exc
    problem = _directory_problem(info)
    if problem:
        raise HookFailure("runtime-dir", f"the monitor socket's directory {directory} {problem}: another user could "
                          "replace the guest's monitor socket; keep the socket in a directory only root can write, "
                          f"such as the default {RUNTIME_DIR}/NAME/ (run `sevhook prepare-domain` without --socket), "
                          "and do not loosen or chmod a shared directory for it")
    remove_socket(socket, "runtime-dir")


def _create_missing_directories(directory: Path) -> None:
    """Create `directory` and its missing parents, each 0700 (pathlib gives parents the umask's mode)."""
    missing = []
    while not os.path.lexists(directory) and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass  # created meanwhile by another hook call: checked like any existing directory


def _directory_problem(info: os.stat_result) -> str | None:
    """Why a directory cannot hold a private socket, or None."""
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(info.st_mode):
        return "is not a directory"
    if info.st_uid != os.geteuid():
        return f"is owned by uid {info.st_uid}, not by the hook's user (uid {os.geteuid()})"
    writers = [who for who, bit in (("its group", stat.S_IWGRP), ("others", stat.S_IWOTH)) if info.st_mode & bit]
    if writers:
        return f"is writable by {' and '.join(writers)} (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


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


@dataclass(frozen=True)
class StartMarker:
    """The content of NAME.start: `PID START_TICKS` (START_TICKS: field 22 of /proc/PID/stat, the
    process's start time since boot, which tells a reused pid apart from the process that wrote it)."""

    pid: int
    start_ticks: int

    def to_bytes(self) -> bytes:
        return f"{self.pid} {self.start_ticks}\n".encode("ascii")

    @classmethod
    def parse(cls, data: bytes) -> StartMarker | None:
        """None for anything that is not exactly two positive decimal numbers."""
        fields = data.decode("ascii", errors="replace").split()
        if len(fields) != 2 or not all(field.isdigit() for field in fields):
            return None
        pid, start_ticks = int(fields[0]), int(fields[1])
        return cls(pid, start_ticks) if pid > 0 else None

    @classmethod
    def of_this_process(cls) -> StartMarker:
        pid = os.getpid()
        start_ticks = process_start_ticks(pid)
        if start_ticks is None:
            raise SevhookError(f"cannot read /proc/{pid}/stat: sevhook start needs /proc to mark its launch")
        return cls(pid, start_ticks)

    def is_alive(self) -> bool:
        return process_start_ticks(self.pid) == self.start_ticks


def process_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat_line = handle.read()
    except OSError:
        return None
    fields = stat_line[stat_line.rfind(b")") + 2:].split()  # after "pid (comm) ": comm may hold spaces
    try:
        return int(fields[19])  # field 22 of the whole line
    except (IndexError, ValueError):
        return None


class MarkerState(Enum):
    """What NAME.start says about who drives the domain's launch."""

    ABSENT = "absent"
    LIVE = "live"  # a running `sevhook start` wrote it: that process attests the launch
    STALE = "stale"  # left behind (its process is gone) or unreadable: nobody owns the launch


def start_marker_path(domain_name: str, directory: Path = RUNTIME_DIR) -> Path:
    """RUNTIME_DIR/NAME.start; libvirt forbids '/' in domain names, and sevhook refuses names that
    could leave the directory."""
    return directory / f"{_file_name(domain_name, directory)}{START_MARKER_SUFFIX}"


def _file_name(domain_name: str, directory: Path) -> str:
    """The domain's name, checked to name an entry of `directory` (not '..', no '/')."""
    if not domain_name or "/" in domain_name or domain_name.startswith(".") or "\0" in domain_name:
        raise SevhookError(f"domain name {domain_name!r} cannot name a file in {directory}")
    return domain_name


def start_marker_state(domain_name: str, directory: Path = RUNTIME_DIR) -> MarkerState:
    """LIVE only for a regular file of this user's (the directory is root's, 0700), not a link, whose
    process still runs; anything else is not an owner (fail closed: the hook then refuses)."""
    path = start_marker_path(domain_name, directory)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return MarkerState.ABSENT
    except OSError:
        return MarkerState.STALE
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            return MarkerState.STALE
        marker = StartMarker.parse(os.read(fd, MAX_MARKER_BYTES))
    except OSError:
        return MarkerState.STALE
    finally:
        os.close(fd)
    return MarkerState.LIVE if marker is not None and marker.is_alive() else MarkerState.STALE


def remove_stale_start_marker(domain_name: str, step: str, directory: Path = RUNTIME_DIR) -> None:
    """Remove NAME.start unless a live `sevhook start` holds it (it removes its own)."""
    if start_marker_state(domain_name, directory) is not MarkerState.STALE:
        return
    path = start_marker_path(domain_name, directory)
    try:
        if not stat.S_ISREG(path.lstat().st_mode):
            raise HookFailure(step, f"{path} exists and is not a regular file; remove it")
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise HookFailure(step, f"cannot remove the stale marker {path}: {exc.strerror or exc}") from None


@contextmanager
def start_marker(domain_name: str, directory: Path = RUNTIME_DIR) -> Iterator[Path]:
    """Hold NAME.start (0600, written atomically, in a 0700 directory) for the block: while it
    exists, the hook leaves the domain's launch to this process. Removed on the way out, whatever
    happens, if it is still this process's."""
    path = start_marker_path(domain_name, directory)
    marker = StartMarker.of_this_process()
    from sevhook.files import UnwritableFileError, write_private_file  # only sevhook start

    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private_file(path, marker.to_bytes())
    except (OSError, UnwritableFileError) as exc:
        reason = exc.reason if isinstance(exc, UnwritableFileError) else exc.strerror or exc
        raise SevhookError(f"cannot write {path} ({reason}), the marker that tells sevhook's libvirt hook this "
                           "start is attested by sevhook start: run sevhook start as root") from None
    try:
        yield path
    finally:
        try:
            if StartMarker.parse(path.read_bytes()) == marker:
                path.unlink()
        except OSError:
            pass  # already gone; a stale marker is harmless (its process is dead) and the hook removes it
