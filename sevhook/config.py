"""sevhook's one configuration file, /etc/sevhook/sevhook.toml (or $SEVHOOK_CONFIG): the defaults of
every command's options, so a host or a broker is described once instead of on every command line.

Pure: `load` reads one TOML file and validates it; nothing here opens a database or a socket. Each
value remembers where it came from (the built-in default, the file and key, or later a flag), which
`sevhook config show` prints."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sevhook.errors import UsageError

DEFAULT_PATH = Path("/etc/sevhook/sevhook.toml")
MODES = ("emulator", "hook", "start")  # who attests a domain's starts: sevhook-qemu, the hook, `sevhook start`
DB_PASSWORD_ENV = "SEVHOOK_DB_PASSWORD"  # the database password, when no password-file names it
CONFIG_ENV = "SEVHOOK_CONFIG"


def _default_data_dir() -> Path:
    """Root's broker lives in /var/lib; an unprivileged owner's in their XDG data directory."""
    if os.geteuid() == 0:
        return Path("/var/lib/sevhook/broker")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "sevhook" / "broker"


def _path(text: str, where: str) -> Path:
    if not text or "\0" in text:
        raise UsageError(f"{where}: give a file or directory path")
    return Path(text)


def _absolute_path(text: str, where: str) -> Path:
    path = _path(text, where)
    if not path.is_absolute():
        raise UsageError(f"{where}: {text!r} is relative; give an absolute path (the file is read from any directory)")
    return path


def _http_url(text: str, where: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"{where}: {text!r} is not an http:// or https:// URL")
    return text.rstrip("/")


def _kds_url(text: str, where: str) -> str:
    """AMD's KDS, a mirror, or `none` for an air-gapped broker (signed CEKs then come from add-cek)."""
    return text if text == "none" else _http_url(text, where)


def _mode(text: str, where: str) -> str:
    if text not in MODES:
        raise UsageError(f"{where}: {text!r}: choose one of {', '.join(MODES)} (docs/emulator.md)")
    return text


def _database_url(text: str, where: str) -> str:
    scheme, sep, rest = text.partition("://")
    if not sep or not scheme or (not rest and scheme != "sqlite"):
        raise UsageError(f"{where}: {text!r} is not a database URL (sqlite:///PATH or "
                         "postgresql+psycopg://USER@HOST:PORT/DB)")
    if ":" in rest.partition("@")[0] and "@" in rest:
        raise UsageError(f"{where}: the URL holds a password; put it in the file named by password-file "
                         "(or $SEVHOOK_DB_PASSWORD) instead, so it never shows in a process list")
    return text


def _listen(text: str, where: str) -> str:
    _host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"{where}: {text!r}: use ADDR:PORT, e.g. 127.0.0.1:8700 or [::1]:8700")
    return text


@dataclass(frozen=True)
class Setting:
    """One key of the file: its section, name, how its text is checked, its built-in default and meaning."""

    section: str
    key: str
    convert: Callable[[str, str], Any]
    default: Callable[[], Any]
    meaning: str

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"


SETTINGS = {setting.name: setting for setting in (
    Setting("broker", "data-dir", _absolute_path, _default_data_dir,
            "the broker's data directory: storage key, admin token, SQLite file, TLS files"),
    Setting("broker", "listen", _listen, lambda: "127.0.0.1:8700", "ADDR:PORT the broker serves on"),
    Setting("broker", "tls-cert", _absolute_path, lambda: None,
            "server certificate (default: DATA_DIR/tls/server.crt when `broker init --tls` made it)"),
    Setting("broker", "tls-key", _absolute_path, lambda: None, "server private key (as tls-cert)"),
    Setting("broker", "kds-url", _kds_url, lambda: "https://kdsintf.amd.com",
            "AMD's key distribution service for signed CEKs, or none (air-gapped)"),
    Setting("broker", "database-url", _database_url, lambda: None,
            "database URL without a password (default sqlite:///DATA_DIR/broker.sqlite3)"),
    Setting("broker", "password-file", _absolute_path, lambda: None,
            "file holding the database password ($SEVHOOK_DB_PASSWORD otherwise)"),
    Setting("host", "broker-url", _http_url, lambda: None, "the guest owner's key broker"),
    Setting("host", "token-file", _absolute_path, lambda: None, "this host's bearer token file"),
    Setting("host", "ca-file", _absolute_path, lambda: None, "the CA that signed the broker's TLS certificate"),
    Setting("host", "mode", _mode, lambda: "emulator",
            "the mode prepare-domain gives a domain: emulator, hook or start"),
    Setting("host", "platform-export", _absolute_path, lambda: None,
            "directory (or file) with this host's exported PDH and certificate chain"),
)}


@dataclass(frozen=True)
class Value:
    """An effective value and where it came from: 'default', 'FILE: section.key' or 'flag --x'."""

    value: Any
    source: str


@dataclass(frozen=True)
class Config:
    """The effective settings; `path` is the file read (None when there was none)."""

    path: Path | None
    values: Mapping[str, Value]

    def get(self, name: str) -> Any:
        return self.values[name].value

    def source(self, name: str) -> str:
        return self.values[name].source


def config_path(environ: Mapping[str, str] = os.environ) -> tuple[Path, bool]:
    """The file to read and whether the user chose it ($SEVHOOK_CONFIG); a chosen file must exist."""
    chosen = environ.get(CONFIG_ENV)
    return (Path(chosen), True) if chosen else (DEFAULT_PATH, False)


def load(path: Path | None = None, environ: Mapping[str, str] = os.environ) -> Config:
    """The effective configuration: built-in defaults overlaid with the file's values. A missing
    default file is fine (every value is then the default); a missing chosen file, unreadable TOML,
    an unknown section or key, or a bad value is a UsageError naming FILE and the key."""
    required = path is not None
    if path is None:
        path, required = config_path(environ)
    values = {name: Value(setting.default(), "default") for name, setting in SETTINGS.items()}
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        if required:
            raise UsageError(f"{path}: configuration file not found (${CONFIG_ENV} names it); create it or "
                             f"unset {CONFIG_ENV}") from exc
        return Config(None, values)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the configuration ({exc.strerror}); fix its permissions") from exc
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8 TOML") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML ({exc}); see docs/quickstart.md for an example") from exc
    for section, table in document.items():
        if not isinstance(table, dict) or section not in ("broker", "host"):
            raise UsageError(f"{path}: [{section}]: unknown section; sevhook.toml has [broker] and [host]")
        for key, text in table.items():
            name = f"{section}.{key}"
            where = f"{path}: {name}"
            setting = SETTINGS.get(name)
            if setting is None:
                known = ", ".join(s.key for s in SETTINGS.values() if s.section == section)
                raise UsageError(f"{where}: unknown key; [{section}] takes {known}")
            if not isinstance(text, str):
                raise UsageError(f"{where}: give a string (in quotes), not {type(text).__name__}")
            values[name] = Value(setting.convert(text, where), f"{path}: {name}")
    return Config(path, values)
