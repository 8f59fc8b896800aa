"""scripts/install in a temporary prefix: a virtualenv holding a real (not editable) copy of sevhook,
its commands linked into a bin directory, `python -m sevhook`, a hook that runs the installed copy,
and the contrib/ units checked by systemd-analyze."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sevhook.hook.install import installed_python

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ROOT / "scripts" / "install"
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    base = tmp_path_factory.mktemp("install")
    prefix, bin_dir = base / "opt" / "sevhook", base / "bin"
    result = subprocess.run([INSTALL, "--prefix", prefix, "--bin-dir", bin_dir], capture_output=True, text=True,
                            timeout=800)
    assert result.returncode == 0, result.stderr
    assert f"in {prefix}" in result.stdout
    yield prefix, bin_dir
    shutil.rmtree(base, ignore_errors=True)


def run(*args: str | Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, input=stdin,
                          cwd="/")


def test_commands_are_linked_and_run_the_installed_copy(installed: tuple[Path, Path]) -> None:
    prefix, bin_dir = installed
    for command in ("sevhook", "sevhook-sim-qemu"):
        assert (bin_dir / command).resolve() == (prefix / "bin" / command).resolve()
    assert run(bin_dir / "sevhook", "--version").stdout.startswith("sevhook ")
    assert run(prefix / "bin" / "python", "-m", "sevhook", "--version").stdout.startswith("sevhook ")
    where = run(prefix / "bin" / "python", "-c", "import sevhook; print(sevhook.__file__)").stdout.strip()
    assert where.startswith(str(prefix)) and not where.startswith(str(ROOT))  # a copy, not the checkout
    assert "doctor" in run(bin_dir / "sevhook", "--help").stdout


def test_the_hook_runs_the_installed_interpreter(installed: tuple[Path, Path], tmp_path: Path) -> None:
    prefix, bin_dir = installed
    result = run(bin_dir / "sevhook", "hook", "install", "--hooks-dir", tmp_path / "hooks")
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr  # not a checkout: no advice to install
    script = tmp_path / "hooks" / "qemu.d" / "50-sevhook"
    text = script.read_text()
    assert text.startswith(f"#!{prefix}/bin/python")
    assert str(ROOT) not in text
    plain = run(script, "plain", "prepare", "begin", "-", stdin="<domain type='kvm'><name>plain</name></domain>")
    assert plain.returncode == 0 and plain.stderr == ""
    managed = ("<domain type='kvm'><name>m</name><metadata><sevhook:attestation "
               "xmlns:sevhook='http://sevhook.org/xmlns/libvirt/1.0'><sevhook:broker url='http://127.0.0.1:9'/>"
               "<sevhook:guest id='m'/></sevhook:attestation></metadata>"
               "<launchSecurity type='sev'><policy>0x0003</policy></launchSecurity></domain>")
    refused = run(script, "m", "prepare", "begin", "-", stdin=managed)  # the installed sevhook judges it
    assert refused.returncode == 1 and refused.stderr.startswith("sevhook: m: "), refused.stderr


@pytest.mark.skipif(installed_python() is not None, reason="sevhook is installed in /opt/sevhook on this machine")
def test_the_checkout_install_warns_that_the_hook_follows_the_checkout(tmp_path: Path) -> None:
    result = run(sys.executable, "-m", "sevhook", "hook", "install", "--hooks-dir", tmp_path / "hooks")
    assert result.returncode == 0
    assert "editable install" in result.stderr and "scripts/install" in result.stderr


def test_the_checkout_writes_a_hook_for_an_installed_interpreter(installed: tuple[Path, Path], tmp_path: Path) -> None:
    prefix, _bin_dir = installed
    result = run(sys.executable, "-m", "sevhook", "hook", "install", "--hooks-dir", tmp_path / "hooks",
                 "--python", prefix / "bin" / "python")
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr
    text = (tmp_path / "hooks" / "qemu.d" / "50-sevhook").read_text()
    assert text.startswith(f"#!{prefix}/bin/python -IS") and str(ROOT) not in text
    wrong = run(sys.executable, "-m", "sevhook", "hook", "install", "--hooks-dir", tmp_path / "other",
                "--python", "/usr/bin/python3")
    assert wrong.returncode == 2 and "it cannot import sevhook" in wrong.stderr
    assert not (tmp_path / "other" / "qemu.d" / "50-sevhook").exists()


def test_bad_options_are_refused(tmp_path: Path) -> None:
    relative = run(INSTALL, "--prefix", "opt/sevhook")
    assert relative.returncode == 2 and "give an absolute path" in relative.stderr
    unknown = run(INSTALL, "--frobnicate")
    assert unknown.returncode == 2 and "unknown option --frobnicate" in unknown.stderr
    missing = run(INSTALL, "--prefix", tmp_path / "p", "--wheel", tmp_path / "none.whl")
    assert missing.returncode == 2 and "no such file" in missing.stderr
    assert not (tmp_path / "p").exists()
    assert "--prefix" in run(INSTALL, "--help").stdout


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_units_verify(installed: tuple[Path, Path], tmp_path: Path) -> None:
    _prefix, bin_dir = installed
    for unit in ("sevhook-broker.service", "sevhook-platform-export.service"):
        text = (ROOT / "contrib" / unit).read_text()
        assert "ExecStart=/usr/local/bin/sevhook " in text
        (tmp_path / unit).write_text(text.replace("/usr/local/bin/sevhook", str(bin_dir / "sevhook")))
        result = run("systemd-analyze", "verify", tmp_path / unit)
        assert result.returncode == 0, result.stderr
    assert "--password" not in (ROOT / "contrib" / "sevhook-broker.service").read_text()
    rotate = (ROOT / "contrib" / "sevhook-hook.logrotate").read_text()
    assert rotate.startswith("#") and "/var/log/sevhook/hook.log {" in rotate
