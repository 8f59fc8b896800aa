"""Printing flow steps as they finish: on a terminal a coloured row per step whose detail wraps under
itself (rich), otherwise one plain, greppable line per step (sevhook.console decides which)."""

from __future__ import annotations

from sevhook.console import STYLES, Console
from sevhook.launch.steps import FAILED, INFO, OK, StepResult

_MARKS_TERMINAL = {OK: "✓", FAILED: "✗", INFO: "·"}
_MARKS_PLAIN = {OK: "ok", FAILED: "FAILED", INFO: "--"}
_STATUS_STYLE = {OK: "ok", FAILED: "fail", INFO: "info"}
NAME_WIDTH = 17


def format_seconds(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


class StepPrinter:
    """A Steps listener that prints each result as it arrives."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._rich = None
        if console.color:
            from rich.console import Console as RichConsole  # noqa: PLC0415 - only on terminals

            self._rich = RichConsole(file=console.stream, highlight=False)

    def __call__(self, result: StepResult) -> None:
        timing = "" if result.status == INFO else format_seconds(result.seconds)
        if self._rich is None:
            text = f"  {_MARKS_PLAIN[result.status]:<6} {result.name:<{NAME_WIDTH}} {timing:>8}  {result.detail}"
            self.console.line(text.rstrip())
            return
        from rich.table import Table  # noqa: PLC0415 - only on terminals

        style = STYLES[_STATUS_STYLE[result.status]]
        row = Table.grid(padding=(0, 1))
        row.add_column(width=3, justify="right")
        row.add_column(width=NAME_WIDTH, no_wrap=True)
        row.add_column(width=8, justify="right", no_wrap=True)
        row.add_column(overflow="fold")
        row.add_row(_MARKS_TERMINAL[result.status], result.name, timing, result.detail,
                    style=style if result.status != OK else None)
        if result.status == OK:  # a green mark, the rest in the terminal's colour: easier to read
            row.columns[0].style = style
        self._rich.print(row)
