"""The real QEMU child of an interposer, without asyncio: the private 0700 directory its monitor sockets
live in, its command line with libvirt's monitors pointed there, and starting it (it dies with the
interposer: PR_SET_PDEATHSIG). Kept apart from sevhook.interpose.core so that the emulator wrapper can
start QEMU before it imports asyncio, and QEMU's start-up overlaps that import."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from sevhook.sim.argv import MonitorSpec, inherited_fds

PR_SET_PDEATHSIG = 1


def private_monitor_value(spec: MonitorSpec, path: str) -> str:
    """The value of the monitor option that points the real QEMU at its private socket instead."""
    if spec.option == "qmp":
        return f"unix:{path},server=on,wait=off"
    return f"socket,id={spec.chardev_id},path={path},server=on,wait=off"


def set_parent_death_signal() -> None:
    """Runs in the child before exec: die with the interposer even if it is SIGKILLed."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class PrivateMonitors:
    """The private directory of one child and the socket paths in it: one per monitor the caller asked
    for (`paths`, by the option's index in `argv`) and any the interposer adds for itself (`extra`)."""

    def __init__(self, argv: list[str], monitors: list[MonitorSpec], dir_prefix: str) -> None:
        self.argv = argv
        self.monitors = monitors
        self.directory = Path(tempfile.mkdtemp(prefix=dir_prefix, dir=_runtime_dir()))
        self.paths = {spec.option_index: str(self.directory / f"monitor{n}.sock") for n, spec in enumerate(monitors)}
        self.extra: list[str] = []

    def extra_socket(self, name: str) -> str:
        """A private monitor path of the interposer's own (the caller adds the option to the argv)."""
        path = str(self.directory / name)
        self.extra.append(path)
        return path

    def child_argv(self) -> list[str]:
        """The caller's arguments with each monitor pointed at its private socket."""
        argv = list(self.argv)
        for spec in self.monitors:
            argv[spec.option_index] = private_monitor_value(spec, self.paths[spec.option_index])
        return argv

    def spawn(self, binary: str, argv: list[str], *, relay_stderr: bool, daemonize: bool) -> subprocess.Popen[bytes]:
        """Start the child with the caller's inherited fds except the monitors' (those stay with the
        interposer). A daemonized QEMU must not hold the caller's stdio open (libvirt's probe waits for
        EOF on its stderr pipe): its stderr is then relayed by the interposer, like with `relay_stderr`."""
        monitor_fds = {spec.fd for spec in self.monitors if spec.fd is not None}
        keep = sorted(fd for fd in inherited_fds(self.argv) - monitor_fds if _fd_open(fd))
        quiet = subprocess.DEVNULL if daemonize else None
        return subprocess.Popen([binary, *argv], pass_fds=keep, preexec_fn=set_parent_death_signal,  # noqa: PLW1509  (only prctl runs before exec)
                                stdin=quiet, stdout=quiet,
                                stderr=subprocess.PIPE if daemonize or relay_stderr else None)

    def cleanup(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _runtime_dir() -> str | None:
    for candidate in ("/run", "/tmp"):
        if os.access(candidate, os.W_OK):
            return candidate
    return None
