"""Atomic file writes: key files, launch blobs, tokens and pidfiles must never be seen half-written
or with loose permissions, so every such file goes through one temp-file-and-rename routine."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from sevhook.errors import UsageError


class UnwritableFileError(UsageError):
    """A file could not be written (missing or read-only directory, a directory in the way, a
    pseudo-filesystem such as /proc): a choice of location the user makes, so a usage error."""

    def __init__(self, path: Path, error: OSError) -> None:
        self.path = path
        self.errno = error.errno
        self.reason = error.strerror or error.__class__.__name__
        super().__init__(f"{path}: cannot write ({self.reason}); choose a writable location")


def write_private_file(path: str | os.PathLike[str], data: bytes | str, mode: int = 0o600) -> Path:
    """Write `data` (str as UTF-8) to `path` atomically with `mode` (0600 unless the file is public).

    The temp file sits beside the target, gets its mode before any byte is written, is fsynced and
    then renamed over the target, so readers see the old file or the whole new one, never a mix; on
    any failure the temp file is removed. An OSError becomes UnwritableFileError (naming the path,
    chained to the OSError), so no caller can let a traceback reach the user."""
    target = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise UnwritableFileError(target, exc) from exc
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        if isinstance(exc, OSError):
            raise UnwritableFileError(target, exc) from exc
        raise
    return target
