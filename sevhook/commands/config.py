"""`sevhook config show`: the effective configuration and where each value came from."""

from __future__ import annotations

import argparse
import json
import os

EPILOG = """examples:
  sevhook config show
  sevhook config show --json
  SEVHOOK_CONFIG=/etc/sevhook/lab.toml sevhook config show

The file is /etc/sevhook/sevhook.toml unless $SEVHOOK_CONFIG names another. Its values are the
defaults of every command's options; a flag on the command line wins. Example:

  [broker]
  data-dir = "/var/lib/sevhook/broker"
  listen = "0.0.0.0:8700"
  database-url = "postgresql+psycopg://sevhook@db.example.org:5432/sevhook"
  password-file = "/etc/sevhook/db.password"

  [host]
  broker-url = "https://kbs.example.org:8700"
  token-file = "/etc/sevhook/host1.token"
  ca-file = "/etc/sevhook/kbs-ca.pem"
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "config", help="show sevhook's effective configuration (sevhook.toml)",
        description="sevhook reads its defaults from one TOML file with a [broker] and a [host] section.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    parser.set_defaults(func=lambda _args: (parser.print_help(), 2)[1])
    show = sub.add_parser("show", help="print every setting, its effective value and where it came from",
                          description="Print every setting, its effective value and where it came from "
                                      "(the built-in default, or FILE: section.key).",
                          epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    show.add_argument("--json", action="store_true",
                      help='print {"file", "settings": {NAME: {"value", "source", "meaning"}}}')
    show.set_defaults(func=run_show)


def _password_source(password_file: object) -> str:
    """Where the database password comes from; never the password itself."""
    from sevhook.config import DB_PASSWORD_ENV

    if password_file is not None:
        return f"file {password_file}"
    return f"${DB_PASSWORD_ENV}" if os.environ.get(DB_PASSWORD_ENV) else "none"


def run_show(args: argparse.Namespace) -> int:
    from sevhook import config

    settings = config.load()
    path, chosen = config.config_path()
    shown = {name: {"value": None if value.value is None else str(value.value), "source": value.source,
                    "meaning": config.SETTINGS[name].meaning}
             for name, value in settings.values.items()}
    password = _password_source(settings.get("broker.password-file"))
    if args.json:
        print(json.dumps({"file": str(settings.path) if settings.path else None, "settings": shown,
                          "database_password": password}, indent=2))
        return 0
    origin = f" (${config.CONFIG_ENV})" if chosen else ""
    print(f"file: {settings.path}{origin}" if settings.path else f"file: {path} (absent: built-in defaults)")
    values = {name: "-" if entry["value"] is None else entry["value"] for name, entry in shown.items()}
    width, value_width = max(map(len, values)), max(map(len, values.values()))
    for name, entry in shown.items():
        print(f"{name.ljust(width)}  {values[name].ljust(value_width)}  {entry['source']}")
    print(f"{'database password'.ljust(width)}  {password}")
    return 0
