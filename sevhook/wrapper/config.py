"""What sevhook-qemu needs before it decides anything: its host settings (/etc/sevhook/emulator.conf)
and how it becomes the real QEMU. Kept apart from main, launch and interposer so each imports only this."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

PROG = "sevhook-qemu"
CONFIG_FILE = Path("/etc/sevhook/emulator.conf")
CONFIG_ENV = "SEVHOOK_QEMU_CONFIG"  # another file, for runs outside libvirtd (which clears the environment)
DEFAULT_QEMU = "/usr/bin/qemu-system-x86_64"
DEFAULT_PLATFORM_CACHE = "/var/lib/sevhook/platform"
DEFAULT_LIBVIRT_STATE_DIR = "/run/libvirt/qemu"  # libvirtd's qemu:///system status files
CONFIG_KEYS = {"qemu": DEFAULT_QEMU, "platform-cache": DEFAULT_PLATFORM_CACHE,
               "libvirt-state-dir": DEFAULT_LIBVIRT_STATE_DIR}


class ConfigError(Exception):
    """emulator.conf cannot be used; the message names the file, the line and the fix."""


def config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV) or CONFIG_FILE)


def read_config(path: Path) -> dict[str, str]:
    """The host's settings for the wrapper: `qemu = PATH` (the QEMU that answers libvirt's probes
    and runs guests whose metadata names none), `platform-cache = DIR` and `libvirt-state-dir = DIR`
    (where libvirtd writes its domain status files). libvirtd clears the
    environment of the emulators it runs, so these live in a file, not in variables."""
    settings = dict(CONFIG_KEYS)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return settings
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.__class__.__name__}); fix its permissions or remove it") \
            from exc
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.split("#", 1)[0].strip()
        if not stripped:
            continue
        key, sep, value = (part.strip() for part in stripped.partition("="))
        if not sep or key not in CONFIG_KEYS or not value.startswith("/"):
            raise ConfigError(f"{path}:{number}: expected `qemu = /ABSOLUTE/PATH`, `platform-cache = /DIR` or "
                              f"`libvirt-state-dir = /DIR`, got {stripped[:80]!r}")
        settings[key] = value
    return settings


def exec_qemu(binary: str, args: Sequence[str]) -> int:
    """Become the real QEMU (same pid, fds, signals and exit status): libvirt cannot tell the difference."""
    try:
        os.execv(binary, [binary, *args])
    except OSError as exc:
        print(f"{PROG}: cannot run the real QEMU {binary}: {exc.strerror}; set `qemu = PATH` in {config_path()} "
              "or the domain's <sevhook:emulator qemu=...> (sevhook prepare-domain --qemu)", file=sys.stderr)
        return 1
    return 1  # not reached
