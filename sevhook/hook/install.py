"""Installing the hook as <hooks>/qemu.d/50-sevhook (libvirt >= 6.5 runs every script there).

The script is a few lines of Python run with `-I -S`: no site module, no .pth processing, no
environment. It puts sevhook's own directory and the interpreter's site-packages on sys.path itself
and runs sevhook.hook.fast, which exits after a byte search for guests that cannot carry sevhook metadata.
That keeps the hook's cost close to a bare interpreter start for every other guest on the host.

The script runs the interpreter that runs `sevhook hook install`: /usr/local/bin/sevhook after
scripts/install is the virtualenv under /opt/sevhook, so the hook uses that installed copy. Run from
a checkout's editable install, the hook would follow the checkout: `checkout_install` says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from sevhook.errors import UsageError
from sevhook.files import UnwritableFileError, write_private_file
from sevhook.hook.steplog import LOG_ENV

DEFAULT_HOOKS_DIR = Path("/etc/libvirt/hooks")
DEFAULT_PREFIX = Path("/opt/sevhook")  # where scripts/install puts its virtualenv
_PATHS_PROBE = ("import json, pathlib, sysconfig, sevhook; "
                "print(json.dumps([str(pathlib.Path(sevhook.__file__).resolve().parent.parent)] + "
                "[sysconfig.get_paths()[key] for key in ('purelib', 'platlib')]))")
SCRIPT_NAME = "50-sevhook"
MARKER = "# sevhook libvirt hook: written by `sevhook hook install`"


def script_path(hooks_dir: Path) -> Path:
    return hooks_dir / "qemu.d" / SCRIPT_NAME


def _import_paths() -> list[str]:
    """sevhook's parent directory (editable or installed) and the interpreter's site-packages."""
    package_parent = str(Path(__file__).resolve().parent.parent.parent)
    paths = [package_parent]
    for key in ("purelib", "platlib"):
        path = sysconfig.get_paths()[key]
        if path not in paths:
            paths.append(path)
    return paths


def installed_python(prefix: Path = DEFAULT_PREFIX) -> Path | None:
    """The interpreter of the installation scripts/install made under `prefix`, if there is one."""
    python = prefix / "bin" / "python"
    return python if python.is_file() and os.access(python, os.X_OK) else None


def import_paths_of(python: str) -> list[str]:
    """Where another interpreter finds sevhook and its site-packages (asked by running it)."""
    try:
        result = subprocess.run([python, "-I", "-c", _PATHS_PROBE], capture_output=True, text=True,
                                timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UsageError(f"--python {python}: cannot run it ({exc})") from exc
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise UsageError(f"--python {python}: it cannot import sevhook; give the interpreter of a sevhook "
                         "installation (scripts/install puts one in /opt/sevhook/bin/python)")
    return list(dict.fromkeys(json.loads(lines[-1])))


def checkout_install() -> Path | None:
    """The checkout sevhook runs from when it is an editable install (not under site-packages), else None."""
    package = Path(__file__).resolve().parent.parent
    site = {Path(sysconfig.get_paths()[key]).resolve() for key in ("purelib", "platlib")}
    return None if any(package.is_relative_to(path) for path in site) else package.parent


def render_script(python: str | None = None, log_target: str | None = None) -> str:
    """The hook script's text for the sevhook `python` runs (default: this one)."""
    paths = import_paths_of(python) if python else _import_paths()
    lines = [
        f"#!{python or sys.executable} -IS",
        MARKER,
        "# libvirtd runs it for every QEMU guest; it exits 0 at once unless the domain has <launchSecurity>",
        "# and sevhook metadata. Remove it with `sevhook hook uninstall`, then restart libvirtd.",
        "import sys",
        f"sys.path[:0] = {paths!r}",
    ]
    if log_target:
        lines += ["import os", f"os.environ[{LOG_ENV!r}] = {log_target!r}"]
    lines += ["from sevhook.hook.fast import run_process", "run_process()", ""]
    return "\n".join(lines)


def _is_ours(path: Path) -> bool:
    try:
        return MARKER in path.read_text(encoding="utf-8", errors="replace")[:512]
    except OSError:
        return False


def install(hooks_dir: Path = DEFAULT_HOOKS_DIR, log_target: str | None = None, python: str | None = None) -> Path:
    """Write the script (0755, atomically) for the sevhook `python` runs (default: this one); refuse to
    overwrite a file sevhook did not write."""
    target = script_path(hooks_dir)
    if target.exists() and not _is_ours(target):
        raise UsageError(f"{target} exists and was not written by sevhook; move it away first")
    try:
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        write_private_file(target, render_script(python, log_target=log_target), mode=0o755)
    except UnwritableFileError as exc:
        raise UsageError(f"cannot write {target}: {exc.reason}; run as root or pass --hooks-dir") from exc
    except OSError as exc:  # the directory
        raise UsageError(f"cannot write {target}: {exc.strerror or exc}; run as root or pass --hooks-dir") from exc
    return target


def uninstall(hooks_dir: Path = DEFAULT_HOOKS_DIR) -> Path | None:
    """Remove the script if sevhook wrote it; the path removed, or None when none was installed."""
    target = script_path(hooks_dir)
    if not target.exists():
        return None
    if not _is_ours(target):
        raise UsageError(f"{target} was not written by sevhook; not removing it")
    try:
        target.unlink()
    except OSError as exc:
        raise UsageError(f"cannot remove {target}: {exc.strerror or exc}") from exc
    return target
