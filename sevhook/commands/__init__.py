"""One module per `sevhook` subcommand family. Each exposes `register(subparsers)`, which adds its
parsers and sets `func` to a handler `(args) -> int`. Handlers import heavy modules lazily so that
`sevhook --help` and the hook's fast path stay cheap."""

COMMAND_MODULES = (
    "validate",
    "cmdline",
    "owner",
    "sim",
    "broker",
    "hook",
    "start",
    "demo",
    "doctor",
)
