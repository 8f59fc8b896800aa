"""`sevhook-sim-qemu`: a stand-in for qemu-system-x86_64 backed by the software SEV platform.

Wrapping mode (the default) runs the real QEMU without its SEV parts and proxies every monitor;
standalone mode (`--sim-standalone` or SEVHOOK_SIM_MODE=standalone) needs no QEMU at all. Extra options,
removed before the real QEMU sees them: --sim-standalone, --sim-qemu-version X.Y.Z (the QMP shapes to
mimic in standalone mode), --sim-state-dir DIR (else $SEVHOOK_SIM_DIR, else /var/lib/sevhook/sim),
--sim-qemu-binary PATH (else $SEVHOOK_SIM_QEMU, else /usr/bin/qemu-system-x86_64)."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sevhook.errors import SevhookError
from sevhook.sim.argv import PROG, QemuInvocation, parse_qemu_argv

if TYPE_CHECKING:
    import socket

    from sevhook.sim.lifecycle import Daemon
    from sevhook.sim.platform import SoftwarePlatform
    from sevhook.sim.qemu_sev import SevLaunch

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
        from sevhook.sim.proxy import run_wrapped  # the wrapper's hot path loads one mode

        return run_wrapped(inv)
    except SevhookError as exc:
        return _error(exc.message)
    except KeyboardInterrupt:
        return 1


def run_standalone(inv: QemuInvocation) -> int:
    from sevhook.sim.lifecycle import run_launched  # the wrapper's hot path loads one mode
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
