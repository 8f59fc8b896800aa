"""sevhook.files: the one atomic writer behind key files, launch blobs, tokens, exports and pidfiles."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sevhook.errors import UsageError
from sevhook.files import UnwritableFileError, write_private_file


def test_bytes_and_text_are_written_exactly_with_mode_0600(tmp_path: Path) -> None:
    raw = tmp_path / "key.bin"
    text = tmp_path / "blob.b64"
    assert write_private_file(raw, b"\x00\xff\n") == raw
    assert write_private_file(str(text), "  AQ\r\n é\n") == text
    assert raw.read_bytes() == b"\x00\xff\n"
    assert text.read_bytes() == "  AQ\r\n é\n".encode()  # no newline translation
    assert {stat.S_IMODE(p.stat().st_mode) for p in (raw, text)} == {0o600}


def test_mode_is_set_even_under_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = write_private_file(tmp_path / "pid", "42\n", mode=0o644)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_replaces_by_rename_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("old")
    inode = path.stat().st_ino
    write_private_file(path, "new")
    assert path.read_text() == "new" and path.stat().st_ino != inode
    assert [p.name for p in tmp_path.iterdir()] == ["token"]


def test_failure_propagates_and_cleans_up(tmp_path: Path) -> None:
    """The OSError is kept as the cause of a UsageError that names the path and what to do."""
    (tmp_path / "target").mkdir()
    with pytest.raises(UnwritableFileError) as directory:
        write_private_file(tmp_path / "target", b"x")
    assert isinstance(directory.value.__cause__, IsADirectoryError)
    with pytest.raises(UnwritableFileError) as missing:
        write_private_file(tmp_path / "missing" / "file", b"x")
    assert isinstance(missing.value.__cause__, FileNotFoundError)
    assert [p.name for p in tmp_path.iterdir()] == ["target"]


@pytest.mark.parametrize("where", ["/proc/sevhook-test.bin", "/proc/self/sevhook-test.bin"])
def test_unwritable_location_is_a_usage_error_naming_the_path(where: str) -> None:
    with pytest.raises(UsageError) as caught:
        write_private_file(where, b"x")
    assert caught.value.exit_code == 2
    assert caught.value.message.startswith(f"{where}: cannot write (")
    assert "choose a writable location" in caught.value.message


def test_commands_writing_to_an_unwritable_place_give_one_line_not_a_traceback(tmp_path: Path) -> None:
    """Every command that writes through write_private_file: /proc accepts no new files."""
    def sevhook(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sevhook.cli", *map(str, args)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)

    state = tmp_path / "sim"
    assert sevhook("sim", "platform", "init", "--state-dir", state, "--rsa-bits", "2048").returncode == 0
    assert sevhook("sim", "platform", "export", "--state-dir", state, "--format", "pdh", "--out",
                   tmp_path / "pdh.cert").returncode == 0
    (tmp_path / "tek").write_bytes(os.urandom(16))
    (tmp_path / "tik").write_bytes(os.urandom(16))
    (tmp_path / "pass").write_text("correct horse\n")
    assert sevhook("broker", "init", "--data-dir", tmp_path / "broker").returncode == 0
    measurement = base64.b64encode(os.urandom(48)).decode()
    attempts = {
        "/proc/full.bin": ("sim", "platform", "export", "--state-dir", state, "--out", "/proc/full.bin"),
        "/proc/full_chain.bin": ("sim", "platform", "export", "--state-dir", state, "--out-dir", "/proc"),
        "/proc/guest_godh.b64": ("owner", "session", "--pdh", tmp_path / "pdh.cert", "--policy", "1",
                                 "--out-dir", "/proc", "--insecure-skip-chain"),
        "/proc/secret_header.bin": ("owner", "secret", "--tek", tmp_path / "tek", "--tik", tmp_path / "tik",
                                    "--measurement", measurement, "--disk-passphrase", tmp_path / "pass",
                                    "--out-dir", "/proc"),
        "/proc/host1.token": ("broker", "add-host", "host1", "--token-file", "/proc/host1.token",
                              "--data-dir", tmp_path / "broker"),
    }
    for path, args in attempts.items():
        result = sevhook(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert f"sevhook: error: {path}: cannot write (" in result.stderr, result.stderr
        assert "choose a writable location" in result.stderr and "Traceback" not in result.stderr
