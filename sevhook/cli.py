"""The `sevhook` command: argparse subcommands, each a few lines over the packages."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from sevhook import __version__
from sevhook.commands import COMMANDS
from sevhook.commands.arguments import apply_config
from sevhook.console import DEBUG_ENV, debug_requested, report_error
from sevhook.errors import SevhookError


class _Parser(argparse.ArgumentParser):
    """argparse that exits with 2 and one line on usage errors, as the rest of the CLI does."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or only the family of `command` when it is known (every other family's
    module then stays unimported, which keeps each invocation fast)."""
    parser = _Parser(
        prog="sevhook",
        description="Attested launch of AMD SEV guests on libvirt.",
        epilog="Run `sevhook COMMAND --help` for each command's options and examples.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sevhook {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"on an error, also print what caused it: each cause's type, message and where it was raised "
        f"(no traceback, no values); or set {DEBUG_ENV}=1",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    modules = [COMMANDS[command]] if command in COMMANDS else dict.fromkeys(COMMANDS.values())
    for name in modules:
        importlib.import_module(f"sevhook.commands.{name}").register(subparsers)
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand named in argv (its first non-option word), if any."""
    return next((word for word in argv if not word.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command_of(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        apply_config(args)
        return int(args.func(args) or 0)
    except SevhookError as exc:
        report_error(exc, debug_requested(args))
        return exc.exit_code
    except KeyboardInterrupt:
        print("sevhook: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
