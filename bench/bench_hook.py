"""Hook benchmark, side by side with its targets:
1. the installed hook (qemu.d/50-sevhook) for a domain without SEV, against a bare `python3 -c pass`
   on the same interpreter (target: at most 2x); libvirtd runs it five times per start and stop of
   every guest on the host;
2. a complete `started` attestation (private monitor, query-sev, measurement, key broker, secret
   injection, cont) against the QEMU stand-in in standalone mode and a local `sevhook broker serve`
   (target: under 150 ms), timed from the hook's exec to its exit.
Medians of several runs (and the minimum, which is less disturbed by other load on a shared machine).

Run from the project root: .venv/bin/python bench/bench_hook.py [--runs N]"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import Figure, figure

from sevhook.hook.install import install
from sevhook.sim.world import SimWorld, stop

ROOT = Path(__file__).resolve().parent.parent

PLAIN_DOMAIN = b"<domain type='kvm'><name>plain</name><memory unit='MiB'>512</memory><vcpu>1</vcpu></domain>\n"
NO_SEV_RATIO_TARGET = 2.0
ATTESTATION_TARGET_MS = 150.0
FIRMWARE = ROOT / "tests" / "data" / "vectors" / "sevctl" / "OVMF.amdsev.trimmed.fd"


def _time_ms(command: list[str], stdin: bytes, env: dict[str, str] | None = None) -> float:
    begin = time.perf_counter()
    result = subprocess.run(command, input=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                            timeout=60, check=False)
    elapsed = (time.perf_counter() - begin) * 1000
    if result.returncode != 0:
        raise SystemExit(f"{command[0]} failed: {result.stderr.decode(errors='replace')}")
    return elapsed


def _series(command: list[str], stdin: bytes, runs: int) -> list[float]:
    _time_ms(command, stdin)  # warm the page cache and .pyc files
    return [_time_ms(command, stdin) for _ in range(runs)]


def no_sev_rows(hook: Path, runs: int) -> list[tuple[str, float, float, str, str]]:
    interpreter = os.path.realpath(sys.executable)
    bare = _series([interpreter, "-c", "pass"], b"", runs)
    bare_no_site = _series([interpreter, "-S", "-c", "pass"], b"", runs)
    hook_times = _series([str(hook), "plain", "prepare", "begin", "-"], PLAIN_DOMAIN, runs)
    ratio = statistics.median(hook_times) / statistics.median(bare)
    return [
        ("python3 -c pass (baseline)", statistics.median(bare), min(bare), "", ""),
        ("python3 -S -c pass (for reference)", statistics.median(bare_no_site), min(bare_no_site), "", ""),
        ("hook, domain without SEV", statistics.median(hook_times), min(hook_times),
         f"{ratio:.2f}x baseline",
         f"<= {NO_SEV_RATIO_TARGET:g}x: {'met' if ratio <= NO_SEV_RATIO_TARGET else 'MISSED'}"),
    ]


def attestation_rows(hook: Path, runs: int, work: Path) -> list[tuple[str, float, float, str, str]]:
    names = [f"bench{index}" for index in range(runs + 1)]
    world = SimWorld.create(work / "world", FIRMWARE)
    log = work / "hook.log"
    env = {"PATH": "/usr/bin:/bin", "SEVHOOK_HOOK_LOG": str(log)}
    times: list[float] = []
    sockets = Path(tempfile.mkdtemp(prefix="bh", dir="/tmp"))  # short: UNIX socket paths hold 107 bytes
    try:
        for name in names:
            socket_path = sockets / f"{name}.qmp"
            prepared = world.prepare(name, socket_path)
            guest = world.start_standalone(prepared)
            try:
                elapsed = _time_ms([str(hook), name, "started", "begin", "-"], prepared.read_bytes(), env)
            finally:
                stop([guest])
            if name != names[0]:  # the first run warms caches
                times.append(elapsed)
    finally:
        world.close()
        shutil.rmtree(sockets, ignore_errors=True)
    median = statistics.median(times)
    attest_steps = [float(line.split()[6][:-2]) for line in log.read_text().splitlines()
                    if line.split()[4] == "attest" and line.split()[5] == "ok"]
    return [
        ("started: attested launch, exec to exit", median, min(times), "",
         f"< {ATTESTATION_TARGET_MS:g} ms: {'met' if median < ATTESTATION_TARGET_MS else 'MISSED'}"),
        ("  of which the attest step (client import + broker)", statistics.median(attest_steps),
         min(attest_steps), "", ""),
    ]


def main(runs: int = 15) -> list[tuple[str, float, float, str, str]]:
    with tempfile.TemporaryDirectory(prefix="bench-hook-") as directory:
        work = Path(directory)
        hook = install(work / "hooks")
        rows = no_sev_rows(hook, runs) + attestation_rows(hook, max(5, runs // 2), work)
    print(f"{'measurement':52} {'median ms':>10} {'min ms':>8}  {'ratio':16} target")
    for name, median, minimum, ratio, target in rows:
        print(f"{name:52} {median:10.1f} {minimum:8.1f}  {ratio:16} {target}")
    return rows


def figures(quick: bool = False) -> list[Figure]:
    """Medians, each against the bare interpreter start-up measured in the same run (the floor of any hook
    process); --quick: 5 runs instead of 15 (attestations: 5 instead of 7)."""
    rows = {name.strip(): median for name, median, *_ in main(5 if quick else 15)}
    bare = ("python3 -c pass", rows["python3 -c pass (baseline)"])
    no_sev, attested = rows["hook, domain without SEV"], rows["started: attested launch, exec to exit"]
    return [
        figure("hook", "hook for a domain without SEV", no_sev, "ms", bare, f"<= {NO_SEV_RATIO_TARGET:g}x reference",
               no_sev <= NO_SEV_RATIO_TARGET * bare[1]),
        figure("hook", "complete started attestation, exec to exit", attested, "ms", bare,
               f"< {ATTESTATION_TARGET_MS:g} ms", attested < ATTESTATION_TARGET_MS),
        figure("hook", "of which the attest step (client import + broker)",
               rows["of which the attest step (client import + broker)"], "ms"),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15, help="runs per measurement (default 15)")
    main(parser.parse_args().runs)
