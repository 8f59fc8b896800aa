"""`sevhook-sim-qemu --sim-standalone`: a launch driven over QMP (qemu.qmp as the client), the owner's
checks end to end, QEMU's errors, several monitors, signals, daemonizing, and clients that misbehave."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError, QMPClient

from sevhook.sev.cpu_types import cpu_model
from sevhook.sev.launch_digest import sev_launch_digest, seves_launch_digest
from sevhook.sev.measurement import LaunchMeasurement, verify_measurement
from sevhook.sev.secret import DISK_PASSPHRASE_GUID, SecretTable, wrap_secret
from sevhook.sim.platform import SoftwarePlatform
from tests.sim.sim_support import (
    OVMF,
    SIM_QEMU,
    children_of,
    make_session,
    pid_alive,
    run,
    sev_object,
    start_stand_in,
    stop_process,
)

pytestmark = pytest.mark.timeout(120)


def sev_args(directory: Path, session, policy: int = 1, firmware: str = OVMF, json_syntax: bool = True,
             extra: tuple[str, ...] = ()) -> list[str]:
    return ["-name", "guest=g1,debug-threads=on", "-S", "-machine", "q35,confidential-guest-support=lsec0",
            "-object", sev_object(directory, session, policy, json_syntax), "-bios", firmware, *extra]


async def client(path: str) -> QMPClient:
    qmp = QMPClient("test")
    await qmp.connect(path)
    return qmp


async def close(qmp: QMPClient) -> None:
    with contextlib.suppress(Exception):
        await qmp.disconnect()


def secret_args(session, measurement32: bytes, value: bytes = b"hunter2\0", api=(1, 55)) -> dict[str, str]:
    table = SecretTable(((DISK_PASSPHRASE_GUID, value),)).build()
    header, ciphertext = wrap_secret(session.tek, session.tik, measurement32, table, api_major=api[0], api_minor=api[1])
    return {"packet-header": base64.b64encode(header.to_bytes()).decode(),
            "secret": base64.b64encode(ciphertext).decode()}


def sim_secrets(state_path: Path, name: str) -> list[dict]:
    out = subprocess.run([str(Path(sys.executable).with_name("sevhook")), "sim", "secrets", "--state-dir",
                          str(state_path), "--domain", name, "--json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_owner_flow_over_qmp(platform: SoftwarePlatform, short_dir: Path, stand_ins) -> None:
    session = make_session(platform)
    stand_in = start_stand_in(short_dir, sev_args(short_dir, session), state=platform.state)
    stand_ins.append(stand_in)

    async def flow() -> None:
        qmp = await client(stand_in.sockets[0])
        try:
            sev = await qmp.execute("query-sev")
            assert sev["state"] == "launch-secret" and sev["enabled"] and sev["policy"] == 1
            blob = LaunchMeasurement.parse((await qmp.execute("query-sev-launch-measure"))["data"])
            digest = sev_launch_digest(OVMF)
            assert verify_measurement(blob, session.tik, sev["api-major"], sev["api-minor"], sev["build-id"], 1, digest)
            caps = await qmp.execute("query-sev-capabilities")
            assert base64.b64decode(caps["pdh"]) == platform.cert("pdh") and caps["cbitpos"] == 51
            # no gpa: the OVMF footer's secret-area entry gives it
            assert await qmp.execute("sev-inject-launch-secret", secret_args(session, blob.measurement)) == {}
            with qmp.listener() as listener:
                assert await qmp.execute("cont") == {}
                resumed = await asyncio.wait_for(listener.get(), 5)
            assert resumed["event"] == "RESUME" and set(resumed["timestamp"]) == {"seconds", "microseconds"}
            assert (await qmp.execute("query-sev"))["state"] == "running"
            assert (await qmp.execute("query-status"))["status"] == "running"
            with pytest.raises(ExecuteError) as info:
                await qmp.execute("sev-inject-launch-secret", secret_args(session, blob.measurement))
            assert info.value.error.error.class_ == "GenericError"
            assert info.value.error.error.desc == "SEV: Not in correct state. (LSECRET) 3"
            await qmp.execute("quit")
        finally:
            await close(qmp)

    run(flow())
    assert stand_in.process.wait(10) == 0
    assert not os.path.exists(stand_in.sockets[0])
    record = sim_secrets(platform.state.path, "g1")[0]
    assert record["state"] == "running" and not record["alive"]
    [secret] = record["secrets"]
    assert secret["table"] == [{"guid": str(DISK_PASSPHRASE_GUID), "length": 8}]  # values hidden


def test_key_value_syntax_and_inject_errors(platform: SoftwarePlatform, short_dir: Path, stand_ins) -> None:
    session = make_session(platform)
    stand_in = start_stand_in(short_dir, sev_args(short_dir, session, json_syntax=False), state=platform.state)
    stand_ins.append(stand_in)

    async def flow() -> None:
        qmp = await client(stand_in.sockets[0])
        try:
            blob = LaunchMeasurement.parse((await qmp.execute("query-sev-launch-measure"))["data"])
            wrong = secret_args(session, bytes(32))
            header = bytearray(base64.b64decode(wrong["packet-header"]))
            cases = [
                (wrong, "SEV: failed to inject secret ret=-1 fw_error=11 'Bad measurement'"),
                ({"packet-header": "", "secret": "AAAA"}, "SEV: Failed to decode sequence header"),
                ({**wrong, "packet-header": base64.b64encode(bytes(header[:40])).decode()},
                 "SEV: failed to inject secret ret=-1 fw_error=4 'Buffer too small'"),
                ({**secret_args(session, blob.measurement), "gpa": 1 << 40},
                 "SEV: Failed to calculate guest address: No memory is mapped at address 0x10000000000"),
                ({"secret": "AA=="}, "Parameter 'packet-header' is missing"),
                ({**wrong, "gpa": "x"}, "Parameter 'gpa' expects uint64"),
            ]
            for arguments, desc in cases:
                with pytest.raises(ExecuteError) as info:
                    await qmp.execute("sev-inject-launch-secret", arguments)
                assert (info.value.error.error.class_, info.value.error.error.desc) == ("GenericError", desc)
            # two good injections are both accepted (the firmware allows several in LSECRET)
            for value in (b"one\0", b"two\0"):
                await qmp.execute("sev-inject-launch-secret", {**secret_args(session, blob.measurement, value),
                                                               "gpa": 0x100000})
            with pytest.raises(ExecuteError) as info:
                await qmp.execute("query-sev-attestation-report", {"mnonce": "AAAA"})
            assert info.value.error.error.desc == "SEV: mnonce must be 16 bytes (got 3)"
            report = await qmp.execute("query-sev-attestation-report", {"mnonce": base64.b64encode(bytes(16)).decode()})
            assert len(base64.b64decode(report["data"])) == 0xD0
        finally:
            await close(qmp)

    run(flow())
    record = sim_secrets(platform.state.path, "g1")[0]
    assert len(record["secrets"]) == 2


def test_bad_session_stops_the_launch_as_qemu_does(platform: SoftwarePlatform, short_dir: Path) -> None:
    session = make_session(platform, policy=0x3)  # made for another policy than the object's
    stand_in = start_stand_in(short_dir, sev_args(short_dir, session, policy=1), state=platform.state, wait=False)
    assert stand_in.process.wait(30) == 1
    assert "LAUNCH_START ret=-1 fw_error=7 'Policy is not allowed'" in stand_in.stderr()
    assert not os.path.exists(stand_in.sockets[0])


def test_seves_and_kernel_hashes_measure_what_the_owner_computes(platform: SoftwarePlatform, short_dir: Path,
                                                                 shared: Path, stand_ins) -> None:
    vectors = shared / "vectors" / "sevctl"
    firmware = str(vectors / "OVMF.amdsev.trimmed.fd")
    kernel, initrd = str(vectors / "measurement_vmlinuz-fake"), str(vectors / "measurement_initrd-fake")
    session = make_session(platform, policy=0x5)
    obj = sev_object(short_dir, session, 0x5, kernel_hashes=True)
    args = ["-name", "guest=es", "-S", "-machine", "q35,confidential-guest-support=lsec0", "-object", obj,
            "-bios", firmware, "-kernel", kernel, "-initrd", initrd, "-append", "console=ttyS0", "-smp", "2",
            "-cpu", "EPYC-Milan"]
    stand_in = start_stand_in(short_dir, args, state=platform.state)
    stand_ins.append(stand_in)

    async def measure() -> str:
        qmp = await client(stand_in.sockets[0])
        try:
            return (await qmp.execute("query-sev-launch-measure"))["data"]
        finally:
            await close(qmp)

    blob = LaunchMeasurement.parse(run(measure()))
    digest = seves_launch_digest(firmware, 2, cpu_model("EPYC-Milan").signature, kernel, initrd, "console=ttyS0")
    assert verify_measurement(blob, session.tik, 1, 55, 21, 0x5, digest)


def test_query_sev_shape_follows_the_qemu_version(platform: SoftwarePlatform, short_dir: Path, stand_ins) -> None:
    session = make_session(platform)
    stand_in = start_stand_in(short_dir, [*sev_args(short_dir, session), "--sim-qemu-version", "9.1.0"],
                              state=platform.state)
    stand_ins.append(stand_in)

    async def query() -> tuple[dict, dict]:
        qmp = await client(stand_in.sockets[0])
        try:
            return await qmp.execute("query-sev"), await qmp.execute("query-version")
        finally:
            await close(qmp)

    sev, version = run(query())
    assert sev["sev-type"] == "sev" and sev["policy"] == 1 and "handle" in sev
    assert version["qemu"] == {"micro": 0, "minor": 1, "major": 9}


def raw_exchange(path: str, lines: list[bytes], expect: int) -> list[dict]:
    """Send raw inputs and read `expect` replies (after the greeting)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(path)
        stream = sock.makefile("rb")
        json.loads(stream.readline())
        for line in lines:
            sock.sendall(line)
        return [json.loads(stream.readline()) for _ in range(expect)]


