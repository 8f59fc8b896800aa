"""Every input is streamed: hashing a 200 MiB initrd keeps Python allocations and the process's peak RSS
far below 64 MiB, and files are never read whole; the read-ahead stream hashes every byte once, in order,
and reports read errors from its reader thread."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import pytest

from sevhook.errors import UsageError
from sevhook.sev.kernel_hashes import CHUNK_SIZE, KernelHashes, feed, feed_read_ahead, hash_boot_inputs
from sevhook.sev.launch_digest import sev_launch_digest

ROOT = Path(__file__).resolve().parents[2]
FIRMWARE = ROOT / "tests" / "data" / "vectors" / "sev-snp-measure" / "ovmf_AmdSev_suffix.bin"
INITRD_SIZE = 200 << 20
LIMIT = 64 << 20


def _sparse(path: Path, size: int) -> Path:
    with path.open("wb") as out:
        out.truncate(size)
        out.seek(size - 5)
        out.write(b"tail!")
    return path


def test_tracemalloc_peak_while_hashing_200_mib(tmp_path: Path) -> None:
    initrd = _sparse(tmp_path / "initrd", INITRD_SIZE)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k" * 3000)
    tracemalloc.start()
    try:
        digest = sev_launch_digest(FIRMWARE, kernel, initrd, "quiet")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * CHUNK_SIZE < LIMIT, f"peak {peak} bytes"
    expected_initrd = hashlib.sha256()
    zeros = bytes(CHUNK_SIZE)
    for _ in range(INITRD_SIZE // CHUNK_SIZE - 1):
        expected_initrd.update(zeros)
    expected_initrd.update(bytes(CHUNK_SIZE - 5) + b"tail!")
    assert KernelHashes.from_inputs(kernel, initrd, "quiet").initrd == expected_initrd.digest()
    assert len(digest) == 32


def test_cli_peak_rss_with_200_mib_initrd(tmp_path: Path) -> None:
    initrd = _sparse(tmp_path / "initrd", INITRD_SIZE)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(os.urandom(1 << 20))
    # VmHWM is the peak of this process's own memory map; ru_maxrss would include the (large) pytest parent's,
    # which Linux carries across exec.
    script = (
        "import sys\n"
        "from sevhook.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, "owner", "measure", "--mode", "snp", "--firmware", str(FIRMWARE),
         "--kernel", str(kernel), "--initrd", str(initrd), "--vcpus", "4", "--vcpu-type", "EPYC-Milan"],
        check=True, capture_output=True, text=True, cwd=ROOT)
    digest, max_rss_kib = result.stdout.split()
    assert len(bytes.fromhex(digest)) == 48
    assert int(max_rss_kib) * 1024 < LIMIT, f"peak RSS {max_rss_kib} KiB"


class _FailingStream(io.BytesIO):
    """A file whose reads fail after the first chunk, as a disk error would."""

    def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
        if self.tell():
            raise OSError(errno.EIO, "Input/output error")
        return super().readinto(buffer)


@pytest.mark.parametrize("size", [0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 3 * CHUNK_SIZE + 7])
def test_read_ahead_hashes_every_byte_once_in_order(size: int) -> None:
    data = os.urandom(size)
    for read_ahead in (False, True):
        hash_object = hashlib.sha256()
        (feed_read_ahead if read_ahead else feed)(hash_object, io.BytesIO(data), "initrd")
        assert hash_object.digest() == hashlib.sha256(data).digest()


def test_read_error_on_the_reader_thread_names_the_file() -> None:
    with pytest.raises(UsageError, match=r"reading initrd file /x failed: Input/output error"):
        feed_read_ahead(hashlib.sha256(), _FailingStream(bytes(2 * CHUNK_SIZE)), "initrd file /x")
    assert [thread.name for thread in threading.enumerate() if thread.name == "sevhook-read"] == []


@pytest.mark.parametrize("with_initrd", [False, True])
def test_boot_inputs_hashed_alongside_the_firmware_match_separate_hashes(tmp_path: Path, with_initrd: bool) -> None:
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd"
    kernel.write_bytes(os.urandom(CHUNK_SIZE + 3))
    initrd.write_bytes(os.urandom(2 * CHUNK_SIZE + 1))
    ran, hashes = hash_boot_inputs(kernel, initrd if with_initrd else None, "quiet", lambda: "firmware done")
    assert ran == "firmware done"
    assert hashes.kernel == hashlib.sha256(kernel.read_bytes()).digest()
    assert hashes.initrd == hashlib.sha256(initrd.read_bytes() if with_initrd else b"").digest()
    assert hashes.cmdline == hashlib.sha256(b"quiet\0").digest()


def test_unreadable_initrd_is_a_usage_error_naming_it(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    with pytest.raises(UsageError, match=r"cannot read initrd file .*missing"):
        hash_boot_inputs(kernel, tmp_path / "missing", None, lambda: None)
