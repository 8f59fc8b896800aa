"""One module per `sevhook` subcommand family. Each exposes `register(subparsers)`, which adds its
parsers and sets `func` to a handler `(args) -> int`. Handlers import heavy modules lazily so that
`sevhook --help` and the hook's fast path stay cheap."""

# top-level command -> the module that registers it (one module may register several)
COMMANDS = {
    "validate": "validate",
    "cmdline": "cmdline",
    "owner": "owner",
    "sim": "sim",
    "platform": "platform",
    "broker": "broker",
    "hook": "hook",
    "prepare-domain": "hook",
    "start": "start",
    "demo": "demo",
    "doctor": "doctor",
    "config": "config",
    "status": "status",
    "completion": "completion",
}
