"""`sevhook-sim-qemu`: a stand-in for qemu-system-x86_64 backed by the software SEV platform.

Wrapping mode (the default) runs the real QEMU without its SEV parts and proxies every monitor;
standalone mode (`--sim-standalone` or SEVHOOK_SIM_MODE=standalone) needs no QEMU at all. Extra options,
removed before the real QEMU sees them: --sim-standalone, --sim-qemu-version X.Y.Z (the QMP shapes to
mimic in standalone mode), --sim-state-dir DIR (else $SEVHOOK_SIM_DIR, else /var/lib/sevhook/sim),
--sim-qemu-binary PATH (else $SEVHOOK_SIM_QEMU, else /usr/bin/qemu-system-x86_64)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sevhook.errors import SevhookError
from sevhook.sim.argv import QemuInvocation, parse_qemu_argv

if TYPE_CHECKING:
    import socket

    from sevhook.sim.platform import SoftwarePlatform
    from sevhook.sim.qemu_sev import SevLaunch

PROG = "qemu-system-x86_64"
MODE_ENV = "SEVHOOK_SIM_MODE"
SIM_HELP = """sevhook-sim-qemu: qemu-system-x86_64 backed by sevhook's software SEV platform.
Its own options (removed before the real QEMU sees the rest):
  --sim-state-dir DIR        the platform's state (default $SEVHOOK_SIM_DIR, else /var/lib/sevhook/sim)
  --sim-qemu-binary PATH     the real QEMU to wrap (default $SEVHOOK_SIM_QEMU, else /usr/bin/qemu-system-x86_64)
  --sim-standalone           answer QMP alone, without a real QEMU (also $SEVHOOK_SIM_MODE=standalone)
  --sim-qemu-version X.Y.Z   the QEMU version whose QMP shapes standalone mode mimics
Every other option is the real QEMU's (docs/sim.md); its help follows.
"""


def _error(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["-h"], ["-help"], ["--help"]):
        print(SIM_HELP, flush=True)
    try:
        inv = parse_qemu_argv(args)
    except SevhookError as exc:
        return _error(exc.message)
    standalone = inv.standalone or os.environ.get(MODE_ENV, "").lower() == "standalone"
    try:
        if standalone:
            return run_standalone(inv)
        from sevhook.sim.proxy import run_wrapped

        return run_wrapped(inv)
    except SevhookError as exc:
        return _error(exc.message)
    except KeyboardInterrupt:
        return 1


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
            from sevhook.files import write_private_file

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
    from sevhook.sim.platform import load_or_init
    from sevhook.sim.qemu_sev import LaunchFailed, SevLaunch
    from sevhook.sim.qmp_server import listening_socket
    from sevhook.sim.state import StateDir

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


def run_standalone(inv: QemuInvocation) -> int:
    from sevhook.sim.qemu_sev import qemu_version_tuple
    from sevhook.sim.standalone import StandaloneQemu

    version = qemu_version_tuple(inv.qemu_version)
    if inv.wants_help:
        print(f"QEMU emulator version {'.'.join(map(str, version))} (sevhook-sim standalone)")
        return 0

    def serve(platform: SoftwarePlatform, launch: SevLaunch | None, sockets: list[socket.socket],
              daemon: Daemon) -> int:
        daemon.ready()
        return asyncio.run(StandaloneQemu(inv, platform, launch, version).serve(sockets))

    return run_launched(inv, serve)


if __name__ == "__main__":
    sys.exit(main())
