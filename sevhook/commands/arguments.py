"""Helpers the command families share (this is not a family itself: it registers no command)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing, a cost every command start would pay
if TYPE_CHECKING:
    from pathlib import Path


def number_type(what: str) -> Callable[[str], int]:
    """An argparse type: decimal or 0x-hex, with a usage error naming the option."""

    def convert(text: str) -> int:
        from sevhook.errors import SevhookError  # noqa: PLC0415
        from sevhook.sev.policy import parse_number  # noqa: PLC0415

        try:
            return parse_number(text, what)
        except SevhookError as exc:
            raise argparse.ArgumentTypeError(exc.message) from None

    return convert


def read_input(path: str | Path, what: str) -> bytes:
    """A whole input file; an unreadable one is a usage error naming the option and the path."""
    from sevhook.errors import UsageError  # noqa: PLC0415

    try:
        with open(path, "rb") as stream:
            return stream.read()
    except OSError as exc:
        raise UsageError(f"{what} {path}: cannot read it ({exc.strerror})") from None
