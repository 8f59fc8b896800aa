"""Wrapping mode with the real QEMU 7.2 behind the stand-in: the SEV commands come from the software
processor, everything else from QEMU; the child never outlives the wrapper."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from sevhook.flow.firmware import demo_firmware
from sevhook.sev.launch_digest import sev_launch_digest
from sevhook.sev.measurement import LaunchMeasurement, verify_measurement
from sevhook.sev.secret import DISK_PASSPHRASE_GUID, SECRET_TABLE_GUID, SecretTable
from sevhook.sev.secret_area import read_secret_area
from sevhook.sim.platform import SoftwarePlatform
from tests.sim.sim_support import OVMF, SIM_QEMU, children_of, make_session, pid_alive, run, sev_object, start_stand_in
from tests.sim.test_sim_standalone import raw_exchange, secret_args, sim_secrets

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(120)]


def guest_args(directory: Path, session, name: str = "wrapped", firmware: Path = OVMF) -> list[str]:
    return ["-name", f"guest={name},debug-threads=on", "-S", "-nodefaults", "-display", "none", "-m", "128",
            "-machine", "q35,accel=kvm,confidential-guest-support=lsec0", "-cpu", "host",
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={firmware}",
            "-object", sev_object(directory, session)]


def wait_gone(pid: int, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while pid_alive(pid):
        assert time.monotonic() < deadline, f"process {pid} is still alive"
        time.sleep(0.02)


def test_owner_flow_through_the_real_qemu(platform: SoftwarePlatform, short_dir: Path, stand_ins) -> None:
    session = make_session(platform)
    stand_in = start_stand_in(short_dir, guest_args(short_dir, session), standalone=False, state=platform.state)
    stand_ins.append(stand_in)

    async def flow() -> None:
        qmp = QMPClient("test")
        await qmp.connect(stand_in.sockets[0])
        try:
            assert (await qmp.execute("query-status"))["status"] == "prelaunch"  # from the real QEMU
            assert (await qmp.execute("query-kvm"))["enabled"] is False  # TCG forced
            schema = await qmp.execute("query-qmp-schema")  # a reply of several hundred KiB is relayed
            assert any(entry.get("name") == "sev-inject-launch-secret" for entry in schema)
            sev = await qmp.execute("query-sev")
            assert sev["enabled"] and sev["state"] == "launch-secret"
            blob = LaunchMeasurement.parse((await qmp.execute("query-sev-launch-measure"))["data"])
            assert verify_measurement(blob, session.tik, sev["api-major"], sev["api-minor"], sev["build-id"], 1,
                                      sev_launch_digest(OVMF))
            await qmp.execute("sev-inject-launch-secret", secret_args(session, blob.measurement))
            with qmp.listener() as events:
                await qmp.execute("cont")
                assert (await asyncio.wait_for(events.get(), 5))["event"] == "RESUME"
            assert (await qmp.execute("query-status"))["status"] == "running"
            assert (await qmp.execute("query-sev"))["state"] == "running"
            await qmp.execute("quit")
        finally:
            with contextlib.suppress(Exception):
                await qmp.disconnect()

    run(flow())
    assert stand_in.process.wait(15) == 0
    assert sim_secrets(platform.state.path, "wrapped")[0]["secrets"][0]["table"][0]["length"] == 8


def test_the_secret_table_lands_in_the_guest_memory_at_the_secret_area(platform: SoftwarePlatform, short_dir: Path,
                                                                       stand_ins) -> None:
    """LAUNCH_SECRET writes the decrypted table into the TCG guest's RAM at the firmware's secret area:
    read back over QMP (pmemsave, answered by the real QEMU), it holds the table header and each secret."""
    firmware = short_dir / "OVMF.amdsev.fd"  # a build with a secret area in its footer table
    firmware.write_bytes(demo_firmware())
    area = read_secret_area(firmware)
    assert area is not None and area.base and area.size
    session = make_session(platform)
    stand_in = start_stand_in(short_dir, guest_args(short_dir, session, "memory", firmware), standalone=False,
                              state=platform.state)
    stand_ins.append(stand_in)
    dump = short_dir / "area.bin"
    value = b"correct horse battery staple\0"

    async def flow() -> None:
        qmp = QMPClient("test")
        await qmp.connect(stand_in.sockets[0])
        try:
            blob = LaunchMeasurement.parse((await qmp.execute("query-sev-launch-measure"))["data"])
            await qmp.execute("sev-inject-launch-secret", secret_args(session, blob.measurement, value))
            await qmp.execute("pmemsave", {"val": area.base, "size": area.size, "filename": str(dump)})
            await qmp.execute("quit")
        finally:
            with contextlib.suppress(Exception):
                await qmp.disconnect()

    run(flow())
    assert stand_in.process.wait(15) == 0
    memory = dump.read_bytes()
    table = SecretTable(((DISK_PASSPHRASE_GUID, value),)).build()
    assert memory[:16] == SECRET_TABLE_GUID.bytes_le
    assert memory[:len(table)] == table
    entry = memory.index(DISK_PASSPHRASE_GUID.bytes_le)
    assert memory[entry + 20:entry + 20 + len(value)] == value
    assert sim_secrets(platform.state.path, "memory")[0]["secrets"][0]["gpa"] == area.base


def test_pipelined_commands_keep_their_order(platform: SoftwarePlatform, short_dir: Path, stand_ins) -> None:
    session = make_session(platform)
    stand_in = start_stand_in(short_dir, guest_args(short_dir, session), standalone=False, state=platform.state)
    stand_ins.append(stand_in)
    lines = [b'{"execute": "qmp_capabilities"}'] + [
        b'{"execute": "query-status", "id": %d}{"execute": "query-sev", "id": %d}' % (2 * i, 2 * i + 1)
        for i in range(5)]
    replies = raw_exchange(stand_in.sockets[0], [b"".join(lines)], 11)
    assert [reply.get("id") for reply in replies[1:]] == list(range(10))
    assert replies[2]["return"]["state"] == "launch-secret" and replies[1]["return"]["status"] == "prelaunch"


def test_killing_the_wrapper_kills_qemu(platform: SoftwarePlatform, short_dir: Path) -> None:
    session = make_session(platform)
    stand_in = start_stand_in(short_dir, guest_args(short_dir, session), standalone=False, state=platform.state)
    deadline = time.monotonic() + 10
    while not children_of(stand_in.process.pid):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    [qemu_pid] = children_of(stand_in.process.pid)
    stand_in.process.kill()
    stand_in.process.wait(10)
    wait_gone(qemu_pid)


def test_sigterm_reaches_qemu_and_its_shutdown_event_the_client(platform: SoftwarePlatform, short_dir: Path) -> None:
    stand_in = start_stand_in(short_dir, ["-S", "-nodefaults", "-display", "none", "-machine", "q35"],
                              standalone=False, state=platform.state)

    async def flow() -> dict:
        qmp = QMPClient("test")
        await qmp.connect(stand_in.sockets[0])
        try:
            with qmp.listener() as events:
                stand_in.process.send_signal(signal.SIGTERM)
                return await asyncio.wait_for(events.get(), 10)
        finally:
            with contextlib.suppress(Exception):
                await qmp.disconnect()

    event = run(flow())
    assert event["event"] == "SHUTDOWN" and event["data"]["reason"] == "host-signal"
    stand_in.process.wait(15)
    assert not os.path.exists(stand_in.sockets[0])


def test_client_leaving_mid_command_and_qemu_exit(platform: SoftwarePlatform, short_dir: Path) -> None:
    stand_in = start_stand_in(short_dir, ["-S", "-nodefaults", "-display", "none", "-machine", "q35"],
                              standalone=False, state=platform.state)
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(stand_in.sockets[0])
            sock.recv(4096)
            sock.sendall(b'{"execute": "qmp_capabilities"}{"execute": "query-qmp-schema"}{"execute": "query-st')
        replies = raw_exchange(stand_in.sockets[0], [b'{"execute": "qmp_capabilities"}', b'{"execute": "quit"}'], 3)
        assert replies[0] == {"return": {}}
        assert stand_in.process.wait(15) == 0
    finally:
        if stand_in.process.poll() is None:
            stand_in.process.kill()
            stand_in.process.wait(10)


def test_qemu_start_failure_is_reported(platform: SoftwarePlatform, short_dir: Path) -> None:
    result = subprocess.run([SIM_QEMU, "--sim-state-dir", str(platform.state.path), "-machine", "q35", "-nodefaults",
                             "-display", "none", "-bios", "/nonexistent/bios.bin", "-qmp",
                             f"unix:{short_dir}/m.sock,server=on,wait=off"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "could not load PC BIOS '/nonexistent/bios.bin'" in result.stderr


def test_qemu_killed_ends_the_wrapper_and_its_clients(platform: SoftwarePlatform, short_dir: Path) -> None:
    session = make_session(platform)
    stand_in = start_stand_in(short_dir, guest_args(short_dir, session, "killed"), standalone=False,
                              state=platform.state)
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(stand_in.sockets[0])
            stream = sock.makefile("rb")
            assert b"QMP" in stream.readline()
            deadline = time.monotonic() + 10
            while not children_of(stand_in.process.pid):
                assert time.monotonic() < deadline
                time.sleep(0.02)
            [qemu_pid] = children_of(stand_in.process.pid)
            os.kill(qemu_pid, signal.SIGKILL)
            assert stream.readline() == b""  # the client sees the monitor close, it does not hang
        assert stand_in.process.wait(15) == 128 + signal.SIGKILL
        assert not os.path.exists(stand_in.sockets[0])
        record = sim_secrets(platform.state.path, "killed")[0]
        assert not record["alive"]
    finally:
        if stand_in.process.poll() is None:
            stand_in.process.kill()
            stand_in.process.wait(10)
