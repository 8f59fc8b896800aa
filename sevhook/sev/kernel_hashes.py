"""The kernel-hashes table QEMU writes into guest memory for measured direct boot (-kernel/-initrd/-append
with an AmdSev OVMF), and the streamed file hashing it and the launch digests are built from.

Wire format (all little-endian, GUIDs in `uuid.bytes_le` order): a header `GUID ‖ u16 168` followed by three
entries `GUID ‖ u16 50 ‖ SHA-256` for the command line, the initrd and the kernel, zero-padded from 168 to
176 bytes; all 176 bytes are measured. SNP measures the whole 4 KiB page holding the table."""

from __future__ import annotations

import hashlib
import queue
import struct
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from sevhook.errors import FormatError, UsageError
from sevhook.sev.inputs import BinaryInput, input_name, open_input

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing, a cost every command start would pay
if TYPE_CHECKING:
    from typing import BinaryIO, TypeVar

    _First = TypeVar("_First")
    _Second = TypeVar("_Second")

CHUNK_SIZE = 1 << 20
"""Bytes read per step when hashing a file: big enough for full hashing speed, small enough to stay in the cache."""
READ_AHEAD_CHUNKS = 2
"""Chunk buffers of a read-ahead stream: one is hashed while the reader thread fills the other."""

TABLE_GUID = uuid.UUID("9438d606-4f22-4cc9-b479-a793d411fd21")
CMDLINE_GUID = uuid.UUID("97d02dd8-bd20-4c94-aa78-e7714d36ab2a")
INITRD_GUID = uuid.UUID("44baf731-3a2f-4bd7-9af1-41e29169781d")
KERNEL_GUID = uuid.UUID("4de79437-abd2-427f-b835-d5b172d2045b")

_ENTRY = struct.Struct("<16sH32s")
_HEADER = struct.Struct("<16sH")
TABLE_LENGTH = _HEADER.size + 3 * _ENTRY.size  # 168, the value of the header's length field
TABLE_SIZE = (TABLE_LENGTH + 15) & ~15  # 176, what QEMU writes and the firmware measures
PAGE_SIZE = 4096
EMPTY_SHA256 = hashlib.sha256(b"").digest()


def feed(hash_object: hashlib._Hash, stream: BinaryIO, name: str, size: int = CHUNK_SIZE) -> None:
    """Hash a stream into `hash_object` in chunks (constant memory; `size`, when known, saves a big buffer
    for a small input)."""
    buffer = bytearray(max(1, min(size, CHUNK_SIZE)))
    view = memoryview(buffer)
    try:
        while count := stream.readinto(buffer):
            hash_object.update(view[:count])
    except OSError as exc:
        raise UsageError(f"reading {name} failed: {exc.strerror or exc}") from exc


def feed_read_ahead(hash_object: hashlib._Hash, stream: BinaryIO, name: str) -> None:
    """Like `feed`, but a reader thread copies the next chunk out of the page cache while this thread hashes
    the last one (file reads and large hashlib updates both release the GIL), so a large input is hashed at the
    speed of SHA-256 alone instead of SHA-256 plus the copy. Memory: READ_AHEAD_CHUNKS buffers."""
    empty: queue.SimpleQueue[bytearray | None] = queue.SimpleQueue()
    filled: queue.SimpleQueue[tuple[bytearray, int] | BaseException] = queue.SimpleQueue()
    for _ in range(READ_AHEAD_CHUNKS):
        empty.put(bytearray(CHUNK_SIZE))

    def read() -> None:
        try:
            while (buffer := empty.get()) is not None:
                count = stream.readinto(buffer)
                filled.put((buffer, count))
                if not count:
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the hashing thread, which raises it
            filled.put(exc)

    reader = threading.Thread(target=read, name="sevhook-read", daemon=True)
    reader.start()
    try:
        while True:
            item = filled.get()
            if isinstance(item, OSError):
                raise UsageError(f"reading {name} failed: {item.strerror or item}") from item
            if isinstance(item, BaseException):
                raise item
            buffer, count = item
            if not count:
                return
            with memoryview(buffer) as view:
                hash_object.update(view[:count])
            empty.put(buffer)
    finally:
        empty.put(None)  # stops the reader if it still waits for a buffer
        reader.join()


def hash_input(source: BinaryInput, what: str, read_ahead: bool = False) -> bytes:
    """SHA-256 of a whole file or byte string, streamed (`read_ahead`: see feed_read_ahead; for the largest
    input, on a thread of its own)."""
    if isinstance(source, bytes):
        return hashlib.sha256(source).digest()
    hash_object = hashlib.sha256()
    with open_input(source, what) as (stream, size):
        if read_ahead:
            feed_read_ahead(hash_object, stream, input_name(source, what))
        else:
            feed(hash_object, stream, input_name(source, what), size)
    return hash_object.digest()


def run_concurrently(first: Callable[[], _First], second: Callable[[], _Second]) -> tuple[_First, _Second]:
    """Run `first` on the calling thread and `second` on a worker: hashlib releases the GIL while it hashes a
    chunk, so the two run on separate cores. Errors from either job propagate."""
    results: list[_Second] = []
    errors: list[BaseException] = []

    def run_second() -> None:
        try:
            results.append(second())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread below
            errors.append(exc)

    worker = threading.Thread(target=run_second, name="sevhook-hash", daemon=True)
    worker.start()
    try:
        result = first()
    finally:
        worker.join()
    if errors:
        raise errors[0]
    return result, results[0]


