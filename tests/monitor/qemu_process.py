"""Real QEMU 7.2 (TCG, no devices) with a QMP socket: fixtures shared by tests/monitor and tests/hook
(their conftest files import them; run pytest from the project root, as scripts/run test does)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

QEMU = "/usr/bin/qemu-system-x86_64"


def start_qemu(socket: Path, *, paused: bool = True, extra: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    """QEMU with one QMP socket; returns once the socket exists (QEMU creates it before running)."""
    args = [QEMU, "-machine", "q35", "-accel", "tcg", "-nodefaults", "-display", "none", "-m", "64",
            "-qmp", f"unix:{socket},server=on,wait=off", *extra]
    if paused:
        args.append("-S")
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not socket.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            error = process.stderr.read().decode() if process.stderr else ""
            raise RuntimeError(f"QEMU did not create {socket}: {error}")
        time.sleep(0.01)
    return process


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (UNIX socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="sh", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def qemu_factory(short_dir: Path) -> Iterator[Callable[..., tuple[subprocess.Popen[bytes], Path]]]:
    """Start QEMUs on sockets in short_dir; every one is killed at teardown."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(name: str = "vm", paused: bool = True,
              socket: Path | None = None) -> tuple[subprocess.Popen[bytes], Path]:
        path = socket or short_dir / f"{name}.qmp"
        process = start_qemu(path, paused=paused)
        processes.append(process)
        return process, path

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


@pytest.fixture
def qemu(qemu_factory: Callable[..., tuple[subprocess.Popen[bytes], Path]]) -> tuple[subprocess.Popen[bytes], Path]:
    return qemu_factory()
