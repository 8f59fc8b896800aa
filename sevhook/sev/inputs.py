"""Binary inputs of the measurement and firmware readers (a path, or the bytes themselves), opened only
when they are regular files. A module of its own so that readers of a firmware's footer (the hook, at
every attested start) do not load the streaming hashers of kernel_hashes."""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from sevhook.errors import UsageError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing, a cost every command start would pay
if TYPE_CHECKING:
    from typing import BinaryIO

BinaryInput = str | os.PathLike[str] | bytes
"""A path to a file, or the bytes themselves (tests, small inputs)."""


def input_name(source: BinaryInput, what: str) -> str:
    """How to name an input in messages."""
    if isinstance(source, bytes):
        return f"{what} ({len(source)} bytes given in memory)"
    return f"{what} file {os.fspath(source)}"


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
)


def _open_regular_file(path: str, what: str) -> BinaryIO:
    """Open `path` only if it is a regular file: a launch input is measured whole, so a device, pipe or
    directory (e.g. /dev/zero, which never ends) is refused up front. O_NONBLOCK keeps a FIFO without a
    writer from blocking the open; the check itself uses the opened descriptor, so nothing can swap the file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"cannot read {what} file {path}: {exc.strerror or exc}; check the path") from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
            raise UsageError(f"{what} file {path} is {kind}: give a regular file holding the {what} itself")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


@contextmanager
def open_input(source: BinaryInput, what: str) -> Iterator[tuple[BinaryIO, int]]:
    """Open a path (or wrap bytes) for reading, yielding the stream and its size; unreadable files and
    anything but a regular file become a UsageError that names the file."""
    if isinstance(source, bytes):
        yield io.BytesIO(source), len(source)
        return
    path = os.fspath(source)
    with _open_regular_file(path, what) as stream:
        try:
            size = os.fstat(stream.fileno()).st_size
        except OSError as exc:
            raise UsageError(f"cannot read {what} file {path}: {exc.strerror or exc}") from exc
        with suppress(OSError):  # a hint for the kernel's read-ahead from disk; pipes and odd files do without
            os.posix_fadvise(stream.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        yield stream, size
