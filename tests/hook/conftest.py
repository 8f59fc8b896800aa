"""Fixtures for the hook tests: the installed hook script, a real GODH certificate and session made
for a real platform's PDH (for domains from tests/hook/domains.py), and running the hook."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sevhook.hook.install import install
from sevhook.sev.certs import SevCertificate
from sevhook.sev.session import create_session
from tests.monitor.qemu_process import qemu, qemu_factory, short_dir  # noqa: F401

HookRunner = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="session")
def session_blobs(shared: Path) -> tuple[str, str]:
    """GODH and session for a launch on the Naples platform in tests/data/vectors (policy 1)."""
    pdh = SevCertificate.parse((shared / "vectors" / "chains" / "naples" / "pdh.cert").read_bytes())
    session = create_session(pdh, 1)
    return session.godh_b64, session.session_b64


@pytest.fixture
def hook_script(tmp_path: Path) -> Path:
    return install(tmp_path / "hooks")


@pytest.fixture
def hook_log(tmp_path: Path) -> Path:
    return tmp_path / "hook.log"


@pytest.fixture
def run_hook(hook_script: Path, hook_log: Path) -> Iterator[HookRunner]:
    """Run the installed script as libvirtd does: argv NAME OP SUBOP EXTRA, the XML on stdin, a bare
    environment (libvirtd clears it), the log sent to a file of the test's own."""

    def run(name: str, operation: str, xml: str, *, subop: str = "begin", timeout: float = 60,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SEVHOOK_HOOK_LOG": str(hook_log)}
        environment.update(env or {})
        return subprocess.run([str(hook_script), name, operation, subop, "-"], input=xml, capture_output=True,
                              text=True, timeout=timeout, env=environment)

    yield run

