"""The host's verdict records (sevhook.status) and `sevhook status` against the real test libvirtd
(domains defined with the software platform's QEMU stand-in as <emulator>, read-only connection) and
a real broker process for the health check."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sevhook import status
from sevhook.errors import StepError
from tests.broker.conftest import BrokerProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
SIM_QEMU = Path(sys.executable).with_name("sevhook-sim-qemu")
RUN = str(os.getpid())


def test_a_record_is_atomic_root_only_and_read_back(tmp_path: Path) -> None:
    directory = tmp_path / "status"
    assert status.record_verdict("web1", mode="hook", ok=False, step="attest", reason="measurement\nmismatch",
                                 launch_id="L1", directory=directory) is None
    assert oct(directory.stat().st_mode & 0o777) == "0o700"
    assert oct((directory / "web1.json").stat().st_mode & 0o777) == "0o600"
    verdict = status.read_verdict("web1", directory)
    assert verdict is not None
    assert (verdict.verdict, verdict.mode, verdict.step, verdict.reason, verdict.launch_id) == (
        "refused", "hook", "attest", "measurement mismatch", "L1")
    assert [p.name for p in directory.iterdir()] == ["web1.json"]  # no temporary file left behind


def test_records_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    status.record_verdict("big", mode="start", ok=False, step="s" * 500, reason="\u20ac" * 100_000,
                          launch_id="x" * 500, directory=tmp_path)
    assert (tmp_path / "big.json").stat().st_size <= status.MAX_RECORD_BYTES
    verdict = status.read_verdict("big", tmp_path)
    assert verdict is not None and len(verdict.reason or "") == status.MAX_REASON
    monkeypatch.setattr(status, "MAX_RECORDS", 3)
    for number in range(6):
        status.record_verdict(f"d{number}", mode="hook", ok=True, directory=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 3
    assert status.read_verdict("d5", tmp_path) is not None


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "x" * 300, "\u00e9t\u00e9"])
def test_odd_domain_names_stay_inside_the_directory(tmp_path: Path, name: str) -> None:
    status.record_verdict(name, mode="hook", ok=True, directory=tmp_path / "st")
    files = list((tmp_path / "st").iterdir())
    assert len(files) == 1 and files[0].parent == tmp_path / "st"
    verdict = status.read_verdict(name, tmp_path / "st")
    assert verdict is not None and verdict.domain == name[:200]


def test_an_unwritable_directory_is_reported_not_raised(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    problem = status.record_verdict("web1", mode="hook", ok=True, directory=tmp_path / "file" / "status")
    assert problem is not None and "cannot record" in problem


def test_a_damaged_record_is_named(tmp_path: Path) -> None:
    (tmp_path / "web1.json").write_text('{"verdict": "maybe"}')
    with pytest.raises(ValueError, match=r"web1.json: not a sevhook status record"):
        status.read_verdict("web1", tmp_path)


def test_recording_keeps_the_outcome_and_records_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(status.STATUS_DIR_ENV, str(tmp_path))
    with status.recording("ok-guest", "hook", "L1"):
        pass
    with pytest.raises(StepError), status.recording("bad-guest", "hook", "L2"):
        raise StepError("attest", "measurement-mismatch: no allowed digest")
    with pytest.raises(ZeroDivisionError), status.recording("bug-guest", "start", None):
        _ = 1 / 0
    assert status.read_verdict("ok-guest").verdict == "attested"  # type: ignore[union-attr]
    bad = status.read_verdict("bad-guest")
    assert bad is not None and (bad.verdict, bad.step, bad.launch_id) == ("refused", "attest", "L2")
    bug = status.read_verdict("bug-guest")
    assert bug is not None and bug.step == "internal" and "ZeroDivisionError" in (bug.reason or "")


# ---- sevhook status against libvirtd -------------------------------------------------------------

libvirt = pytest.importorskip("libvirt")


def domain_xml(name: str, emulator: Path, broker_url: str, monitor: bool) -> str:
    socket = f"<sevhook:monitor socket='/run/sevhook/{name}.qmp'/>" if monitor else ""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <metadata>
    <sevhook:attestation xmlns:sevhook='http://sevhook.org/xmlns/libvirt/1.0'>
      <sevhook:broker url='{broker_url}'/><sevhook:guest id='{name}-id' launch='L-{name}'/>{socket}
    </sevhook:attestation>
  </metadata>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type><loader readonly='yes' type='rom'>/dev/null</loader></os>
  <devices><emulator>{emulator}</emulator></devices>
  <launchSecurity type='sev'><policy>0x0003</policy></launchSecurity>
</domain>"""


