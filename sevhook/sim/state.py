"""The simulated platform's state directory: keys, certificates, configuration and what each guest
received. Created once (mode 0700) and reused by every process; writes are atomic (temp file +
os.replace), key and secret files are 0600, and a lock file serialises initialisation and handles."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from sevhook.errors import SevhookError, UsageError
from sevhook.files import write_private_file

DEFAULT_STATE_DIR = Path("/var/lib/sevhook/sim")
STATE_DIR_ENV = "SEVHOOK_SIM_DIR"


def default_state_dir() -> Path:
    """$SEVHOOK_SIM_DIR, else /var/lib/sevhook/sim (libvirt starts QEMU with a clean environment)."""
    value = os.environ.get(STATE_DIR_ENV)
    return Path(value) if value else DEFAULT_STATE_DIR


class StateDir:
    """One state directory. Nothing is written until `ensure()`."""

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path is not None else default_state_dir()

    def __repr__(self) -> str:
        return f"StateDir({str(self.path)!r})"

    @property
    def guests_dir(self) -> Path:
        return self.path / "guests"

    def ensure(self) -> None:
        """Create the directory (0700) if needed; refuse one that others can read or write."""
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.guests_dir.mkdir(mode=0o700, exist_ok=True)
            info = self.path.stat()
        except OSError as exc:
            raise UsageError(f"state directory {self.path}: {exc.strerror}; pick another with --state-dir "
                             f"or ${STATE_DIR_ENV}") from exc
        if not stat.S_ISDIR(info.st_mode):
            raise UsageError(f"state directory {self.path} is not a directory")
        if info.st_mode & 0o077:
            raise UsageError(
                f"state directory {self.path} has mode {stat.S_IMODE(info.st_mode):04o}: it holds the simulated "
                f"platform's private keys, so it must be private (chmod 700 {self.path})"
            )

    def file(self, name: str) -> Path:
        return self.path / name

    def exists(self, name: str) -> bool:
        return self.file(name).exists()

    def read_bytes(self, name: str) -> bytes:
        try:
            return self.file(name).read_bytes()
        except FileNotFoundError as exc:
            raise SevhookError(
                f"{self.file(name)} is missing: the simulated platform in {self.path} is not initialised "
                "(run `sevhook sim platform init`)"
            ) from exc
        except OSError as exc:
            raise SevhookError(f"{self.file(name)}: {exc.strerror}") from exc

    def write_private(self, name: str, data: bytes) -> Path:
        """Atomic write, mode 0600."""
        return write_private_file(self.file(name), data)

    def read_json(self, name: str) -> dict:
        text = self.read_bytes(name)
        try:
            value = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SevhookError(f"{self.file(name)}: not valid JSON ({exc}); delete it and re-initialise") from exc
        if not isinstance(value, dict):
            raise SevhookError(f"{self.file(name)}: expected a JSON object")
        return value

    def write_json(self, name: str, value: dict) -> Path:
        return self.write_private(name, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """An exclusive lock over the directory (initialisation, handle allocation)."""
        self.ensure()
        fd = os.open(self.file(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
