"""Atomic file writes: key files, launch blobs, tokens and pidfiles must never be seen half-written
or with loose permissions, so every such file goes through one temp-file-and-rename routine."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_private_file(path: str | os.PathLike[str], data: bytes | str, mode: int = 0o600) -> Path:
    """Write `data` (str as UTF-8) to `path` atomically with `mode` (0600 unless the file is public).

    The temp file sits beside the target, gets its mode before any byte is written, is fsynced and
    then renamed over the target, so readers see the old file or the whole new one, never a mix; on
    any failure the temp file is removed and the error propagates."""
    target = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    return target
