"""Simulator benchmark: a standalone SEV launch up to the launch-secret state, with the measurement read
over QMP (qemu.qmp client), for Debian's 4 MiB OVMF.

- in-process: LAUNCH_START with the owner's session (ECDH, KDF, MACs), LAUNCH_UPDATE_DATA over the OVMF
  image, LAUNCH_MEASURE, the QMP monitor started, a client connected and negotiated, and
  query-sev-launch-measure answered. Target < 100 ms (median).
- process: the same through a fresh `sevhook-sim-qemu --sim-standalone` process, i.e. including Python
  start-up and imports (for orientation; the hook and the demo pay this once per guest).
The platform is created once beforehand (key generation is not part of a launch).

Run: .venv/bin/python bench/bench_sim.py [--runs N]"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import Figure, figure
from qemu.qmp import ConnectError, QMPClient

from sevhook.sev.chain import CertificateChain
from sevhook.sev.session import create_session
from sevhook.sim.argv import parse_qemu_argv
from sevhook.sim.platform import SoftwarePlatform, init_platform
from sevhook.sim.qemu_sev import SevLaunch
from sevhook.sim.qmp_server import listening_socket
from sevhook.sim.standalone import StandaloneQemu
from sevhook.sim.state import StateDir

OVMF = "/usr/share/OVMF/OVMF_CODE_4M.fd"
TARGET_MS = 100.0
SIM_QEMU = str(Path(sys.executable).with_name("sevhook-sim-qemu"))


def _argv(directory: Path, socket_path: str) -> list[str]:
    obj = (f'{{"qom-type":"sev-guest","id":"lsec0","cbitpos":51,"reduced-phys-bits":1,"policy":1,'
           f'"dh-cert-file":"{directory}/b_godh.b64","session-file":"{directory}/b_session.b64"}}')
    return ["-name", "guest=bench", "-S", "-machine", "q35,confidential-guest-support=lsec0", "-object", obj,
            "-bios", OVMF, "-qmp", f"unix:{socket_path},server=on,wait=off"]


async def _read_measurement(path: str) -> str:
    qmp = QMPClient("bench")
    for _ in range(3000):
        try:
            await qmp.connect(path)
            break
        except (ConnectError, OSError):
            await asyncio.sleep(0.002)
    try:
        return (await qmp.execute("query-sev-launch-measure"))["data"]
    finally:
        with contextlib.suppress(Exception):
            await qmp.disconnect()


async def _in_process_once(platform: SoftwarePlatform, directory: Path, index: int) -> float:
    socket_path = str(directory / f"in{index}.sock")
    start = time.perf_counter()
    inv = parse_qemu_argv(_argv(directory, socket_path))
    launch = SevLaunch.run(platform, inv)
    app = StandaloneQemu(inv, platform, launch, (7, 2, 22))
    server = asyncio.ensure_future(app.serve([listening_socket(spec) for spec in inv.monitors]))
    await _read_measurement(socket_path)
    elapsed = time.perf_counter() - start
    app.request_exit(0)
    await server
    launch.guest.end()
    return elapsed


def _process_once(state: StateDir, directory: Path, index: int) -> float:
    socket_path = str(directory / f"p{index}.sock")
    start = time.perf_counter()
    process = subprocess.Popen([SIM_QEMU, "--sim-standalone", "--sim-state-dir", str(state.path),
                                *_argv(directory, socket_path)], stderr=subprocess.DEVNULL)
    try:
        asyncio.run(_read_measurement(socket_path))
        return time.perf_counter() - start
    finally:
        process.terminate()
        process.wait(10)


def main(runs: int = 10) -> list[dict[str, object]]:
    with tempfile.TemporaryDirectory(prefix="bench-sim-", dir="/tmp") as name:
        directory = Path(name)
        state = StateDir(directory / "state")
        platform, _ = init_platform(state, rsa_bits=2048)
        chain = CertificateChain.from_full(platform.full_chain())
        create_session(chain.pdh, 0x1).write_files(directory, "b")
        in_process = [asyncio.run(_in_process_once(platform, directory, i)) for i in range(runs)]
        process = [_process_once(state, directory, i) for i in range(max(3, runs // 2))]
    rows = []
    for label, samples, target in (("launch to measurement over QMP, in-process", in_process, TARGET_MS),
                                   ("same, fresh sevhook-sim-qemu process", process, None)):
        median = statistics.median(samples) * 1000
        rows.append({"benchmark": label, "median_ms": round(median, 1), "min_ms": round(min(samples) * 1000, 1),
                     "target_ms": target, "ratio": round(median / target, 2) if target else None,
                     "ok": median < target if target else None})
    return rows


def figures(quick: bool = False) -> list[Figure]:
    """The in-process launch against its 100 ms target, the fresh process for orientation; --quick: 3 runs."""
    converted = []
    for row in main(3 if quick else 10):
        target = row["target_ms"]
        measure = str(row["benchmark"]).replace("same,", "launch to measurement over QMP,")
        converted.append(figure("sim", measure, float(row["median_ms"]), "ms",  # type: ignore[arg-type]
                                (f"target {target:g} ms", target) if target else None,  # type: ignore[arg-type]
                                f"< {target:g} ms" if target else None, row["ok"]))  # type: ignore[arg-type]
    return converted


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    results = main(parser.parse_args().runs)
    print(f"{'benchmark':48} {'median ms':>10} {'min ms':>8} {'target':>8} {'ratio':>6}")
    for row in results:
        target = f"<{row['target_ms']:.0f}" if row["target_ms"] else "-"
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "-"
        print(f"{row['benchmark']:48} {row['median_ms']:>10.1f} {row['min_ms']:>8.1f} {target:>8} {ratio:>6}")
    sys.exit(0 if all(row["ok"] is not False for row in results) else 1)

