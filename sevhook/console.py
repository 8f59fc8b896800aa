"""Terminal output shared by the user-facing commands: rich colour on a terminal, plain lines
otherwise, so that logs and pipes stay greppable."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, TextIO

from sevhook.errors import SevhookError, cause_chain, raised_at, type_name

if TYPE_CHECKING:
    import argparse

DEBUG_ENV = "SEVHOOK_DEBUG"
STYLES = {"ok": "green", "warn": "yellow", "fail": "bold red", "info": "cyan", "step": "bold"}


class Console:
    """Prints status lines; colour and markup only when the stream is a terminal."""

    def __init__(self, stream: TextIO | None = None, color: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.color = self.stream.isatty() if color is None else color
        self._rich = None
        if self.color:
            from rich.console import Console as RichConsole  # noqa: PLC0415 - only on terminals

            self._rich = RichConsole(file=self.stream, highlight=False)

    def line(self, text: str, status: str | None = None) -> None:
        """One line; `status` (ok/warn/fail/info/step) colours the text on a terminal."""
        if self._rich is not None:
            from rich.text import Text  # noqa: PLC0415 - only on terminals

            self._rich.print(Text(text, style=STYLES.get(status or "", "")))
        else:
            print(text, file=self.stream, flush=True)

    def table(self, headers: list[str], rows: list[list[str]], statuses: list[str] | None = None) -> None:
        if self._rich is not None:
            from rich.table import Table  # noqa: PLC0415 - only on terminals

            table = Table(*headers)
            for i, row in enumerate(rows):
                table.add_row(*row, style=STYLES.get(statuses[i], "") if statuses else "")
            self._rich.print(table)
            return
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(), file=self.stream)
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip(), file=self.stream)
        self.stream.flush()


def debug_requested(args: argparse.Namespace) -> bool:
    """`sevhook --debug` or SEVHOOK_DEBUG set to anything but empty or 0."""
    return bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def report_error(error: SevhookError, debug: bool, stream: TextIO | None = None) -> None:
    """The one-line error every command ends with; with debug, what caused it underneath: the error's
    own type and place, then each cause, innermost last (messages only, never a traceback)."""
    out = stream or sys.stderr
    print(f"sevhook: error: {error.message}", file=out)
    if not debug:
        return
    print(f"sevhook: debug: raised as {type_name(error)} ({raised_at(error)})", file=out)
    causes = cause_chain(error)
    for line in causes:
        print(f"sevhook: debug: caused by {line}", file=out)
    if not causes:
        print("sevhook: debug: no underlying cause was recorded", file=out)
