"""Files sevhook writes and reads. Writes are atomic: key files, launch blobs, tokens and pidfiles
must never be seen half-written or with loose permissions, so every such file goes through one
temp-file-and-rename routine. Reads of user-given inputs are bounded: every input file goes through
one reader that refuses what is too large before reading it and never blocks on a FIFO or device."""

from __future__ import annotations

import contextlib
import os
import select
import stat
import time
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
    temp = target.with_name(f".{target.name}.{os.urandom(8).hex()}.tmp")
    try:  # what tempfile.mkstemp does, without its imports (shutil, bz2, lzma) on the hook's path
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
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


PIPE_WAIT_SECONDS = 10.0
"""How long a pipe, FIFO or device given as an input may take to deliver all of it: `<(pass show
key)` works, and a named FIFO nobody writes to is refused instead of blocking the command forever."""


class InputFileError(UsageError):
    """A user-given input file that cannot be used: missing, unreadable, special, or too large
    (`too_large`, so that a caller can say what size it expected instead)."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


def read_input_file(path: str | os.PathLike[str], limit: int, what: str, *, regular_only: bool = False) -> bytes:
    """The whole content of an input file, at most `limit` bytes, read without ever blocking for good.

    The file is opened non-blocking (a FIFO without a writer does not hang the open), a directory
    is refused, a regular file larger than `limit` is refused from its size before any byte is read,
    and anything else (a pipe, a FIFO, a device such as /dev/zero) is read as a stream of at most
    `limit` + 1 bytes that must end within PIPE_WAIT_SECONDS, unless `regular_only` refuses it at once
    (for files read again later, such as the token file the hook reads at every start). Every refusal
    names `what` (may be empty) and the path, in one line."""
    name = f"{what} {os.fspath(path)}" if what else os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise InputFileError(f"{name}: cannot read it ({exc.strerror or exc})") from exc
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise InputFileError(f"{name}: is a directory, not a regular file; give a file")
        if regular_only and not stat.S_ISREG(info.st_mode):
            raise InputFileError(f"{name}: is {_kind(info.st_mode)}, not a regular file; give a regular file")
        if stat.S_ISREG(info.st_mode) and info.st_size > limit:
            raise InputFileError(_too_large(name, limit), too_large=True)
        data = _read_bounded(fd, limit, regular=stat.S_ISREG(info.st_mode))
    except TimeoutError as exc:  # an OSError too: first
        raise InputFileError(f"{name}: {_kind(info.st_mode)} that did not deliver all of its input within "
                             f"{PIPE_WAIT_SECONDS:g} s (a FIFO nobody writes to?); give a regular file") from exc
    except OSError as exc:
        raise InputFileError(f"{name}: cannot read it ({exc.strerror or exc})") from exc
    finally:
        os.close(fd)
    if len(data) > limit:
        raise InputFileError(_too_large(name, limit), too_large=True)
    return data


def _read_bounded(fd: int, limit: int, *, regular: bool) -> bytes:
    """Read until end of file or `limit` + 1 bytes; a non-regular file is polled, and TimeoutError is
    raised when it has not ended by PIPE_WAIT_SECONDS."""
    chunks: list[bytes] = []
    wanted = limit + 1
    end = time.monotonic() + PIPE_WAIT_SECONDS
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while wanted > 0:
        if not regular:
            left = end - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise TimeoutError
        try:
            chunk = os.read(fd, min(wanted, 1 << 20))
        except BlockingIOError:
            continue  # woken without data (another reader took it): poll again
        if not chunk:
            break
        chunks.append(chunk)
        wanted -= len(chunk)
    return b"".join(chunks)


def _too_large(name: str, limit: int) -> str:
    size = f"{limit >> 20} MiB" if limit >= 1 << 20 and not limit % (1 << 20) else f"{limit} bytes"
    return f"{name}: larger than the {size} limit for this input; check that it is the right file"


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a pipe (FIFO)"
    if stat.S_ISCHR(mode):
        return "a character device"
    return "a special file"
