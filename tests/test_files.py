"""sevhook.files: the one atomic writer behind key files, launch blobs, tokens, exports and pidfiles."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sevhook.files import write_private_file


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
    (tmp_path / "target").mkdir()
    with pytest.raises(IsADirectoryError):
        write_private_file(tmp_path / "target", b"x")
    with pytest.raises(FileNotFoundError):
        write_private_file(tmp_path / "missing" / "file", b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["target"]
