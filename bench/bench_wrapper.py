"""Emulator-wrapper benchmark, through the real libvirtd (qemu:///system), side by side in one run:
1. plain `virsh start` to running of an SEV guest whose <emulator> is the QEMU itself (here the software
   platform's stand-in, the QEMU that reports SEV on a host without it), no attestation: the reference;
2. the same guest in emulator mode, <emulator> sevhook-qemu over that same QEMU: a fresh broker launch
   before exec, libvirt's `cont` held for the measurement, the broker's verdict and the secret
   injection (target: at most 250 ms added);
3. a capability-probe-like run, `-version`, through sevhook-qemu against the QEMU directly (the
   pass-through is an exec before any heavy import: nothing measurable).
Medians of several starts (the first of each series warms caches and is not counted).

Run from the project root as root with libvirtd running: .venv/bin/python bench/bench_wrapper.py [--runs N]"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the test suite's emulator-mode world (tests/wrapper/world.py)

from common import Figure, figure  # noqa: E402

from sevhook.sim.state import default_state_dir  # noqa: E402
from sevhook.virt import libvirt_module, open_connection  # noqa: E402
from tests.wrapper.world import (  # noqa: E402
    SIM_QEMU,
    EmulatorConf,
    SimWorld,
    emulator_domain,
    plain_sev_domain,
    write_platform_cache,
)

URI = "qemu:///system"
ADDED_TARGET_MS = 250.0
FIRMWARE = ROOT / "tests" / "data" / "vectors" / "sevctl" / "OVMF.amdsev.trimmed.fd"
WRAPPER = str(Path(sys.executable).with_name("sevhook-qemu"))


def _start_to_running_ms(conn: object, domain: object) -> float:
    libvirt = libvirt_module()
    begin = time.perf_counter()
    domain.create()  # type: ignore[attr-defined]
    while domain.state()[0] != libvirt.VIR_DOMAIN_RUNNING:  # type: ignore[attr-defined]
        time.sleep(0.002)
    elapsed = (time.perf_counter() - begin) * 1000
    domain.destroy()  # type: ignore[attr-defined]
    return elapsed


def _series(conn: object, domain: object, runs: int) -> list[float]:
    _start_to_running_ms(conn, domain)
    return [_start_to_running_ms(conn, domain) for _ in range(runs)]


def _exec_ms(command: list[str], runs: int) -> float:
    times = []
    for _ in range(runs + 1):
        begin = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=60)
        times.append((time.perf_counter() - begin) * 1000)
    return statistics.median(times[1:])


def main(runs: int = 7) -> dict[str, float]:
    libvirt = libvirt_module()
    with tempfile.TemporaryDirectory(prefix="bench-wrapper-") as directory:
        world = SimWorld.create(Path(directory), FIRMWARE, sim_dir=default_state_dir())
        conf = EmulatorConf(write_platform_cache(world, world.root / "platform"))
        conf.install()
        conn = open_connection(URI)
        domains = []
        try:
            attested_xml = emulator_domain(world, "bench-wrapped")
            plain = conn.defineXML(plain_sev_domain(world, "bench-plain", emulator=SIM_QEMU))
            wrapped = conn.defineXML(attested_xml)
            domains = [plain, wrapped]
            plain_ms = statistics.median(_series(conn, plain, runs))
            wrapped_ms = statistics.median(_series(conn, wrapped, runs))
        finally:
            for domain in domains:
                if domain.isActive():
                    domain.destroy()
                domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
            conn.close()
            conf.remove()
            world.close()
    results = {"plain": plain_ms, "wrapped": wrapped_ms,
               "probe direct": _exec_ms(["/usr/bin/qemu-system-x86_64", "-version"], runs),
               "probe wrapped": _exec_ms([WRAPPER, "-version"], runs)}
    print(f"{'measurement':60} {'median ms':>10}")
    print(f"{'virsh start to running, <emulator> the QEMU (no attestation)':60} {results['plain']:10.1f}")
    print(f"{'virsh start to running, <emulator> sevhook-qemu (attested)':60} {results['wrapped']:10.1f}")
    added = results["wrapped"] - results["plain"]
    verdict = "met" if added <= ADDED_TARGET_MS else "MISSED"
    print(f"{'  added by the wrapper':60} {added:10.1f}  target <= {ADDED_TARGET_MS:g} ms: {verdict}")
    print(f"{'qemu -version directly':60} {results['probe direct']:10.1f}")
    print(f"{'qemu -version through sevhook-qemu (probe pass-through)':60} {results['probe wrapped']:10.1f}")
    return results


def figures(quick: bool = False) -> list[Figure]:
    """The attested start against the plain start of the same guest on the same QEMU, measured in the same
    run; the probe pass-through against the QEMU run directly."""
    results = main(3 if quick else 7)
    added = results["wrapped"] - results["plain"]
    return [
        figure("wrapper", "virsh start to running, sevhook-qemu (attested)", results["wrapped"], "ms",
               ("the same QEMU as <emulator>", results["plain"]), f"<= +{ADDED_TARGET_MS:g} ms",
               added <= ADDED_TARGET_MS),
        figure("wrapper", "probe (-version) through sevhook-qemu", results["probe wrapped"], "ms",
               ("the QEMU directly", results["probe direct"])),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7, help="starts per series (default 7)")
    main(parser.parse_args().runs)
