"""`sevhook demo`, run through the README's main command itself (`scripts/run demo` from the
project root, which checks the system packages and the virtualenv, then execs `.venv/bin/sevhook
demo`): its output, exit status and time; and, in process, that it fails when the tampered launch
is not refused and never prints the secret."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from sevhook.console import Console
from sevhook.flow import demo as demo_module
from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(120)
SEVHOOK = ROOT / ".venv" / "bin" / "sevhook"
RUN = ROOT / "scripts" / "run"
VENV_STAMP = ROOT / ".venv" / ".sevhook-installed"
LIMIT_SECONDS = 5.0
LIBVIRT_LIMIT_SECONDS = 30.0  # the bound for the libvirt demo, once installed
INSTALL_SECONDS = 600


def _step_lines(output: str) -> dict[str, list[str]]:
    """Plain output: '  <ok|FAILED|-->  <name>  <time>  <detail>' -> name -> [status, ...]."""
    steps: dict[str, list[str]] = {}
    for line in output.splitlines():
        match = re.match(r"^  (ok|FAILED|--)\s+(\S+(?: \S+)?)\s{2,}", line)
        if match:
            steps.setdefault(match.group(2).strip(), []).append(match.group(1))
    return steps


def _venv_is_current() -> bool:
    """scripts/run reinstalls the package when pyproject.toml changed since the last install."""
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    return VENV_STAMP.is_file() and VENV_STAMP.read_text().strip() == digest


@pytest.mark.libvirt
@pytest.mark.timeout(INSTALL_SECONDS + 120)
def test_demo_as_the_readme_runs_it() -> None:
    """`scripts/run demo`: plain virsh starts of an emulator-mode guest through the test libvirtd (already
    running here, so scripts/run leaves it running), in under LIBVIRT_LIMIT_SECONDS."""
    assert RUN.is_file() and os.access(RUN, os.X_OK), f"{RUN} is the README's main command and must be executable"
    if not _venv_is_current():  # a first run installs the virtualenv: neither its time nor its load is the demo's
        warm_up = subprocess.run([str(RUN), "demo"], cwd=ROOT, capture_output=True, text=True,
                                 timeout=INSTALL_SECONDS, check=False)
        assert _venv_is_current(), warm_up.stdout + warm_up.stderr
    begin = time.monotonic()
    result = subprocess.run([str(RUN), "demo"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    wall = time.monotonic() - begin
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""  # an installed system and virtualenv: scripts/run says nothing
    out = result.stdout
    assert "\x1b[" not in out
    steps = _step_lines(out)
    for name in ("platform", "broker", "platform export", "emulator", "libvirt", "define web", "virsh restart",
                 "define tampered"):
        assert steps.get(name) == ["ok"], f"step {name} did not succeed:\n{out}"
    assert steps["virsh start"] == ["ok", "ok"] and steps["virsh destroy"] == ["ok", "ok"]
    handles = [int(h) for h in re.findall(r"approved launch handle (\d+)", out)]
    assert len(handles) == 2 and handles[0] != handles[1], out  # every start its own launch, no re-define
    assert re.search(r"ok\s+virsh start .*refused, shut off, no secret; virsh says: sevhook-qemu: "
                     r"sevhook-demo-tampered-\w+: attest: the key broker refused.*measurement-mismatch", out)
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("PASS: both plain starts were attested"), out
    assert wall < LIBVIRT_LIMIT_SECONDS, f"the demo took {wall:.2f} s"
    assert not [line for line in subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
                                                capture_output=True, text=True, timeout=30, check=True
                                                ).stdout.split() if line.startswith("sevhook-demo-")]


def test_demo_without_libvirt() -> None:
    assert SEVHOOK.is_file()
    begin = time.monotonic()
    result = subprocess.run([str(SEVHOOK), "demo", "--no-libvirt"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, check=False)
    wall = time.monotonic() - begin
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    out = result.stdout
    assert "\x1b[" not in out  # not a terminal: plain lines, no colour codes
    steps = _step_lines(out)
    for name in ("platform", "broker", "chain", "session", "domain XML", "cmdline", "launch", "hook monitor",
                 "hook measure", "hook inject", "hook resume", "secret", "refused"):
        assert "ok" in steps.get(name, []), f"step {name} did not succeed:\n{out}"
    assert steps["hook attest"] == ["ok", "FAILED"]  # the good launch, then the tampered one
    assert steps["launch"] == ["ok", "ok"] and steps["session"] == ["ok", "ok"]
    assert "qemu" in steps  # the command line is shown
    assert re.search(r"-machine confidential-guest-support=lsec0", out)
    assert re.search(r'-object \{"qom-type":"sev-guest","id":"lsec0"', out)
    assert re.search(r"ok\s+secret .*is intact; guest state running", out)
    assert re.search(r"FAILED\s+hook attest .*\(reason: measurement-mismatch\)", out)
    assert re.search(r"ok\s+refused .*guest destroyed .*received no secret", out)
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("PASS: the attested guest received its secret intact; the tampered guest was refused")
    reported = re.search(r"Total time (\d+) ms\.$|Total time (\d+\.\d) s\.$", summary)
    assert reported, summary
    seconds = int(reported.group(1)) / 1000 if reported.group(1) else float(reported.group(2))
    assert seconds < LIMIT_SECONDS, f"the demo reports {seconds} s"
    assert wall < LIMIT_SECONDS, f"the demo took {wall:.2f} s"
    # nothing left behind: the stand-ins exited and the temporary directory is gone
    for pid in re.findall(r"QEMU stand-in \(pid (\d+)\)", out):
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    work = re.search(r'"dh-cert-file":"(/[^"]+)/lib-good/', out)
    assert work and not Path(work.group(1)).exists()


def test_demo_help_has_examples() -> None:
    result = subprocess.run([str(SEVHOOK), "demo", "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "examples:" in result.stdout and "exit status" in result.stdout


def _run_in_process(tmp_path: Path) -> tuple[demo_module.DemoResult, str, demo_module.Demo]:
    stream = io.StringIO()
    work = tmp_path / "w"
    work.mkdir(mode=0o700)
    demo = demo_module.Demo(Console(stream, color=False), work)
    return demo.run(), stream.getvalue(), demo


def test_the_secret_is_never_printed(tmp_path: Path) -> None:
    result, output, demo = _run_in_process(tmp_path)
    assert result.passed, output
    value = demo.secret_value.rstrip(b"\0")
    assert len(value) >= 24
    for form in (value, base64.b64encode(demo.secret_value), value.hex().encode()):
        assert form.decode() not in output


def test_demo_fails_when_the_tampered_launch_is_not_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo_module, "tampered", lambda image: image)  # "tampering" that changes nothing
    result, output, _demo = _run_in_process(tmp_path)
    assert result.good_attested and not result.tampered_refused and not result.passed
    assert re.search(r"FAILED\s+refused .*the tampered launch was attested", output)
    assert output.strip().splitlines()[-1].startswith("FAIL: the tampered launch was not refused")


def test_no_stand_in_survives_a_failed_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A launch that fails half way (here: the hook finds no monitor) still stops its stand-in."""
    started: list[int] = []
    real = demo_module.Demo._attest

    def broken(self: demo_module.Demo, domain: object, socket_path: Path, expect_refusal: bool) -> str | None:
        started.extend(int(pid) for pid in re.findall(r"pid (\d+)", "".join(
            f"{r.detail} " for r in self.steps.results if r.name == "launch")))
        socket_path.unlink()
        return real(self, domain, socket_path, expect_refusal)

    monkeypatch.setattr(demo_module.Demo, "_attest", broken)
    result, output, _demo = _run_in_process(tmp_path)
    assert not result.passed and re.search(r"FAILED\s+hook monitor", output)
    assert started
    for pid in started:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"stand-in {pid} is still running")