def hash_boot_inputs(
    kernel: BinaryInput, initrd: BinaryInput | None, cmdline: str | bytes | None, first: Callable[[], _First]
) -> tuple[_First, KernelHashes]:
    """Run `first` (the firmware's hashing) and hash the boot inputs alongside it, as fast as two cores allow:
    the largest input (the initrd, else the kernel) streams with read-ahead on a worker thread, since its
    SHA-256 is the critical path, while the calling thread runs `first` and then hashes the kernel."""
    command_line = hashlib.sha256(cmdline_bytes(cmdline)).digest()
    if initrd is None:
        result, kernel_digest = run_concurrently(first, lambda: hash_input(kernel, "kernel", read_ahead=True))
        return result, KernelHashes(command_line, EMPTY_SHA256, kernel_digest)
    (result, kernel_digest), initrd_digest = run_concurrently(
        lambda: (first(), hash_input(kernel, "kernel")), lambda: hash_input(initrd, "initrd", read_ahead=True))
    return result, KernelHashes(command_line, initrd_digest, kernel_digest)


def cmdline_bytes(cmdline: str | bytes | None) -> bytes:
    """The bytes QEMU hashes for -append: the command line and its terminating NUL (just the NUL if none)."""
    if cmdline is None:
        return b"\0"
    raw = cmdline.encode("utf-8") if isinstance(cmdline, str) else cmdline
    if b"\0" in raw:
        raise UsageError("the kernel command line must not contain a NUL character")
    return raw + b"\0"


@dataclass(frozen=True)
class KernelHashes:
    """The three SHA-256 values of the table; the table and page are serialized from them."""

    cmdline: bytes
    initrd: bytes
    kernel: bytes

    def __post_init__(self) -> None:
        for what in ("cmdline", "initrd", "kernel"):
            if len(getattr(self, what)) != 32:
                raise FormatError(f"kernel-hashes table: the {what} hash must be 32 bytes")

    @classmethod
    def from_inputs(
        cls, kernel: BinaryInput, initrd: BinaryInput | None = None, cmdline: str | bytes | None = None
    ) -> KernelHashes:
        """Hash the boot inputs as QEMU does (no initrd hashes as the empty string)."""
        return hash_boot_inputs(kernel, initrd, cmdline, lambda: None)[1]

    def to_bytes(self) -> bytes:
        """The 176-byte table."""
        table = _HEADER.pack(TABLE_GUID.bytes_le, TABLE_LENGTH)
        for guid, digest in ((CMDLINE_GUID, self.cmdline), (INITRD_GUID, self.initrd), (KERNEL_GUID, self.kernel)):
            table += _ENTRY.pack(guid.bytes_le, _ENTRY.size, digest)
        return table.ljust(TABLE_SIZE, b"\0")

    def page(self, offset: int) -> bytes:
        """The 4 KiB page SNP measures: zeros with the table at `offset` (the table GPA's offset in its page)."""
        if not 0 <= offset <= PAGE_SIZE - TABLE_SIZE:
            raise FormatError(
                f"the firmware puts the kernel-hashes table at page offset {offset:#x}, where 176 bytes do not fit"
            )
        return bytes(offset) + self.to_bytes() + bytes(PAGE_SIZE - offset - TABLE_SIZE)

    def describe(self) -> str:
        """The three hashes in table order, for --explain (shows which boot input differs)."""
        return f"cmdline {self.cmdline.hex()}, initrd {self.initrd.hex()}, kernel {self.kernel.hex()}"

    @classmethod
    def parse(cls, data: bytes) -> KernelHashes:
        """Read a table (as dumped from guest memory) back; every GUID and length must be the expected one."""
        if len(data) not in (TABLE_LENGTH, TABLE_SIZE):
            raise FormatError(f"kernel-hashes table: {len(data)} bytes, expected {TABLE_SIZE}")
        guid, length = _HEADER.unpack_from(data)
        if guid != TABLE_GUID.bytes_le or length != TABLE_LENGTH:
            raise FormatError(f"kernel-hashes table: header is not GUID {TABLE_GUID} with length {TABLE_LENGTH}")
        digests = []
        for index, expected in enumerate((CMDLINE_GUID, INITRD_GUID, KERNEL_GUID)):
            guid, length, digest = _ENTRY.unpack_from(data, _HEADER.size + index * _ENTRY.size)
            if guid != expected.bytes_le or length != _ENTRY.size:
                raise FormatError(f"kernel-hashes table: entry {index} is not GUID {expected} with length 50")
            digests.append(digest)
        if any(data[TABLE_LENGTH:]):
            raise FormatError("kernel-hashes table: the padding after byte 168 is not zero")
        return cls(*digests)


def kernel_hashes_table(
    kernel: BinaryInput, initrd: BinaryInput | None = None, cmdline: str | bytes | None = None
) -> bytes:
    """The 176-byte table QEMU builds for these boot inputs."""
    return KernelHashes.from_inputs(kernel, initrd, cmdline).to_bytes()
