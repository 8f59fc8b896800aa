"""Host readiness for SEV guests: gather facts at the edge, judge them with pure checks.

Each check says what it found and, when it fails, what to change; `sevhook doctor` prints them."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sevhook.errors import SevhookError
from sevhook.monitor.probe import probe_capabilities
from sevhook.sev.secret_area import NoSecretArea, require_secret_area
from sevhook.virt import LibvirtError, libvirt_module, open_connection

Status = Literal["ok", "warn", "fail"]

HOOK_NAME = "50-sevhook"
MIN_LIBVIRT = (8, 0, 0)  # virDomainSetLaunchSecurityState
MIN_QEMU = (6, 0, 0)  # confidential-guest-support, JSON -object
MIN_LIBVIRT_HOOK_DIR = (6, 5, 0)  # qemu.d/


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    found: str
    fix: str = ""


@dataclass(frozen=True)
class HostFacts:
    """Everything the checks look at, read once from the host (or built by tests)."""

    cpu_flags: frozenset[str] = frozenset()
    kvm_amd_sev: str | None = None  # /sys/module/kvm_amd/parameters/sev, None when not loaded
    kvm_amd_sev_es: str | None = None
    dev_sev: bool = False
    dev_kvm: bool = False
    libvirt_version: tuple[int, int, int] | None = None
    qemu_version: tuple[int, int, int] | None = None
    libvirt_error: str | None = None
    domcaps_sev: bool | None = None  # <sev supported='yes'> in domcapabilities
    firmware_features: dict[str, frozenset[str]] = field(default_factory=dict)  # descriptor -> features
    firmware_secret_areas: dict[str, bool] = field(default_factory=dict)  # installed firmware file -> usable area
    hook_path: Path | None = None
    hook_installed: bool = False
    hook_mtime: float | None = None
    daemon_started: float | None = None  # start time of the running libvirtd, epoch seconds
    emulator: Path | None = None  # --emulator: the QEMU binary (stand-in, wrapper) SEV guests will use
    emulator_sev: str | None = None  # what its query-sev-capabilities answered
    emulator_error: str | None = None


def _version(v: tuple[int, int, int] | None) -> str:
    return "unknown" if v is None else ".".join(map(str, v))


def _software_sev(f: HostFacts) -> bool:
    """The given emulator provides SEV itself (the software platform, or a wrapper on SEV hardware)."""
    return f.emulator is not None and f.emulator_sev is not None


def _hardware(check: Check, f: HostFacts) -> Check:
    """A failed hardware check is a warning when the emulator provides SEV: the software platform
    stands in for it (to rehearse, never to protect real secrets)."""
    if check.status != "fail" or not _software_sev(f):
        return check
    return Check(check.name, "warn", check.found, f"no SEV hardware: SEV comes from {f.emulator} (a software "
                 "platform: for rehearsal, not for real secrets)")


def check_cpu(f: HostFacts) -> Check:
    if "sev" in f.cpu_flags:
        es = " and SEV-ES" if "sev_es" in f.cpu_flags else " (no SEV-ES)"
        return Check("CPU", "ok", f"the CPU advertises SEV{es}")
    return Check("CPU", "fail", "the CPU flags have no 'sev'",
                 "use an AMD EPYC host with SEV enabled in the BIOS (SMEE/SEV-ASID settings); "
                 "without hardware, rehearse with the software platform: sevhook demo")


def check_kvm_amd(f: HostFacts) -> Check:
    if f.kvm_amd_sev is None:
        return Check("kvm_amd sev parameter", "fail", "kvm_amd is not loaded",
                     "load it with SEV on: modprobe kvm_amd sev=1 (persist in /etc/modprobe.d/kvm_amd.conf)")
    if f.kvm_amd_sev.strip() in ("1", "Y", "y"):
        return Check("kvm_amd sev parameter", "ok", f"sev={f.kvm_amd_sev.strip()}")
    return Check("kvm_amd sev parameter", "fail", f"sev={f.kvm_amd_sev.strip()}",
                 "reload kvm_amd with sev=1 (and sev_es=1 for SEV-ES guests)")


def check_dev_sev(f: HostFacts) -> Check:
    if f.dev_sev:
        return Check("/dev/sev", "ok", "present")
    return Check("/dev/sev", "fail", "missing",
                 "the ccp driver exposes /dev/sev when the secure processor is usable: check `dmesg | grep -i sev`")


def check_libvirt(f: HostFacts) -> Check:
    if f.libvirt_version is None:
        return Check("libvirt", "fail", f.libvirt_error or "libvirt is not reachable",
                     "start libvirtd and install sevhook[libvirt]; pass -c URI if it is not qemu:///system")
    if f.libvirt_version < MIN_LIBVIRT:
        return Check("libvirt", "fail", f"libvirt {_version(f.libvirt_version)}",
                     f"upgrade to libvirt >= {_version(MIN_LIBVIRT)} (needed to inject launch secrets)")
    return Check("libvirt", "ok", f"libvirt {_version(f.libvirt_version)}")


def check_qemu(f: HostFacts) -> Check:
    if f.qemu_version is None:
        return Check("QEMU", "fail", "QEMU version unknown (libvirt not reachable)", "start libvirtd")
    if f.qemu_version < MIN_QEMU:
        return Check("QEMU", "warn", f"QEMU {_version(f.qemu_version)}",
                     f"QEMU >= {_version(MIN_QEMU)} is recommended (confidential-guest-support, kernel-hashes >= 6.2)")
    return Check("QEMU", "ok", f"QEMU {_version(f.qemu_version)}")


def check_domcaps(f: HostFacts) -> Check:
    if f.domcaps_sev is None:
        return Check("domcapabilities", "fail", "could not read domain capabilities", "start libvirtd")
    if f.domcaps_sev:
        return Check("domcapabilities", "ok", "<sev supported='yes'>" + (f" for {f.emulator}" if f.emulator else ""))
    return Check("domcapabilities", "fail", "<sev supported='no'>",
                 "libvirt probed QEMU without SEV: fix the checks above, then restart libvirtd "
                 "(it caches capabilities per QEMU binary in /var/cache/libvirt/qemu/capabilities)")


def check_firmware(f: HostFacts) -> Check:
    sev = sorted(name for name, feats in f.firmware_features.items() if "amd-sev" in feats)
    es = sorted(name for name, feats in f.firmware_features.items() if "amd-sev-es" in feats)
    if not sev:
        return Check("OVMF firmware", "fail", "no firmware descriptor with feature amd-sev",
                     "install OVMF (Debian: ovmf) or an AmdSev OVMF build with its descriptor in "
                     "/usr/share/qemu/firmware")
    if not es:
        return Check("OVMF firmware", "warn", f"amd-sev in {', '.join(sev)}; none with amd-sev-es",
                     "SEV-ES guests and measured direct kernel boot need an AmdSev OVMF build (OvmfPkg/AmdSev)")
    return Check("OVMF firmware", "ok", f"amd-sev-es in {', '.join(es)}")


def check_secret_area(f: HostFacts) -> Check:
    """Only firmware with a SEV secret area can receive the owner's secret (QEMU injects at its base)."""
    usable = sorted(path for path, ok in f.firmware_secret_areas.items() if ok)
    without = sorted(path for path, ok in f.firmware_secret_areas.items() if not ok)
    if not f.firmware_secret_areas:
        return Check("OVMF secret area", "warn", "no installed firmware file found through the descriptors",
                     "install an AmdSev OVMF build (OvmfPkg/AmdSev) to give guests launch secrets")
    if not usable:
        return Check("OVMF secret area", "warn", f"none of {', '.join(without)} has a SEV launch-secret area",
                     "secrets need an AmdSev OVMF build (OvmfPkg/AmdSev); sevhook refuses to inject into these")
    detail = f"secret area in {', '.join(usable)}" + (f"; none in {', '.join(without)}" if without else "")
    return Check("OVMF secret area", "ok", detail)


