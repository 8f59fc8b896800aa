"""QEMU versions and the launch-security features each one has, as libvirt probes them.

libvirt decides the argument form from the QEMU binary's capabilities; sevhook decides it from a
version number the user gives (or none: the newest forms), so the same domain XML gives the same
arguments libvirt would give for that QEMU."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

from sevhook.errors import UsageError

_VERSION_RE = re.compile(r"^(\d{1,3})\.(\d{1,3})(?:\.(\d{1,3}))?$")
_BINARY_VERSION_RE = re.compile(r"QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?")


@dataclass(frozen=True, order=True)
class QemuVersion:
    major: int
    minor: int
    micro: int = 0

    @classmethod
    def parse(cls, text: str) -> QemuVersion:
        match = _VERSION_RE.match(text.strip())
        if not match:
            raise UsageError(f"--qemu-version: {text!r} is not a QEMU version; give it as X.Y, e.g. 7.2")
        return cls(int(match[1]), int(match[2]), int(match[3] or 0))

    @classmethod
    def of_binary(cls, binary: str, timeout: float = 10.0) -> QemuVersion:
        """Ask a QEMU binary for its version (`--version`), as libvirt's capability probe does."""
        try:
            proc = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise UsageError(f"cannot run {binary} --version to learn the QEMU version: {exc}; "
                             "pass --qemu-version X.Y") from exc
        match = _BINARY_VERSION_RE.search(proc.stdout)
        if not match:
            raise UsageError(f"{binary} --version did not print a QEMU version; pass --qemu-version X.Y")
        return cls(int(match[1]), int(match[2]), int(match[3] or 0))

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}" + (f".{self.micro}" if self.micro else "")


# First QEMU release with each feature (QEMU's own changelogs; libvirt probes the same properties).
SEV_GUEST = QemuVersion(2, 12)
JSON_OBJECT_SYNTAX = QemuVersion(6, 0)
CONFIDENTIAL_GUEST_SUPPORT = QemuVersion(6, 0)
S390_PV_GUEST = QemuVersion(6, 0)
KERNEL_HASHES = QemuVersion(6, 2)
SEV_SNP_GUEST = QemuVersion(9, 1)


def has(version: QemuVersion | None, feature: QemuVersion) -> bool:
    """Whether `version` has `feature`; no version means the newest QEMU, which has everything."""
    return version is None or version >= feature
