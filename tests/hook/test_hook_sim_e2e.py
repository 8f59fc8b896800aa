"""End to end without libvirt: the installed hook script attests guests run by the QEMU stand-in
(standalone mode) against a real key broker process on loopback. Each failure must leave the guest
without its secret and not running, with one line on stderr naming the step."""

from __future__ import annotations

import base64
import hashlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sevhook.monitor.qmp import QmpMonitor
from sevhook.sim.world import PASSPHRASE, SimWorld, StandIn, free_port, sevhook, stop

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def world(shared: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimWorld]:
    created = SimWorld.create(tmp_path_factory.mktemp("world"), shared / "vectors/sevctl/OVMF.amdsev.trimmed.fd")
    yield created
    created.close()


@pytest.fixture
def guests() -> Iterator[list[StandIn]]:
    started: list[StandIn] = []
    yield started
    stop(started)


def _status(path: Path) -> str:
    with QmpMonitor(path, timeout=5) as monitor:
        return monitor.status().status


def _passphrases(world: SimWorld, name: str) -> list[bytes]:
    return [base64.b64decode(entry["value_b64"]) for secret in world.secrets(name)
            for entry in secret["table"]]  # type: ignore[union-attr]


def test_attested_start_delivers_the_secret_and_runs(world, run_hook, guests, short_dir, hook_log):
    socket_path = short_dir / "good.qmp"
    prepared = world.prepare("good", socket_path)
    for operation in ("prepare", "start"):  # the calls libvirt makes before QEMU runs
        assert run_hook("good", operation, prepared.read_text()).returncode == 0
    guests.append(world.start_standalone(prepared))
    result = run_hook("good", "started", prepared.read_text())
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert _status(socket_path) == "running"
    assert _passphrases(world, "good") == [PASSPHRASE.encode() + b"\0"]
    log = hook_log.read_text()
    steps = [line.split()[4] for line in log.splitlines() if line.split()[3] == "started"]
    assert steps == ["load", "monitor", "paused-check", "query-sev", "measure", "attest", "inject", "verify",
                     "resume", "total"]
    assert PASSPHRASE not in log and base64.b64encode(PASSPHRASE.encode()).decode()[:12] not in log


def test_an_attestation_imports_neither_cryptography_nor_httpx(world, hook_script, guests, short_dir, hook_log):
    """The attestation's time budget: <dhCert> was checked in full at `prepare`, and the broker client
    is the standard library's (-X importtime lists every module the run imported)."""
    socket_path = short_dir / "lean.qmp"
    prepared = world.prepare("lean", socket_path)
    guests.append(world.start_standalone(prepared))
    python, flags = hook_script.read_text().splitlines()[0][2:].split()
    result = subprocess.run([python, flags, "-X", "importtime", str(hook_script), "lean", "started", "begin", "-"],
                            input=prepared.read_bytes(), capture_output=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "SEVHOOK_HOOK_LOG": str(hook_log)})
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert _status(socket_path) == "running"
    imported = {line.split("|")[-1].strip() for line in result.stderr.decode().splitlines() if "|" in line}
    assert {"sevhook.monitor.qmp", "sevhook.broker.client"} <= imported
    assert not [name for name in imported if name.split(".")[0] in ("cryptography", "httpx", "httpcore")]


def test_changed_firmware_is_refused_and_gets_no_secret(world, run_hook, guests, short_dir):
    socket_path = short_dir / "fw.qmp"
    prepared = world.prepare("fwchanged", socket_path)
    patched = world.root / "OVMF.patched.fd"
    image = bytearray(world.firmware.read_bytes())
    image[0] ^= 0xFF  # one byte changed after the owner registered the firmware
    patched.write_bytes(bytes(image))
    guests.append(world.start_standalone(prepared, firmware=patched))
    result = run_hook("fwchanged", "started", prepared.read_text())
    assert result.returncode == 1
    assert result.stderr.startswith("sevhook: fwchanged: attest: the key broker refused")
    assert len(result.stderr.splitlines()) == 1
    assert world.secrets("fwchanged") == []
    assert _status(socket_path) == "prelaunch"


