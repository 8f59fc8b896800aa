"""The QEMU stand-in (`sevhook-sim-qemu --sim-standalone`) as a child process: started with a QEMU
command line, considered up once its monitor socket exists, and always stopped within a bound
(SIGTERM, which it answers like QEMU with a SHUTDOWN event, then SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from sevhook.errors import SevhookError

START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0


def standin_command() -> list[str]:
    """The stand-in beside this interpreter (the console script), else the module run by it."""
    script = Path(sys.executable).with_name("sevhook-sim-qemu")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "sevhook.sim.qemu_main"]


class StandIn:
    """One stand-in QEMU process."""

    def __init__(self, argv: Sequence[str], monitor: Path, log: Path, timeout: float = START_TIMEOUT) -> None:
        self.argv = [*standin_command(), *argv]
        self.monitor = monitor
        self.log = log
        with open(log, "wb") as stderr:
            self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=stderr, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not monitor.exists():
            if self.process.poll() is not None:
                raise SevhookError(f"the QEMU stand-in exited with status {self.process.returncode}: "
                                   f"{self.error_text() or 'no message'}")
            if time.monotonic() > deadline:
                self.stop()
                raise SevhookError(f"the QEMU stand-in did not open its monitor {monitor} within {timeout:g} s")
            time.sleep(0.005)

    @property
    def pid(self) -> int:
        return self.process.pid

    def error_text(self) -> str:
        try:
            return " ".join(self.log.read_text(errors="replace").split())[:500]
        except OSError:
            return ""

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """Terminate (QEMU's SIGTERM behaviour), then kill; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        return self.process.returncode
