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
        from sevhook.errors import SevhookError
        from sevhook.sev.policy import parse_number

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
    from sevhook.files import read_input_file

    return read_input_file(path, limit, what)


CONFIG_DESTS = "_config_dests"
CONFIG_SOURCES = "_config_sources"


def config_defaults(parser: argparse.ArgumentParser, *, required: tuple[str, ...] = (), **settings: str) -> None:
    """Take these options' defaults from sevhook.toml: `dest="section.key"`. A flag on the command line
    wins; an option in `required` must then come from the flag or the file. Its argparse default must be
    None, so "not given" can be told from "given" (`apply_config` fills it after parsing)."""
    flags: dict[str, tuple[str, str, bool, list[str]]] = {}
    for dest, name in settings.items():
        action = next((a for a in parser._actions if a.dest == dest), None)
        if action is None or action.default is not None:
            raise ValueError(f"config_defaults: {parser.prog} has no option {dest!r} with default None")
        # an option in a mutually exclusive group is not filled in when another member was given
        rivals = [a.dest for group in parser._mutually_exclusive_groups if action in group._group_actions
                  for a in group._group_actions if a is not action]
        flag = max(action.option_strings, key=len) if action.option_strings else dest
        flags[dest] = (name, flag, dest in required, rivals)
    parser.set_defaults(**{CONFIG_DESTS: {**(parser.get_default(CONFIG_DESTS) or {}), **flags}})


def apply_config(args: argparse.Namespace) -> None:
    """Fill in the options a command takes from sevhook.toml and that were not given; record each
    value's source in args._config_sources (for messages that say where a value came from). Loads the
    file only for commands that use it."""
    flags = getattr(args, CONFIG_DESTS, None)
    if not flags:
        return
    from sevhook import config  # tomllib: only for commands that take configured options

    settings = config.load()
    sources: dict[str, str] = {}
    for dest, (name, flag, required, rivals) in flags.items():
        if getattr(args, dest) is not None:
            sources[dest] = f"flag {flag}"
            continue
        if any(getattr(args, rival, None) not in (None, False) for rival in rivals):
            continue
        value = settings.get(name)
        setattr(args, dest, value)
        if value is None and required:
            from sevhook.errors import UsageError

            section, key = name.split(".")
            where = settings.path or config.config_path()[0]
            raise UsageError(f"{flag} is required: give it, or set {key} in the [{section}] section of {where}")
        sources[dest] = settings.source(name)
    setattr(args, CONFIG_SOURCES, sources)
