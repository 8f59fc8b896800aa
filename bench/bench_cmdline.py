"""Benchmark: translating 10,000 launch-security models into QEMU arguments (target: under 1 s),
and reading the arguments back. Prints total time, cost per model and the ratio to the target."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

from common import Figure, figure

from sevhook.qemu_cmdline.argv import read_launch_security
from sevhook.qemu_cmdline.translate import CmdlineOptions, Translation, translate
from sevhook.sev.policy import SevPolicy, SnpPolicy
from sevhook.xml.models import Domain, LaunchSecurity, S390PvLaunchSecurity, SevLaunchSecurity, SevSnpLaunchSecurity

COUNT = 10_000
TARGET_SECONDS = 1.0


def make_domains(count: int, seed: int = 0) -> list[Domain]:
    """A mix like a fleet's: mostly SEV/SEV-ES with owner sessions, some SNP, a few s390-pv."""
    rng = random.Random(seed)
    domains = []
    for index in range(count):
        kind = rng.random()
        model: LaunchSecurity
        if kind < 0.7:
            model = SevLaunchSecurity(
                policy=SevPolicy(rng.choice([0x3, 0x7, 0x33, 0x37])),
                cbitpos=rng.choice([47, 51]),
                reduced_phys_bits=1,
                dh_cert="A" * 2780 if rng.random() < 0.8 else None,
                session="B" * 172 if rng.random() < 0.8 else None,
                kernel_hashes=rng.choice([None, True, False]),
            )
        elif kind < 0.95:
            model = SevSnpLaunchSecurity(
                policy=SnpPolicy(0x30000),
                cbitpos=51,
                reduced_phys_bits=1,
                kernel_hashes=rng.choice([None, True]),
                vcek=rng.choice([None, False]),
                host_data="Q" * 44 if rng.random() < 0.5 else None,
            )
        else:
            model = S390PvLaunchSecurity()
        domains.append(Domain(name=f"guest-{index:05d}-{'x' * rng.randrange(30)}", type="kvm", id=index,
                              launch_security=model))
    return domains


def timed(label: str, count: int, work: Callable[[], object]) -> dict[str, object]:
    started = time.perf_counter()
    work()
    seconds = time.perf_counter() - started
    return {
        "operation": label,
        "models": count,
        "seconds": seconds,
        "us_per_model": seconds / count * 1e6,
        "target_s": TARGET_SECONDS,
        "ratio_to_target": seconds / TARGET_SECONDS,
    }


def main(count: int = COUNT) -> list[dict[str, object]]:
    domains = make_domains(count)
    json_options = CmdlineOptions()
    keyval_options = CmdlineOptions(syntax="keyval")
    compat_domains = [d for d in domains
                      if isinstance(d.launch_security, SevLaunchSecurity) and d.launch_security.kernel_hashes is None]
    translations: list[Translation] = []

    def translate_json() -> None:
        translations.extend(translate(d, json_options) for d in domains)

    def read_back() -> None:
        for t in translations:
            files = {str(p): text for p, text in t.files.items()}
            read_launch_security(["qemu-system-x86_64", "-machine", "q35", *t.argv], files)

    rows = [
        timed("model -> argv (JSON, QEMU >= 6.0)", count, translate_json),
        timed("model -> argv (keyval)", count, lambda: [translate(d, keyval_options) for d in domains]),
        timed(
            "model -> argv (libvirt 4.x compat)",
            len(compat_domains),
            lambda: [translate(d, CmdlineOptions(libvirt4_compat=True, lib_dir=Path("/tmp/lib")))
                     for d in compat_domains],
        ),
        timed("argv -> model (read back, JSON)", count, read_back),
    ]
    return rows


def print_table(rows: list[dict[str, object]]) -> None:
    print(f"{'operation':<38} {'models':>7} {'total s':>9} {'us/model':>9} {'target s':>9} {'ratio':>7}")
    for row in rows:
        print(
            f"{row['operation']:<38} {row['models']:>7} {row['seconds']:>9.3f} {row['us_per_model']:>9.1f} "
            f"{row['target_s']:>9.1f} {row['ratio_to_target']:>7.3f}"
        )
    first = rows[0]
    verdict = "meets" if float(first["seconds"]) < TARGET_SECONDS else "MISSES"  # type: ignore[arg-type]
    print(f"translating {first['models']} models {verdict} the {TARGET_SECONDS:g} s target "
          f"({first['ratio_to_target']:.2f} of it)")


def figures(quick: bool = False) -> list[Figure]:
    """Rates, so that a --quick run with fewer models is judged against the same 10,000 models/s budget."""
    rows = main(2_000 if quick else COUNT)
    print_table(rows)
    budget = COUNT / TARGET_SECONDS
    converted = []
    for row in rows:
        rate = float(row["models"]) / float(row["seconds"])  # type: ignore[arg-type]
        translating = str(row["operation"]).startswith("model -> argv")
        converted.append(figure("cmdline", f"{row['operation']}, {row['models']:,} models", rate, "models/s",
                             (f"budget: {COUNT:,} models in {TARGET_SECONDS:g} s", budget),
                             f">= {budget:,.0f}/s" if translating else None, rate >= budget if translating else None))
    return converted


if __name__ == "__main__":
    print_table(main())