def check_hook(f: HostFacts) -> Check:
    if not f.hook_installed:
        return Check("sevhook hook", "warn", f"not installed at {f.hook_path}",
                     "sevhook hook install, then restart libvirtd (needed for attested starts with virsh)")
    if f.daemon_started is not None and f.hook_mtime is not None and f.daemon_started < f.hook_mtime:
        return Check("sevhook hook", "fail", "installed after libvirtd started: the daemon does not run it yet",
                     "restart libvirtd so that it finds the hook")
    return Check("sevhook hook", "ok", f"installed at {f.hook_path}")


def check_emulator(f: HostFacts) -> Check:
    if f.emulator_sev is not None:
        return Check("emulator", "ok", f"{f.emulator}: {f.emulator_sev}")
    return Check("emulator", "fail", f"{f.emulator}: {f.emulator_error or 'no answer'}",
                 "give the QEMU binary the domains use in <emulator> (the stand-in sevhook-sim-qemu, or a "
                 "wrapper script calling it with --sim-state-dir) and check that it starts on its own")


HARDWARE_CHECKS: tuple[Callable[[HostFacts], Check], ...] = (check_cpu, check_kvm_amd, check_dev_sev)
CHECKS: tuple[Callable[[HostFacts], Check], ...] = (
    *HARDWARE_CHECKS, check_libvirt, check_qemu, check_domcaps, check_firmware, check_secret_area, check_hook,
)


def run_checks(facts: HostFacts) -> list[Check]:
    checks = [_hardware(check(facts), facts) if check in HARDWARE_CHECKS else check(facts) for check in CHECKS]
    return checks + ([check_emulator(facts)] if facts.emulator is not None else [])


