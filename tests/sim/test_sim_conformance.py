"""The same script of common QMP commands against real QEMU 7.2 and the standalone stand-in: replies must
have the same shapes, the same error classes and descriptions, and the same events in the same order."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from sevhook.sim.platform import SoftwarePlatform
from tests.sim.sim_support import REAL_QEMU, SIM_QEMU, stop_process

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(120)]

COMMON = ["-machine", "q35", "-accel", "tcg", "-nodefaults", "-display", "none", "-S"]
SCRIPT = [
    b'{"execute": "query-status"}',
    b'{"execute": "qmp_capabilities", "id": 1}',
    b'{"execute": "qmp_capabilities", "id": 2}',
    b'{"execute": "query-version"}',
    b'{"execute": "query-status", "id": "s"}',
    b'{"execute": "no-such-command", "id": 4}',
    b"[1, 2]",
    b'{"id": 5}',
    b'{"execute": 7}',
    b'{"execute": "query-status", "arguments": []}',
    b'{"execute": "query-status", "bogus": 1}',
    b'{"execute": "query-status", "arguments": {"x": 1}}',
    b'{"execute": "query-name"}',
    b'{"execute": "query-uuid"}',
    b'{"execute": "query-kvm"}',
    b'{"execute": "query-cpus-fast"}',
    b'{"execute": "query-sev"}',
    b'{"execute": "query-sev-launch-measure"}',
    b'{"execute": "sev-inject-launch-secret", "arguments": {"packet-header": "AA==", "secret": "AA=="}}',
    b'{"execute": "sev-inject-launch-secret", "arguments": {"secret": "AA=="}}',
    b'{"execute": "sev-inject-launch-secret", "arguments": {"packet-header": 1, "secret": "AA=="}}',
    b'{"execute": "sev-inject-launch-secret", "arguments": {"packet-header": "a", "secret": "b", "gpa": "x"}}',
    b'{"execute": "query-sev-attestation-report", "arguments": {}}',
    b'{"execute": "query-sev-attestation-report", "arguments": {"mnonce": "AA=="}}',
    b'{"execute": "stop"}',
    b'{"execute": "cont", "id": "c"}',
    b'{"execute": "cont"}',
    b'{"execute": "stop"}',
    b'{"execute": "stop"}',
    b"nonsense",
    b'{"execute": "quit"}',
]


def shape(value: object) -> object:
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


def normalise(message: dict) -> object:
    """Errors and events compare exactly (timestamps by shape); results by shape."""
    if "event" in message:
        return {"event": message["event"], "data": message.get("data"), "timestamp": shape(message["timestamp"])}
    if "error" in message:
        return {"id": message.get("id"), "error": message["error"]}
    return {"id": message.get("id"), "return": shape(message["return"])}


def run_script(argv: list[str], directory: Path) -> tuple[dict, list[list[object]]]:
    path = str(directory / "qmp.sock")
    process = subprocess.Popen([*argv, *COMMON, "-qmp", f"unix:{path},server=on,wait=off"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(path):
            assert process.poll() is None and time.monotonic() < deadline, f"{argv[0]} did not start"
            time.sleep(0.01)
        transcript: list[list[object]] = []
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(path)
            stream = sock.makefile("rb")
            greeting = json.loads(stream.readline())
            for line in SCRIPT:
                sock.sendall(line + b"\n")
                messages: list[object] = []
                while True:
                    message = json.loads(stream.readline())
                    messages.append(normalise(message))
                    if "event" not in message:
                        break
                transcript.append(messages)
        assert process.wait(10) == 0
        return greeting, transcript
    finally:
        stop_process(process)


def test_stand_in_answers_like_qemu(platform: SoftwarePlatform, short_dir: Path) -> None:
    (short_dir / "real").mkdir()
    (short_dir / "sim").mkdir()
    real_greeting, real = run_script([REAL_QEMU], short_dir / "real")
    sim_greeting, sim = run_script([SIM_QEMU, "--sim-standalone", "--sim-state-dir", str(platform.state.path)],
                                   short_dir / "sim")
    assert shape(sim_greeting) == shape(real_greeting)
    assert sim_greeting["QMP"]["capabilities"] == real_greeting["QMP"]["capabilities"]
    for line, real_reply, sim_reply in zip(SCRIPT, real, sim, strict=False):
        assert sim_reply == real_reply, f"{line!r}: QEMU said {real_reply}, the stand-in {sim_reply}"
    assert len(sim) == len(real) == len(SCRIPT)
