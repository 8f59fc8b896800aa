"""The `sevhook` command: argparse subcommands, each a few lines over the packages."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from sevhook import __version__
from sevhook.commands import COMMAND_MODULES
from sevhook.errors import SevhookError


class _Parser(argparse.ArgumentParser):
    """argparse that exits with 2 and one line on usage errors, as the rest of the CLI does."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sevhook",
        description="Attested launch of AMD SEV guests on libvirt.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sevhook {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"sevhook.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"sevhook.commands.{name}":
                continue  # a command family that is not built yet
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except SevhookError as exc:
        print(f"sevhook: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("sevhook: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
