"""`sevhook hook run`'s usage names each of libvirt's four hook arguments once (it lives here, beside
the other top-level CLI checks, because tests/hook/ belongs to the hook's own suite)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_hook_run_usage_names_each_argument_once() -> None:
    result = subprocess.run([sys.executable, "-m", "sevhook.cli", "hook", "run", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    usage = " ".join(result.stdout.split("\n\n")[0].split())
    assert usage == "usage: sevhook hook run [-h] NAME OP SUBOP EXTRA"
    for name in ("NAME", "OP", "SUBOP", "EXTRA"):
        assert any(line.split()[:1] == [name] for line in result.stdout.splitlines())
    wrong = subprocess.run([sys.executable, "-m", "sevhook.cli", "hook", "run", "guest1", "prepare"], cwd=ROOT,
                           capture_output=True, text=True, timeout=30)
    assert wrong.returncode == 2 and "SUBOP, EXTRA" in wrong.stderr and "Traceback" not in wrong.stderr
