"""Helpers and fixtures for the simulator tests: a platform (RSA-2048 roots to keep key generation quick), an
session for it, and stand-in processes with QMP monitors in short private directories."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sevhook.sev.chain import CertificateChain
from sevhook.sev.session import LaunchSession, create_session
from sevhook.sim.platform import SoftwarePlatform, init_platform
from sevhook.sim.state import StateDir

SIM_QEMU = str(Path(sys.executable).with_name("sevhook-sim-qemu"))
REAL_QEMU = "/usr/bin/qemu-system-x86_64"
OVMF = "/usr/share/OVMF/OVMF_CODE_4M.fd"


@pytest.fixture(scope="session")
def sim_state(tmp_path_factory: pytest.TempPathFactory) -> StateDir:
    state = StateDir(tmp_path_factory.mktemp("sim") / "state")
    init_platform(state, rsa_bits=2048)
    return state


@pytest.fixture(scope="session")
def platform(sim_state: StateDir) -> SoftwarePlatform:
    return SoftwarePlatform(sim_state)


def make_session(platform: SoftwarePlatform, policy: int = 0x1) -> LaunchSession:
    chain = CertificateChain.from_full(platform.full_chain())
    return create_session(chain.pdh, policy)


@pytest.fixture()
def short_dir() -> Iterator[Path]:
    """unix socket paths must stay under 108 bytes: pytest's tmp_path can be longer."""
    with tempfile.TemporaryDirectory(prefix="simt-", dir="/tmp") as name:
        yield Path(name)


@dataclass
class StandIn:
    process: subprocess.Popen[bytes]
    sockets: list[str]
    log: Path

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


def sev_object(directory: Path, session: LaunchSession | None, policy: int = 1, json_syntax: bool = True,
               kernel_hashes: bool | None = None) -> str:
    props: dict[str, object] = {"qom-type": "sev-guest", "id": "lsec0", "cbitpos": 51, "reduced-phys-bits": 1,
                                "policy": policy}
    if session is not None:
        paths = session.write_files(directory, "owner")
        props["dh-cert-file"] = str(paths["godh"])
        props["session-file"] = str(paths["session"])
    if kernel_hashes is not None:
        props["kernel-hashes"] = kernel_hashes
    if json_syntax:
        return json.dumps(props, separators=(",", ":"))
    parts = [f"{key}={'on' if value is True else 'off' if value is False else value}"
             for key, value in props.items() if key != "qom-type"]
    return "sev-guest," + ",".join(parts)


def start_stand_in(directory: Path, args: list[str], monitors: int = 1, standalone: bool = True,
                   state: StateDir | None = None, env: dict[str, str] | None = None,
                   wait: bool = True) -> StandIn:
    sockets = [str(directory / f"m{index}.sock") for index in range(monitors)]
    argv = [SIM_QEMU]
    if standalone:
        argv.append("--sim-standalone")
    if state is not None:
        argv += ["--sim-state-dir", str(state.path)]
    for path in sockets:
        argv += ["-qmp", f"unix:{path},server=on,wait=off"]
    argv += args
    log = directory / "stand-in.log"
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(log, "wb"),
                               env={**os.environ, **(env or {})})
    stand_in = StandIn(process, sockets, log)
    if wait:
        deadline = time.monotonic() + 30
        while not all(os.path.exists(path) for path in sockets):
            if process.poll() is not None:
                raise AssertionError(f"the stand-in exited {process.returncode}: {stand_in.stderr()}")
            if time.monotonic() > deadline:
                process.kill()
                raise AssertionError("the stand-in did not open its monitors within 30 s")
            time.sleep(0.01)
    return stand_in


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.fixture()
def stand_ins() -> Iterator[list[StandIn]]:
    """Collects stand-ins started by a test and makes sure none survives it."""
    started: list[StandIn] = []
    yield started
    for stand_in in started:
        stop_process(stand_in.process)


def children_of(pid: int) -> list[int]:
    """Every live process whose parent is pid (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def pid_alive(pid: int) -> bool:
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0] != "Z"
    return False


def run(coroutine):  # a tiny helper for sync tests
    return asyncio.run(asyncio.wait_for(coroutine, 60))