def test_every_monitor_kind_serves_and_gets_events(platform: SoftwarePlatform, short_dir: Path, stand_ins) -> None:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(short_dir / "fd.sock"))
    listener.listen(1)
    fd = listener.fileno()
    chardev_path = str(short_dir / "chardev.sock")
    args = ["-S", "-chardev", f"socket,id=c1,path={chardev_path},server=on,wait=off", "-mon", "chardev=c1,mode=control",
            "-chardev", f"socket,id=c2,fd={fd},server=on,wait=off", "-mon", "chardev=c2,mode=control",
            "-chardev", "socket,id=hmp,path=/nonexistent/hmp.sock,server=on,wait=off", "-mon", "chardev=hmp"]
    argv = [SIM_QEMU, "--sim-standalone", "--sim-state-dir", str(platform.state.path), *args]
    process = subprocess.Popen(argv, pass_fds=[fd], stderr=subprocess.PIPE)
    listener.close()
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(chardev_path):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)

        async def flow() -> list[dict]:
            one = await client(chardev_path)
            two = await client(str(short_dir / "fd.sock"))
            try:
                with two.listener() as events:
                    await one.execute("cont")
                    event = await asyncio.wait_for(events.get(), 5)
                return [event, await two.execute("query-status")]
            finally:
                await close(one)
                await close(two)

        event, status = run(flow())
        assert event["event"] == "RESUME" and status["running"]
    finally:
        stop_process(process)


