"""Asking an emulator binary for its SEV platform the way libvirt probes it: started with `-S
-machine none` and a QMP socket in a private directory, asked query-sev-capabilities, and always
stopped again (by its own pid). `sevhook platform export --emulator` and `sevhook doctor --emulator`
use it; with the software platform's stand-in this is how its PDH and chain are read."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from sevhook.errors import SevhookError
from sevhook.monitor.errors import MonitorError
from sevhook.monitor.qmp import QmpMonitor
from sevhook.monitor.types import SevCapabilities

PROBE_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def probe_capabilities(emulator: Path, timeout: float = PROBE_TIMEOUT) -> SevCapabilities:
    """query-sev-capabilities of a fresh `emulator` process; MonitorError says why not, in a few words
    the caller prefixes with the emulator's name."""
    if not (emulator.is_file() and os.access(emulator, os.X_OK)):
        raise MonitorError("not an executable file")
    directory = Path(tempfile.mkdtemp(prefix="sevhook-probe-"))
    socket, errors = directory / "probe.qmp", directory / "stderr"
    try:
        with errors.open("wb") as stderr:  # a file, not a pipe: a chatty emulator can never block on it
            process = subprocess.Popen(
                [str(emulator), "-S", "-no-user-config", "-nodefaults", "-nographic", "-machine",
                 "none,accel=kvm:tcg", "-qmp", f"unix:{socket},server=on,wait=off"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
    except OSError as exc:
        shutil.rmtree(directory, ignore_errors=True)
        raise MonitorError(f"cannot run it ({exc.strerror})") from exc
    try:
        deadline = time.monotonic() + timeout
        while not socket.exists():
            if process.poll() is not None:
                lines = errors.read_text(errors="replace").strip().splitlines()
                raise MonitorError(f"exited with status {process.returncode}" + (f": {lines[-1]}" if lines else ""))
            if time.monotonic() > deadline:
                raise MonitorError(f"no QMP socket within {timeout:g} s")
            time.sleep(0.05)
        try:
            with QmpMonitor(socket, timeout=max(1.0, deadline - time.monotonic())) as monitor:
                return monitor.capabilities()
        except SevhookError as exc:
            raise MonitorError(f"query-sev-capabilities: {exc.message}") from exc
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT)
        shutil.rmtree(directory, ignore_errors=True)