def test_firmware_without_a_secret_area_gets_no_secret(world, run_hook, guests, short_dir, shared):
    """A stock OVMF (its secret-area entry is empty) would take the secret at guest address 0: the hook
    reads the loader file before injecting and refuses, naming the firmware and the AmdSev build."""
    stock = shared / "vectors/sev-snp-measure/ovmf_OvmfX64_suffix.bin"
    sevhook("broker", "add-guest", "stock", "--digest", hashlib.sha256(stock.read_bytes()).hexdigest(),
            "--policy", "0x1", "--disk-passphrase", str(world.root / "passphrase"),
            "--data-dir", str(world.root / "broker"))
    socket_path = short_dir / "stock.qmp"
    prepared = world.prepare("stock", socket_path, firmware=stock, guest_id="stock")
    guests.append(world.start_standalone(prepared, firmware=stock))
    result = run_hook("stock", "started", prepared.read_text())
    assert result.returncode == 1
    assert result.stderr.startswith("sevhook: stock: inject: ") and "OvmfPkg/AmdSev" in result.stderr
    assert str(stock) in result.stderr
    assert world.secrets("stock") == []
    assert _status(socket_path) != "running"


def test_broker_down(world, run_hook, guests, short_dir):
    socket_path = short_dir / "down.qmp"
    prepared = world.prepare("down", socket_path)
    guests.append(world.start_standalone(prepared))
    closed = f"http://127.0.0.1:{free_port()}"
    result = run_hook("down", "started", prepared.read_text().replace(world.broker_url, closed))
    assert result.returncode == 1
    assert result.stderr.startswith("sevhook: down: attest: ") and "connect" in result.stderr
    assert world.secrets("down") == []
    assert _status(socket_path) == "prelaunch"


def test_broker_slower_than_the_timeout(world, run_hook, guests, short_dir):
    socket_path = short_dir / "slow.qmp"
    prepared = world.prepare("slow", socket_path, timeout=2)
    guests.append(world.start_standalone(prepared))
    with socket.socket() as tarpit:  # accepts the connection, never answers
        tarpit.bind(("127.0.0.1", 0))
        tarpit.listen()
        slow_url = f"http://127.0.0.1:{tarpit.getsockname()[1]}"
        begin = time.monotonic()
        result = run_hook("slow", "started", prepared.read_text().replace(world.broker_url, slow_url))
        elapsed = time.monotonic() - begin
    assert result.returncode == 1
    assert result.stderr.startswith("sevhook: slow: attest: ")
    assert "2 s budget ran out" in result.stderr
    assert elapsed < 8
    assert world.secrets("slow") == []
    assert _status(socket_path) == "prelaunch"


def test_guest_started_unpaused_is_refused_and_stopped(world, run_hook, guests, short_dir):
    socket_path = short_dir / "unpaused.qmp"
    prepared = world.prepare("unpaused", socket_path)
    guests.append(world.start_standalone(prepared, paused=False))
    result = run_hook("unpaused", "started", prepared.read_text())
    assert result.returncode == 1
    assert result.stderr.startswith("sevhook: unpaused: paused-check: ")
    assert "virsh start --paused unpaused" in result.stderr
    assert world.secrets("unpaused") == []
    assert _status(socket_path) != "running"


def test_missing_private_monitor(world, run_hook, guests, short_dir):
    socket_path = short_dir / "nomon.qmp"
    prepared = world.prepare("nomon", socket_path)
    guests.append(world.start_standalone(prepared, monitor=False))
    result = run_hook("nomon", "started", prepared.read_text())
    assert result.returncode == 1
    assert result.stderr.startswith("sevhook: nomon: monitor: cannot connect")
    assert world.secrets("nomon") == []


def test_resume_no_leaves_the_attested_guest_paused(world, run_hook, guests, short_dir):
    socket_path = short_dir / "paused.qmp"
    prepared = world.prepare("paused", socket_path, resume=False)
    guests.append(world.start_standalone(prepared))
    result = run_hook("paused", "started", prepared.read_text())
    assert (result.returncode, result.stderr) == (0, "")
    assert _status(socket_path) == "prelaunch"
    assert _passphrases(world, "paused") == [PASSPHRASE.encode() + b"\0"]


def test_a_launch_is_attested_once(world, run_hook, guests, short_dir):
    """Replaying a prepared domain (same launch) gets a refusal, and no second secret."""
    socket_path = short_dir / "again.qmp"
    prepared = world.prepare("again", socket_path)
    guests.append(world.start_standalone(prepared))
    assert run_hook("again", "started", prepared.read_text()).returncode == 0
    stop(guests)  # killed: its socket stays behind, as after a crash
    guests.clear()
    assert socket_path.exists()
    assert run_hook("again", "start", prepared.read_text()).returncode == 0  # removes the stale socket
    guests.append(world.start_standalone(prepared))
    result = run_hook("again", "started", prepared.read_text())
    assert result.returncode == 1
    assert result.stderr.startswith("sevhook: again: attest: the key broker refused")
    assert world.secrets("again") == []  # the new launch of the stand-in received nothing
    assert _status(socket_path) == "prelaunch"