@pytest.fixture(scope="module")
def host(libvirt_uri: str) -> Iterator[tuple[str, Path, list[str]]]:
    root = Path(tempfile.mkdtemp(prefix="sevhook-status-", dir="/tmp"))
    cli = [sys.executable, "-m", "sevhook.cli"]
    subprocess.run([*cli, "sim", "platform", "init", "--state-dir", root / "sim", "--rsa-bits", "2048"], check=True,
                   capture_output=True, cwd=ROOT, timeout=120)
    emulator = root / "qemu-sim"
    emulator.write_text(f"#!/bin/sh\nexec {SIM_QEMU} --sim-state-dir {root / 'sim'} \"$@\"\n")
    emulator.chmod(0o755)
    broker = BrokerProcess(root / "broker")
    connection = libvirt.open(libvirt_uri)
    names = [f"sevhook-status-hook-{RUN}", f"sevhook-status-start-{RUN}"]
    try:
        connection.defineXML(domain_xml(names[0], emulator, broker.url, monitor=True))
        connection.defineXML(domain_xml(names[1], emulator, f"http://127.0.0.1:{free_port()}", monitor=False))
        yield libvirt_uri, root, names
    finally:
        for name in names:
            try:
                connection.lookupByName(name).undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
            except libvirt.libvirtError:
                pass
        connection.close()
        broker.stop()
        shutil.rmtree(root, ignore_errors=True)


def run_status(uri: str, directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, status.STATUS_DIR_ENV: str(directory)}
    return subprocess.run([sys.executable, "-m", "sevhook.cli", "status", "-c", uri, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env=env)


def test_status_lists_mode_verdict_and_broker_health(host: tuple[str, Path, list[str]]) -> None:
    uri, root, (hook_name, start_name) = host
    records = root / "records"
    status.record_verdict(hook_name, mode="hook", ok=False, step="attest",
                          reason="the key broker refused: measurement-mismatch", launch_id=f"L-{hook_name}",
                          directory=records)
    shown = run_status(uri, records, "--json")
    assert shown.returncode == 0, shown.stderr
    rows = {row["name"]: row for row in json.loads(shown.stdout)["domains"]}
    assert rows[hook_name]["mode"] == "hook" and rows[start_name]["mode"] == "start"
    assert rows[hook_name]["broker_ok"] is True and rows[hook_name]["broker_answer"] == "HTTP 200"
    assert rows[start_name]["broker_ok"] is False and "no answer" in rows[start_name]["broker_answer"]
    assert rows[hook_name]["last"]["verdict"] == "refused"
    assert rows[hook_name]["last"]["reason"] == "the key broker refused: measurement-mismatch"
    assert rows[start_name]["last"] is None
    text = run_status(uri, records, hook_name).stdout
    assert text.splitlines()[0].startswith(f"{hook_name}  shut off  mode hook  refused ")
    assert "broker ok" in text and "reason: the key broker refused: measurement-mismatch" in text
    assert all(len(line) <= 100 for line in text.splitlines() if not line.startswith("    "))


def test_status_of_an_unknown_domain_is_one_message(host: tuple[str, Path, list[str]]) -> None:
    uri, root, _names = host
    result = run_status(uri, root / "records", f"no-such-domain-{RUN}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"sevhook: error: domain no-such-domain-{RUN}: ")
