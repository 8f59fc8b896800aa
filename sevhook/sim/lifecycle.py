"""The life of one simulated QEMU process, shared by standalone and wrapping mode: the SEV launch
before any monitor listens, QEMU's -daemonize/-pidfile, and the cleanup however it ends. Its own module
so that the executable (qemu_main) and the wrapper (proxy) both use it without importing each other."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from sevhook.files import write_private_file
from sevhook.sim.argv import PROG, QemuInvocation
from sevhook.sim.platform import SoftwarePlatform, load_or_init
from sevhook.sim.qemu_sev import LaunchFailed, SevLaunch
from sevhook.sim.qmp_server import listening_socket
from sevhook.sim.state import StateDir

if TYPE_CHECKING:
    import socket



class Daemon:
    """QEMU's -daemonize and -pidfile: the parent returns once the child is serving (monitors bound,
    pidfile written), with the child's status if it failed first."""

    def __init__(self, inv: QemuInvocation) -> None:
        self.inv = inv
        self.pidfile = Path(inv.pidfile).absolute() if inv.pidfile else None
        self._ready_fd: int | None = None

    def detach(self) -> None:
        """Fork when -daemonize: the parent waits for `ready()` and exits; the child continues."""
        if not self.inv.daemonize:
            return
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid:
            os.close(write_fd)
            status = os.read(read_fd, 1)
            os._exit(0 if status == b"1" else 1)
        os.close(read_fd)
        os.setsid()
        self._ready_fd = write_fd

    def ready(self) -> None:
        if self.pidfile is not None:
            write_private_file(self.pidfile, f"{os.getpid()}\n", mode=0o644)
        if self._ready_fd is not None:
            os.write(self._ready_fd, b"1")
            os.close(self._ready_fd)
            self._ready_fd = None
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            os.close(devnull)

    def cleanup(self) -> None:
        if self.pidfile is not None:
            with contextlib.suppress(OSError):
                if self.pidfile.read_text().strip() == str(os.getpid()):
                    self.pidfile.unlink()


def run_launched(
    inv: QemuInvocation,
    serve: Callable[[SoftwarePlatform, SevLaunch | None, list[socket.socket], Daemon], int],
) -> int:
    """What both modes share: the SEV launch happens before any monitor listens (a refused launch is
    QEMU's exit 1), then the monitor sockets are bound, -daemonize forks, and `serve` runs; the
    pidfile and the guest's record are cleaned up however it ends."""
    platform = load_or_init(StateDir(inv.state_dir))
    launch = None
    if inv.sev is not None:
        try:
            launch = SevLaunch.run(platform, inv)
        except LaunchFailed as exc:
            for line in exc.lines:
                print(f"{PROG}: {line}", file=sys.stderr)
            return 1
    try:
        sockets = [listening_socket(spec) for spec in inv.monitors]
        daemon = Daemon(inv)
        daemon.detach()
        if launch is not None:
            launch.guest.recorder.update(pid=os.getpid())
        try:
            return serve(platform, launch, sockets, daemon)
        finally:
            daemon.cleanup()
    finally:
        if launch is not None:
            launch.guest.end()