# --- gathering facts (the edge) -------------------------------------------------------------


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _cpu_flags(cpuinfo: str | None) -> frozenset[str]:
    match = re.search(r"^flags\s*:\s*(.*)$", cpuinfo or "", re.MULTILINE)
    return frozenset(match.group(1).split()) if match else frozenset()


def _split_version(number: int) -> tuple[int, int, int]:
    return number // 1_000_000, number // 1000 % 1000, number % 1000


def _firmware_features(dirs: Iterable[Path]) -> dict[str, frozenset[str]]:
    found: dict[str, frozenset[str]] = {}
    for directory in dirs:
        for path in sorted(directory.glob("*.json")) if directory.is_dir() else ():
            try:
                found[str(path)] = frozenset(json.loads(path.read_text()).get("features", ()))
            except (OSError, ValueError, AttributeError):
                continue
    return found


def _firmware_secret_areas(dirs: Iterable[Path]) -> dict[str, bool]:
    """Each flash executable the descriptors name -> whether its OVMF footer has a usable secret area."""
    found: dict[str, bool] = {}
    for directory in dirs:
        for path in sorted(directory.glob("*.json")) if directory.is_dir() else ():
            try:
                filename = json.loads(path.read_text())["mapping"]["executable"]["filename"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if filename in found or not os.access(filename, os.R_OK):
                continue
            try:
                require_secret_area(Path(filename), 1)
                found[filename] = True
            except NoSecretArea:
                found[filename] = False
    return found


def _process_start_time(pid: int) -> float | None:
    """Epoch start time of a process, from /proc (field 22 of stat, in clock ticks since boot)."""
    stat, uptime = _read(Path(f"/proc/{pid}/stat")), _read(Path("/proc/stat"))
    if not stat or not uptime:
        return None
    btime = re.search(r"^btime (\d+)$", uptime, re.MULTILINE)
    fields = stat.rsplit(")", 1)[-1].split()
    if not btime or len(fields) < 20:
        return None
    return int(btime.group(1)) + int(fields[19]) / os.sysconf("SC_CLK_TCK")


DEFAULT_DAEMON_PIDFILES = (Path("/run/libvirtd.pid"), Path("/run/virtqemud.pid"))


def probe_emulator(emulator: Path) -> tuple[str | None, str | None]:
    """(what the emulator's query-sev-capabilities answered, None) or (None, why not)."""
    try:
        caps = probe_capabilities(emulator)
    except SevhookError as exc:
        return None, exc.message
    return f"query-sev-capabilities answers (cbitpos {caps.cbitpos}, PDH and chain)", None


def gather_facts(uri: str | None, hooks_dir: Path, daemon_pidfiles: Iterable[Path] = DEFAULT_DAEMON_PIDFILES,
                 emulator: Path | None = None) -> HostFacts:
    facts: dict[str, object] = {
        "cpu_flags": _cpu_flags(_read(Path("/proc/cpuinfo"))),
        "kvm_amd_sev": _read(Path("/sys/module/kvm_amd/parameters/sev")),
        "kvm_amd_sev_es": _read(Path("/sys/module/kvm_amd/parameters/sev_es")),
        "dev_sev": Path("/dev/sev").exists(),
        "dev_kvm": Path("/dev/kvm").exists(),
        "firmware_features": _firmware_features(
            [Path("/usr/share/qemu/firmware"), Path("/etc/qemu/firmware")]),
        "firmware_secret_areas": _firmware_secret_areas(
            [Path("/usr/share/qemu/firmware"), Path("/etc/qemu/firmware")]),
    }
    hook = hooks_dir / "qemu.d" / HOOK_NAME
    facts["hook_path"] = hook
    facts["hook_installed"] = hook.is_file() and os.access(hook, os.X_OK)
    facts["hook_mtime"] = hook.stat().st_mtime if hook.exists() else None
    if emulator is not None:
        facts["emulator"] = emulator
        facts["emulator_sev"], facts["emulator_error"] = probe_emulator(emulator)
    try:
        libvirt = libvirt_module()
        conn = open_connection(uri)
    except LibvirtError as exc:
        facts["libvirt_error"] = exc.message
        return HostFacts(**facts)  # type: ignore[arg-type]
    try:
        facts["libvirt_version"] = _split_version(conn.getLibVersion())
        facts["qemu_version"] = _split_version(conn.getVersion())
        caps = conn.getDomainCapabilities(str(emulator) if emulator else None, "x86_64", None, None, 0)
        facts["domcaps_sev"] = "<sev supported='yes'" in caps
        for pidfile in daemon_pidfiles:
            text = _read(pidfile)
            if text and text.strip().isdigit():
                facts["daemon_started"] = _process_start_time(int(text.strip()))
                break
    except libvirt.libvirtError as exc:
        facts["libvirt_error"] = exc.get_error_message()
    finally:
        conn.close()
    return HostFacts(**facts)  # type: ignore[arg-type]
