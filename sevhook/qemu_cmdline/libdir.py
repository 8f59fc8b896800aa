"""Where libvirt keeps a domain's dhCert and session files, and writing them as libvirt does.

libvirt writes the exact XML text to `<libDir>/dh_cert.base64` and `<libDir>/session.base64`
(mode 0600) before QEMU starts; QEMU reads them through dh-cert-file / session-file."""

from __future__ import annotations

import os
from collections.abc import Mapping

from sevhook.errors import SevhookError, UsageError
from sevhook.files import UnwritableFileError, write_private_file
from sevhook.qemu_cmdline.objects import LaunchFiles
from sevhook.xml.models import Domain, LaunchSecurity, SevLaunchSecurity

LIBVIRT_QEMU_LIB = "/var/lib/libvirt/qemu"
SHORT_NAME_CHARS = 20  # libvirt's VIR_DOMAIN_SHORT_NAME_MAX
INACTIVE_DOMAIN_ID = -1
DH_CERT_FILE = "dh_cert.base64"
SESSION_FILE = "session.base64"


def short_name(domain_id: int | None, name: str) -> str:
    """libvirt's `<id>-<first 20 characters of the name>` (-1 for a domain that is not running)."""
    if not name or "/" in name or "\0" in name:
        raise UsageError(f"domain name {name!r} cannot be used in a path (libvirt forbids '/' in names)")
    return f"{INACTIVE_DOMAIN_ID if domain_id is None else domain_id}-{name[:SHORT_NAME_CHARS]}"


# Paths are plain strings here: they are argv text, and pathlib would triple the cost of a translation.
def default_lib_dir(domain: Domain) -> str:
    return f"{LIBVIRT_QEMU_LIB}/domain-{short_name(domain.id, domain.name)}"


def launch_files(lib_dir: str) -> LaunchFiles:
    return LaunchFiles(os.path.join(lib_dir, DH_CERT_FILE), os.path.join(lib_dir, SESSION_FILE))


def file_contents(model: LaunchSecurity, lib_dir: str) -> dict[str, str]:
    """The files QEMU will read for this launch security: path -> exact XML text."""
    if not isinstance(model, SevLaunchSecurity):
        return {}
    files: dict[str, str] = {}
    if model.dh_cert:
        files[os.path.join(lib_dir, DH_CERT_FILE)] = model.dh_cert
    if model.session:
        files[os.path.join(lib_dir, SESSION_FILE)] = model.session
    return files


def write_files(files: Mapping[str, str]) -> list[str]:
    """Write every launch file; an unwritable lib dir is one clear error, not a traceback."""
    written: list[str] = []
    for path, text in files.items():
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            write_private_file(path, text)
        except OSError as exc:
            raise SevhookError(f"cannot write {path}: {exc.strerror}; choose a writable --lib-dir DIR") from exc
        except UnwritableFileError as exc:
            raise SevhookError(f"cannot write {path}: {exc.reason}; choose a writable --lib-dir DIR") from exc
        written.append(path)
    return written
