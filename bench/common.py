"""What every benchmark reports, in one shape: a Figure per measured number, beside the reference it is
measured against in the same run (another tool, a bare Python start-up, a raw crypto primitive or, when the
issue names no comparator, the target itself), so that bench/run_all.py can print them all in one table."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import TextIO

from sevhook.console import Console

HEADERS = ["area", "figure", "value", "unit", "reference", "ref value", "ratio", "target", "result"]


@dataclass(frozen=True)
class Figure:
    """One measured number; `ratio` is value / reference_value (so < 1 means less time, or a lower rate,
    than the reference); `met` is None when no target applies or the run was too small to judge it."""

    area: str
    measure: str
    value: float
    unit: str
    reference_name: str | None
    reference_value: float | None
    ratio: float | None
    target: str | None
    met: bool | None


def figure(area: str, measure: str, value: float, unit: str, reference: tuple[str, float] | None = None,
           target: str | None = None, met: bool | None = None) -> Figure:
    """A Figure with its ratio computed from the reference, the one formula for every area."""
    name, reference_value = reference if reference is not None else (None, None)
    ratio = value / reference_value if reference_value else None
    return Figure(area, measure, value, unit, name, reference_value, ratio, target, met)


def number(value: float | None) -> str:
    """Four significant digits, thousands grouped: 12,345 / 123.4 / 1.234 / 0.01234."""
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def result(met: bool | None, target: str | None) -> str:
    if met is None:
        return "not judged" if target else "-"
    return "met" if met else "NOT met"


def machine_note() -> str:
    """Load and core count: the figures are wall-clock, and other work on a shared machine stretches them."""
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    return f"{os.cpu_count()} CPUs, load average {load}, Python {sys.version.split()[0]}"


def print_figures(figures: list[Figure], stream: TextIO | None = None) -> None:
    """One table, rich on a terminal and plain columns (two spaces apart, '-' for empty) otherwise."""
    rows = [[f.area, f.measure, number(f.value), f.unit, f.reference_name or "-", number(f.reference_value),
             number(f.ratio), f.target or "-", result(f.met, f.target)] for f in figures]
    statuses = ["" if f.met is None else "ok" if f.met else "fail" for f in figures]
    Console(stream).table(HEADERS, rows, statuses)
