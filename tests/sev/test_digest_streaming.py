"""Every input is streamed: hashing a 200 MiB initrd keeps Python allocations and the process's peak RSS
far below 64 MiB, and files are never read whole."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

from sevhook.sev.kernel_hashes import CHUNK_SIZE, KernelHashes
from sevhook.sev.launch_digest import sev_launch_digest

ROOT = Path(__file__).resolve().parents[2]
FIRMWARE = ROOT.parent / "shared" / "vectors" / "sev-snp-measure" / "ovmf_AmdSev_suffix.bin"
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
