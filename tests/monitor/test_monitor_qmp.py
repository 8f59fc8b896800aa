"""The QMP monitor API against real QEMU 7.2 (TCG): run states and events, error mapping of the
SEV commands QEMU refuses without SEV, and bounded waits on sockets that never answer."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest

from sevhook.monitor.errors import MonitorError, MonitorTimeout, MonitorUnavailable
from sevhook.monitor.qmp import AsyncQmpMonitor, QmpMonitor

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(60)]


def test_status_is_prelaunch_then_cont_runs_the_guest(qemu):
    _process, path = qemu
    with QmpMonitor(path, timeout=5) as monitor:
        assert monitor.qemu_version is not None and monitor.qemu_version[0] >= 7
        before = monitor.status()
        assert (before.status, before.running) == ("prelaunch", False)
        monitor.cont()
        assert monitor.status().running
        monitor.stop()
        assert monitor.status().status == "paused"


def test_query_sev_parses_the_flat_shape_of_qemu_7(qemu):
    _process, path = qemu
    with QmpMonitor(path, timeout=5) as monitor:
        info = monitor.query_sev()
    assert info.enabled is False
    assert info.sev_type == "sev" and info.state == "uninit" and info.policy == 0


@pytest.mark.parametrize(
    ("call", "command", "desc"),
    [
        (lambda m: m.launch_measurement(), "query-sev-launch-measure", "SEV launch measurement is not available"),
        (lambda m: m.capabilities(), "query-sev-capabilities", "KVM not enabled"),
        (lambda m: m.inject_secret("AAAA", "AAAA"), "sev-inject-launch-secret", "SEV not enabled for guest"),
        (lambda m: m.attestation_report(bytes(16)), "query-sev-attestation-report", "SEV is not enabled"),
    ],
)
def test_sev_commands_without_sev_map_to_monitor_errors(qemu, call, command, desc):
    _process, path = qemu
    with QmpMonitor(path, timeout=5) as monitor:
        with pytest.raises(MonitorError) as caught:
            call(monitor)
        assert monitor.status().status == "prelaunch"  # the session survives a refused command
    error = caught.value
    assert type(error) is MonitorError
    assert (error.command, error.qmp_class, error.desc) == (command, "GenericError", desc)
    assert command in error.message and desc in error.message


def test_unknown_command_keeps_its_qmp_class(qemu):
    _process, path = qemu
    with QmpMonitor(path, timeout=5) as monitor, pytest.raises(MonitorError) as caught:
        monitor.execute("no-such-command")
    assert caught.value.qmp_class == "CommandNotFound"


def test_bad_mnonce_is_refused_before_qemu_is_asked(qemu):
    _process, path = qemu
    with QmpMonitor(path, timeout=5) as monitor, pytest.raises(MonitorError, match="16 bytes"):
        monitor.attestation_report(b"short")


def test_missing_socket_is_unavailable(short_dir):
    with pytest.raises(MonitorUnavailable, match="No such file or directory"):
        QmpMonitor(short_dir / "none.qmp", timeout=2)


def test_stale_socket_is_unavailable(short_dir):
    path = short_dir / "stale.qmp"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.close()  # the file stays, nobody listens
    with pytest.raises(MonitorUnavailable, match="refused"):
        QmpMonitor(path, timeout=2)


def test_socket_that_never_greets_times_out(short_dir):
    path = short_dir / "silent.qmp"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()
    try:
        begin = time.monotonic()
        with pytest.raises(MonitorTimeout, match=r"within 0.5 s"):
            QmpMonitor(path, timeout=0.5)
        assert time.monotonic() - begin < 3
    finally:
        server.close()


def test_command_without_answer_times_out(short_dir):
    """A server that greets and negotiates, then never answers: the command's deadline holds."""
    path = short_dir / "mute.qmp"

    async def mute_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},'
                     b' "capabilities": []}}\r\n')
        await writer.drain()
        request = json.loads(await reader.read(65536))  # qmp_capabilities (qemu.qmp sends no newline)
        writer.write(json.dumps({"return": {}, "id": request.get("id")}).encode() + b"\r\n")
        await writer.drain()
        await reader.read()  # then silence

    async def scenario() -> None:
        server = await asyncio.start_unix_server(mute_server, path=str(path))
        async with server:
            monitor = await AsyncQmpMonitor.open(path, timeout=0.3)
            try:
                with pytest.raises(MonitorTimeout) as caught:
                    await monitor.status()
                assert caught.value.command == "query-status"
            finally:
                await monitor.close()

    asyncio.run(scenario())


def test_qemu_exiting_mid_session_is_unavailable(qemu):
    process, path = qemu
    with QmpMonitor(path, timeout=5) as monitor:
        process.kill()
        process.wait(timeout=10)
        with pytest.raises(MonitorUnavailable):
            monitor.status()


def test_cont_on_a_running_guest_returns_at_once(qemu_factory):
    _process, path = qemu_factory(paused=False)
    with QmpMonitor(path, timeout=5) as monitor:
        begin = time.monotonic()
        monitor.cont()
        assert time.monotonic() - begin < 1
        assert monitor.status().running
