"""Helpers the command families share (this is not a family itself: it registers no command)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing, a cost every command start would pay
if TYPE_CHECKING:
    from pathlib import Path


def number_type(what: str) -> Callable[[str], int]:
    """An argparse type: a non-negative decimal or 0x-hex number, so a bad one is a usage error (exit 2) from
    argparse, which names the option, like any other bad option value."""

    def convert(text: str) -> int:
        from sevhook.errors import SevhookError  # noqa: PLC0415
        from sevhook.sev.policy import parse_number  # noqa: PLC0415

        try:
            value = parse_number(text, what)
        except SevhookError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number (use decimal or 0x-hex)") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"{text!r} is negative; {what} takes 0 or more")
        return value

    return convert


MAX_INPUT_BYTES = 1 << 20
"""The most read_input accepts: certificates, chains, keys and secrets are a few KiB, so anything larger
(or endless, like /dev/zero) is the wrong file, refused instead of read into memory forever."""


def read_input(path: str | Path, what: str, limit: int = MAX_INPUT_BYTES) -> bytes:
    """A whole (small) input file; an unreadable, special or oversized one is a usage error naming the option and
    the path. Pipes such as `<(command)` work (sevhook.files.read_input_file)."""
    from sevhook.files import read_input_file  # noqa: PLC0415

    return read_input_file(path, limit, what)
