"""The simulator's guest records stay bounded, and `sevhook sim prune` removes finished ones only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sevhook.sim import guest
from sevhook.sim.guest import GuestRecorder
from sevhook.sim.state import StateDir

ROOT = Path(__file__).resolve().parents[2]


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def record(state: StateDir, label: str, *, alive: bool, ended: bool = False) -> None:
    recorder = GuestRecorder(state, label, handle=1)
    recorder.record["pid"] = os.getpid() if alive else dead_pid()
    recorder.update(ended=ended)


def test_prune_removes_finished_records_and_keeps_running_ones(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.ensure()
    record(state, "running", alive=True)
    record(state, "ended", alive=True, ended=True)
    record(state, "crashed", alive=False)
    record(state, "newest-finished", alive=False)
    assert GuestRecorder.prune(state, keep=2) == ["crashed", "ended"]
    assert sorted(r["label"] for r in GuestRecorder.all(state)) == ["newest-finished", "running"]
    assert GuestRecorder.prune(state, older_than=3600) == []  # all are fresh
    result = subprocess.run([sys.executable, "-m", "sevhook", "sim", "prune", "--state-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "removed 1 finished guest record(s): newest-finished"
    assert [r["label"] for r in GuestRecorder.all(state)] == ["running"]


def test_records_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guest, "MAX_GUEST_RECORDS", 5)
    state = StateDir(tmp_path)
    state.ensure()
    record(state, "alive", alive=True)
    for number in range(12):
        record(state, f"old-{number:02d}", alive=False)
    labels = sorted(r["label"] for r in GuestRecorder.all(state))
    assert len(labels) == 5 and "alive" in labels and "old-11" in labels and "old-00" not in labels