def test_protocol_errors_and_negotiation(platform: SoftwarePlatform, short_dir: Path, stand_ins) -> None:
    stand_in = start_stand_in(short_dir, ["-S"], state=platform.state)
    stand_ins.append(stand_in)
    replies = raw_exchange(stand_in.sockets[0], [
        b'{"execute": "query-status"}', b'{"execute": "qmp_capabilities", "id": 1}',
        b'{"execute": "qmp_capabilities"}', b'{"execute": "nope", "id": "x"}', b"[1]", b'{"id": 3}',
        b'{"execute": "query-status", "arguments": []}', b'{"execute": "stop", "foo": 1}',
        b'{"execute": "query-sev-launch-measure"}', b'{"execute": "sev-inject-launch-secret", '
        b'"arguments": {"packet-header": "AA==", "secret": "AA=="}}', b"garbage\n",
    ], 11)
    assert replies[0]["error"] == {"class": "CommandNotFound",
                                   "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}
    assert replies[1] == {"return": {}, "id": 1}
    assert replies[2]["error"]["class"] == "CommandNotFound"
    assert replies[3] == {"id": "x",
                          "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}
    assert replies[4]["error"]["desc"] == "QMP input must be a JSON object"
    assert replies[5] == {"id": 3, "error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}}
    assert replies[6]["error"]["desc"] == "QMP input member 'arguments' must be an object"
    assert replies[7]["error"]["desc"] == "QMP input member 'foo' is unexpected"
    assert replies[8]["error"]["desc"] == "SEV launch measurement is not available"
    assert replies[9]["error"]["desc"] == "SEV not enabled for guest"
    assert replies[10]["error"]["desc"] == "JSON parse error, invalid keyword 'garbage'"


def test_one_client_at_a_time_and_disconnect_mid_command(platform: SoftwarePlatform, short_dir: Path,
                                                        stand_ins) -> None:
    stand_in = start_stand_in(short_dir, ["-S"], state=platform.state)
    stand_ins.append(stand_in)
    first = socket.socket(socket.AF_UNIX)
    first.settimeout(5)
    first.connect(stand_in.sockets[0])
    assert b"QMP" in first.recv(4096)
    second = socket.socket(socket.AF_UNIX)
    second.settimeout(0.5)
    second.connect(stand_in.sockets[0])
    with pytest.raises(socket.timeout):
        second.recv(4096)  # no greeting while the first client holds the monitor
    first.sendall(b'{"execute": "qmp_capabilities"}{"execute": "query-sta')  # leaves mid-command
    first.close()
    second.settimeout(5)
    assert b"QMP" in second.recv(4096)
    second.close()
    assert raw_exchange(stand_in.sockets[0], [b'{"execute": "qmp_capabilities"}', b'{"execute": "query-status"}'],
                        2)[1]["return"]["status"] == "prelaunch"


def test_sigterm_sends_shutdown_and_exits(platform: SoftwarePlatform, short_dir: Path) -> None:
    stand_in = start_stand_in(short_dir, ["-S"], state=platform.state)

    async def flow() -> dict:
        qmp = await client(stand_in.sockets[0])
        try:
            with qmp.listener() as events:
                stand_in.process.send_signal(signal.SIGTERM)
                return await asyncio.wait_for(events.get(), 5)
        finally:
            await close(qmp)

    event = run(flow())
    assert event["event"] == "SHUTDOWN" and event["data"] == {"guest": False, "reason": "host-signal"}
    assert stand_in.process.wait(10) == 0
    assert not os.path.exists(stand_in.sockets[0])


def test_daemonize_writes_the_pidfile_and_leaves_nothing(platform: SoftwarePlatform, short_dir: Path) -> None:
    pidfile = short_dir / "qmp.pid"
    monitor = str(short_dir / "qmp.monitor")
    argv = [SIM_QEMU, "--sim-standalone", "--sim-state-dir", str(platform.state.path), "-S", "-no-user-config",
            "-nodefaults", "-nographic", "-machine", "none,accel=kvm:tcg", "-qmp",
            f"unix:{monitor},server=on,wait=off", "-pidfile", str(pidfile), "-daemonize"]
    # the probe's parent must return, and must not keep the caller's pipes open
    result = subprocess.run(argv, capture_output=True, timeout=30)
    assert result.returncode == 0
    pid = int(pidfile.read_text())
    assert pid_alive(pid)
    replies = raw_exchange(monitor, [b'{"execute": "qmp_capabilities"}', b'{"execute": "query-sev-capabilities"}',
                                     b'{"execute": "quit"}'], 4)
    assert base64.b64decode(replies[1]["return"]["pdh"]) == platform.cert("pdh")
    deadline = time.monotonic() + 10
    while pid_alive(pid):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert not pidfile.exists() and not os.path.exists(monitor)
    assert not children_of(pid)
