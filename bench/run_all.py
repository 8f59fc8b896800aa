"""Every benchmark of the project in one run, then one table: each figure the issues name beside what it is
measured against in the same run (sev-snp-measure, virt-xml-validate, a bare Python start-up, the raw crypto
primitives, or the target itself), the ratio, the target and whether it was met.

Each area runs in a fresh child process (this script with --child), one after the other: peak-memory figures
then never include another area's memory, and one area's crash is reported without losing the others.
Missed targets are reported, not failures (a loaded machine misses them); the exit status is 1 only when an
area's benchmark could not run at all.

Run from the project root:
    .venv/bin/python bench/run_all.py                      # everything, about a minute on 2 cores
    .venv/bin/python bench/run_all.py --quick              # smaller sizes and shorter durations
    .venv/bin/python bench/run_all.py --only cmdline,sev   # some areas
    .venv/bin/python bench/run_all.py --details            # also each area's own detail table (on stderr)"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from common import Figure, machine_note, print_figures

from sevhook.console import Console

# area -> module, in the order of the issues
AREAS = {
    "validate": "bench_validate",
    "cmdline": "bench_cmdline",
    "sev": "bench_sev",
    "digest": "bench_digest",
    "sim": "bench_sim",
    "hook": "bench_hook",
    "broker": "bench_broker",
    "wrapper": "bench_wrapper",
}
AREA_TIMEOUT_SECONDS = 1800
ROOT = Path(__file__).resolve().parent.parent


def run_child(area: str, quick: bool, result: Path) -> None:
    """In the child: the module's own output goes to stderr, the figures as JSON to `result`."""
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # also for the module's subprocesses
    figures = importlib.import_module(AREAS[area]).figures(quick=quick)
    result.write_text(json.dumps([dataclasses.asdict(f) for f in figures]))


def run_area(area: str, quick: bool, details: bool, work: Path) -> tuple[list[Figure], str | None]:
    """(figures, None) or ([], why the area's benchmark failed)."""
    result = work / f"{area}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", area, "--result", str(result)]
    try:
        done = subprocess.run(command + (["--quick"] if quick else []), cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=None if details else subprocess.PIPE, text=True, timeout=AREA_TIMEOUT_SECONDS,
                              check=False)
    except subprocess.TimeoutExpired:
        return [], f"no result within {AREA_TIMEOUT_SECONDS} s"
    if done.returncode != 0 or not result.exists():
        tail = (done.stderr or "").strip().splitlines()[-5:]
        return [], f"exit status {done.returncode}" + (": " + " | ".join(tail) if tail else "")
    return [Figure(**fields) for fields in json.loads(result.read_text())], None


def parse_areas(text: str) -> list[str]:
    areas = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in areas if name not in AREAS]
    if unknown or not areas:
        raise argparse.ArgumentTypeError(f"unknown area {', '.join(unknown) or '(none)'}; "
                                         f"choose from {','.join(AREAS)}")
    return areas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", type=parse_areas, default=list(AREAS), metavar="AREA[,AREA]",
                        help=f"areas to run, comma-separated (default: all of {','.join(AREAS)})")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and shorter durations")
    parser.add_argument("--details", action="store_true", help="show each area's own output on stderr")
    parser.add_argument("--child", choices=list(AREAS), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.child:
        run_child(options.child, options.quick, options.result)
        return 0

    progress = Console(sys.stderr)
    figures: list[Figure] = []
    failures: list[str] = []
    started = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="sevhook-bench-") as work:
        for index, area in enumerate(options.only, 1):
            progress.line(f"[{index}/{len(options.only)}] {area} ...", "step")
            begin = time.monotonic()
            found, failure = run_area(area, options.quick, options.details, Path(work))
            elapsed = time.monotonic() - begin
            if failure:
                failures.append(f"{area}: {failure}")
                progress.line(f"[{index}/{len(options.only)}] {area} FAILED after {elapsed:.1f} s: {failure}", "fail")
            else:
                progress.line(f"[{index}/{len(options.only)}] {area}: {len(found)} figure(s) in {elapsed:.1f} s", "ok")
            figures += found

    out = Console()
    kind = "quick run" if options.quick else "full run"
    out.line(f"sevhook benchmarks, {kind} started {started:%Y-%m-%d %H:%M} UTC; {machine_note()}", "step")
    print_figures(figures)
    missed = sum(1 for f in figures if f.met is False)
    judged = sum(1 for f in figures if f.met is not None)
    out.line("ratio = value / reference value, both measured in this run; "
             "a missed target is reported, not a failure (wall-clock figures suffer on a loaded machine)")
    out.line(f"targets: {judged - missed} of {judged} met", "ok" if not missed else "warn")
    for failure in failures:
        out.line(f"benchmark FAILED to run: {failure}", "fail")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
