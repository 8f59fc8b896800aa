"""bench/run_all.py: a real quick run of the fastest areas, read back from its one combined table."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN_ALL = ROOT / "bench" / "run_all.py"
HEADERS = ["area", "figure", "value", "unit", "reference", "ref value", "ratio", "target", "result"]


def run(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(RUN_ALL), *arguments], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def table_rows(stdout: str) -> list[dict[str, str]]:
    """The plain table (not a terminal): columns at least two spaces apart, '-' for an empty cell."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if re.split(r"\s{2,}", line) == HEADERS)
    rows = []
    for line in lines[start + 1:]:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) != len(HEADERS):
            break
        rows.append(dict(zip(HEADERS, cells, strict=True)))
    return rows


def as_number(text: str) -> float:
    return float(text.replace(",", ""))


def test_quick_run_prints_one_table_with_figures_references_and_ratios() -> None:
    done = run("--only", "cmdline,sev", "--quick")
    assert done.returncode == 0, done.stderr
    rows = table_rows(done.stdout)
    by_figure = {(row["area"], row["figure"].split(",")[0]): row for row in rows}
    expected = {("cmdline", "model -> argv (JSON"), ("cmdline", "model -> argv (keyval)"),
                ("cmdline", "model -> argv (libvirt 4.x compat)"), ("cmdline", "argv -> model (read back"),
                ("sev", "session creation"), ("sev", "session open (firmware side)"),
                ("sev", "measurement verification")}
    assert set(by_figure) == expected, done.stdout
    assert by_figure[("sev", "session creation")]["reference"] == "raw P-384 keygen + ECDH"
    assert by_figure[("sev", "measurement verification")]["reference"] == "raw HMAC-SHA256 (59 B)"
    for row in rows:
        value, reference, ratio = as_number(row["value"]), as_number(row["ref value"]), as_number(row["ratio"])
        assert value > 0 and reference > 0
        assert abs(ratio - value / reference) <= 0.01 * ratio + 0.001, row  # the printed ratio is value / ref
        if row["target"] == "-":
            assert row["result"] == "-"
        else:  # the verdict agrees with the printed value and the ">= N/s" target
            threshold = as_number(re.fullmatch(r">= ([\d,]+)/s", row["target"]).group(1))  # type: ignore[union-attr]
            assert row["result"] == ("met" if value >= threshold else "NOT met"), row
    assert re.search(r"targets: \d+ of 5 met", done.stdout)
    assert "[2/2] sev: 3 figure(s)" in done.stderr  # progress goes to stderr, the table alone to stdout


def test_an_unknown_area_is_a_usage_error_naming_the_choices() -> None:
    done = run("--only", "cmdline,nonsense")
    assert done.returncode == 2
    assert "unknown area nonsense" in done.stderr and "validate,cmdline,sev" in done.stderr


def test_an_area_that_cannot_run_is_reported_and_the_others_still_are() -> None:
    """Without wrk on PATH the broker area fails; the table keeps cmdline's figures and the exit status is 1."""
    done = subprocess.run([sys.executable, str(RUN_ALL), "--only", "broker,cmdline", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env={"PATH": "/nonexistent"})
    assert done.returncode == 1
    assert {row["area"] for row in table_rows(done.stdout)} == {"cmdline"}
    assert "benchmark FAILED to run: broker: exit status 1: bench_broker: needs wrk" in done.stdout
