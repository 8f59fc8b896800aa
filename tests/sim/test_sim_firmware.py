"""`sevhook sim firmware`: the image a software-platform domain boots has a usable SEV secret area,
is the demo's (so the owner's digest of it is stable), and a bad --out is one line."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

from sevhook.flow.firmware import demo_firmware
from sevhook.sev.secret import SECRET_AREA_SIZE
from sevhook.sev.secret_area import require_secret_area

SEVHOOK = [sys.executable, "-m", "sevhook"]


def test_writes_an_image_with_a_secret_area(tmp_path: Path) -> None:
    out = tmp_path / "OVMF.sim.fd"
    result = subprocess.run([*SEVHOOK, "sim", "firmware", "--out", str(out)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wrote {out}\n"
    assert out.read_bytes() == demo_firmware()
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # QEMU and the owner's tools read it
    area = require_secret_area(out, SECRET_AREA_SIZE)
    assert area.base != 0


def test_an_unwritable_out_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "missing" / "OVMF.sim.fd"
    result = subprocess.run([*SEVHOOK, "sim", "firmware", "--out", str(out)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and str(out) in result.stderr and "Traceback" not in result.stderr
    assert not out.parent.exists()
