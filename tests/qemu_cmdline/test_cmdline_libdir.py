"""The lib dir layout and the dhCert/session files: exact text, 0600, atomic."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sevhook.errors import SevhookError, UsageError
from sevhook.files import UnwritableFileError, write_private_file
from sevhook.qemu_cmdline.libdir import file_contents, short_name, write_files
from sevhook.sev.policy import SevPolicy
from sevhook.xml.models import S390PvLaunchSecurity, SevLaunchSecurity


def test_short_name_matches_libvirt() -> None:
    assert short_name(None, "QEMUGuest1") == "-1-QEMUGuest1"
    assert short_name(12, "x" * 30) == "12-" + "x" * 20
    for bad in ("", "a/b", "a\0b"):
        with pytest.raises(UsageError):
            short_name(1, bad)


def test_files_hold_the_exact_xml_text_with_mode_0600(tmp_path: Path) -> None:
    text = "  AQAA\n  AAAA\n"  # whitespace and line breaks as the XML has them
    model = SevLaunchSecurity(policy=SevPolicy(1), dh_cert=text, session="SESSION")
    lib = tmp_path / "domain--1-g"
    written = write_files(file_contents(model, str(lib)))
    assert written == [f"{lib}/dh_cert.base64", f"{lib}/session.base64"]
    assert (lib / "dh_cert.base64").read_bytes() == text.encode()
    assert (lib / "session.base64").read_text() == "SESSION"
    for path in written:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(lib.stat().st_mode) == 0o700
    assert sorted(p.name for p in lib.iterdir()) == ["dh_cert.base64", "session.base64"]  # no temp files left


def test_rewrite_replaces_atomically_and_keeps_0600(tmp_path: Path) -> None:
    path = tmp_path / "dh_cert.base64"
    path.write_text("old")
    os.chmod(path, 0o644)
    inode = path.stat().st_ino
    write_private_file(path, "new")
    assert path.read_text() == "new" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_ino != inode  # a new file renamed over the old one, never a partial overwrite


def test_failed_write_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "dir-as-target"
    target.mkdir()
    with pytest.raises(UnwritableFileError) as caught:  # a usage error naming the path, the OSError its cause
        write_private_file(target, "x")
    assert isinstance(caught.value.__cause__, OSError) and str(target) in caught.value.message
    assert [p.name for p in tmp_path.iterdir()] == ["dir-as-target"]


def test_unwritable_lib_dir_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SevhookError, match="choose a writable --lib-dir"):
        write_files({f"{blocker}/sub/dh_cert.base64": "x"})


def test_only_sev_has_files() -> None:
    assert file_contents(S390PvLaunchSecurity(), "/x") == {}
    assert file_contents(SevLaunchSecurity(policy=SevPolicy(1)), "/x") == {}
