"""An SEV guest under `sevhook-qemu`. First, before QEMU runs: find the domain's metadata (libvirt's
status file) and refuse what an attested launch cannot survive (-incoming, no -S, a session of its
own). Then QEMU starts behind the attesting interposer, its sev-guest object reading its GODH and
session from two FIFOs in root-only /run/sevhook/NAME/, and meanwhile a fresh launch is asked of the
guest owner's broker for this host's platform (the platform export cache), its policy checked
against the domain's, and its GODH and session written into the FIFOs. QEMU cannot get past
LAUNCH_START before that: no launch, no guest; a refused launch kills QEMU while it waits.

Every millisecond here delays `virsh start`, so QEMU's own start-up overlaps the broker's work, and
only what deciding needs is imported before QEMU runs.

A guest without emulator-mode metadata, or a QEMU that libvirt is not starting, is handed to the
real QEMU unchanged. Failures print `sevhook-qemu: NAME: STEP: REASON` on stderr (libvirt's log,
which virsh's error quotes) and exit 1 before the guest ever ran."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING

from sevhook.errors import SevhookError, StepError
from sevhook.hook.plan import ManagedGuest
from sevhook.hook.steplog import StepLog
from sevhook.qemu_cmdline.options import split_keyval_parts
from sevhook.sim.argv import QemuInvocation, parse_qemu_argv
from sevhook.wrapper.config import PROG, exec_qemu
from sevhook.wrapper.domain_source import emulator_qemu, guest_from_status, managed_guest, read_status

if TYPE_CHECKING:
    from lxml import etree

    from sevhook.interpose.child import PrivateMonitors
    from sevhook.wrapper.launch_request import FreshLaunch, LaunchRequest

RUN_DIR = Path("/run/sevhook")
LOG_FILE = "/var/log/sevhook/emulator.log"
LAUNCH_TIMEOUT = 30.0  # the broker's launch call, at most (also bounded by <sevhook:attestation timeout>)
ATTEST_SOCKET = "attest.sock"  # the wrapper's own monitor of QEMU, for the attestation
GODH_FIFO = "godh.b64"  # the FIFOs QEMU's sev-guest reads its dh-cert-file and session-file from
SESSION_FIFO = "session.b64"
# What fresh_launch needs (the platform cache's certificates, the broker's HTTP client), loaded right after
# QEMU's spawn, before the launch thread starts and before the relay (asyncio) is imported.
LAUNCH_MODULES = ("sevhook.sev.platform_export", "sevhook.launch.broker", "sevhook.broker.client")


class Refused(StepError):
    """The start is refused before the guest runs; `step: reason` goes to libvirt's log."""


def run_sev_guest(args: Sequence[str], config: dict[str, str]) -> int:
    argv = list(args)
    name = _name_argument(argv) or "?"
    try:
        return _run(argv, name, config)
    except Exception as exc:  # noqa: BLE001  fail closed with one line, never a traceback
        return _refuse(name, "internal", f"{exc.__class__.__name__}: {exc}; the guest was not started")


def _run(argv: list[str], name: str, config: dict[str, str]) -> int:
    state_dir = Path(config["libvirt-state-dir"])
    try:
        inv = parse_qemu_argv(argv)
    except SevhookError as exc:
        if _is_emulator_mode(name, state_dir):  # never run an attested guest's QEMU unattested
            return _refuse(name, "argv", f"{exc.message}: sevhook-qemu cannot read this command line")
        return exec_qemu(config["qemu"], argv)  # QEMU's own parser gives the authoritative message
    try:
        domain = read_status(inv.name, os.getpid(), state_dir) if inv.name is not None else None
        named_qemu = emulator_qemu(domain) if domain is not None else None
        if named_qemu is None:  # not emulator mode: the full checks still refuse unreadable metadata first
            if domain is not None:
                managed_guest(domain, name, state_dir)
            return exec_qemu(config["qemu"], argv)
    except StepError as exc:
        return _refuse(name, exc.step, exc.reason)
    if inv.sev is None:
        return _refuse(name, "argv", "the QEMU command line has no sev-guest object that -machine "
                       "confidential-guest-support names, so the guest would run unencrypted and unattested")
    qemu = named_qemu or config["qemu"]
    log = StepLog.open(name, "emulator", os.environ.get("SEVHOOK_QEMU_LOG") or LOG_FILE)
    files = RUN_DIR / name
    try:
        _check_startable(inv, qemu)
        return _serve(inv, partial(_emulator_mode_guest, domain, name, state_dir), qemu,
                      Path(config["platform-cache"]), files, log)
    except StepError as exc:
        log.total("failed")
        return _refuse(name, exc.step, exc.reason)
    except SevhookError as exc:
        log.total("failed")
        return _refuse(name, "launch", exc.message)
    finally:
        shutil.rmtree(files, ignore_errors=True)


def _refuse(name: str, step: str, reason: str) -> int:
    for line in reason.splitlines() or [""]:
        print(f"{PROG}: {name}: {step}: {line}", file=sys.stderr)
    return 1


def _name_argument(argv: list[str]) -> str | None:
    """`-name guest=NAME,...` (or `-name NAME`), read without the full parser."""
    for flag, value in pairwise(argv):
        if flag in ("-name", "--name"):
            first = value.replace(",,", "\0").split(",")[0].replace("\0", ",")
            return first.removeprefix("guest=")
    return None


def _is_emulator_mode(name: str, state_dir: Path) -> bool:
    """Whether libvirt is starting an emulator-mode guest of that name (a status file in doubt: yes)."""
    try:
        guest = guest_from_status(name, os.getpid(), state_dir)
    except StepError:
        return True
    return guest is not None and guest.attestation.mode == "emulator"


def _emulator_mode_guest(domain: etree._Element, name: str, state_dir: Path) -> ManagedGuest:
    """The guest, its metadata checked in full while QEMU starts (the first look chose emulator mode)."""
    guest = managed_guest(domain, name, state_dir)
    if guest is None or guest.attestation.mode != "emulator":  # the two readings of one element disagree
        raise Refused("metadata", "sevhook's metadata does not ask for emulator mode after all; the guest was not "
                      "started: check it with `sevhook validate`")
    return guest


def _check_startable(inv: QemuInvocation, qemu: str) -> None:
    """What an attested launch cannot survive, refused before anything is asked of the broker."""
    if any(arg in ("-incoming", "--incoming") for arg in inv.argv):
        raise Refused("incoming", "an attested SEV guest cannot be migrated in or restored from a saved state: "
                      "its memory key and secrets stay in the source host's secure processor; shut it down "
                      f"and `virsh start {inv.name}` instead (a fresh attested launch)")
    if not inv.start_paused:
        raise Refused("argv", "QEMU was not told -S (start paused): the vCPUs would run before attestation; "
                      "start the guest through libvirt, which always passes -S")
    if inv.sev is not None and (inv.sev.dh_cert_file or inv.sev.session_file):
        raise Refused("argv", "the domain's <launchSecurity> carries a <dhCert>/<session> of its own, but emulator "
                      "mode makes a fresh launch at every start: run `sevhook prepare-domain --mode emulator`")
    if not (os.path.isfile(qemu) and os.access(qemu, os.X_OK)):
        raise Refused("qemu", f"the real QEMU {qemu} is not an executable file: fix <sevhook:emulator qemu=...> "
                      "with `sevhook prepare-domain --qemu PATH`")


def fresh_launch(guest: ManagedGuest, cache: Path, log: StepLog) -> FreshLaunch:
    """A launch made now by the guest owner's broker for this host's platform, its policy the domain's.
    Runs in a thread from QEMU's spawn on (its modules loaded before: LAUNCH_MODULES); raises StepError or
    SevhookError."""
    from sevhook.launch.broker import SESSION_RETRIES, open_broker
    from sevhook.sev.platform_export import read_export
    from sevhook.wrapper.launch_request import FreshLaunch

    with log.steps.step("launch"):
        try:
            pdh_b64, chain_b64, cpu0_id_b64 = read_export(cache).launch_fields()
        except SevhookError as exc:
            raise Refused("platform", f"{exc.message} (the platform cache {cache}: run `sevhook platform "
                          "export`)") from exc
        try:
            broker = open_broker(guest.attestation.broker, min(guest.attestation.timeout, LAUNCH_TIMEOUT),
                                 SESSION_RETRIES)
            try:
                grant = broker.create_launch(guest.attestation.guest_id, pdh_b64, chain_b64, cpu0_id_b64)
            finally:
                broker.close()
        except SevhookError as exc:
            raise Refused("launch", exc.message) from exc
        wanted = guest.launch_security.policy.value
        if grant.policy != wanted:
            raise Refused("policy", f"the key broker made the launch for policy {grant.policy:#06x} but the "
                          f"domain asks for {wanted:#06x}: make <launchSecurity><policy> the policy the guest owner "
                          "registered")
    print(f"{PROG}: {guest.name}: launch {grant.launch_id} from the key broker for guest "
          f"{guest.attestation.guest_id}, policy {grant.policy:#06x}", file=sys.stderr)
    # the wrapper resumes through libvirt's own `cont`, never by itself
    launched = replace(guest, attestation=replace(guest.attestation, launch_id=grant.launch_id, resume=False))
    return FreshLaunch(launched, grant.godh_b64, grant.session_b64)


def _launch_fifos(files: Path) -> tuple[Path, Path]:
    """Two FIFOs in a fresh root-only directory: QEMU's reads of its GODH and session wait for the launch."""
    RUN_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    shutil.rmtree(files, ignore_errors=True)  # a leftover of a start that was killed
    files.mkdir(mode=0o700)
    fifos = files / GODH_FIFO, files / SESSION_FIFO
    for fifo in fifos:
        os.mkfifo(fifo, 0o600)
    return fifos


def sev_object_with_files(value: str, files: Path) -> str:
    """libvirt's -object sev-guest argument (JSON or key=value) with dh-cert-file and session-file."""
    godh, session = str(files / GODH_FIFO), str(files / SESSION_FIFO)
    if value.lstrip().startswith("{"):
        props = json.loads(value)
        props["dh-cert-file"], props["session-file"] = godh, session
        return json.dumps(props, separators=(",", ":"))
    parts = split_keyval_parts(value)
    escaped = [path.replace(",", ",,") for path in (godh, session)]
    return ",".join([*parts, f"dh-cert-file={escaped[0]}", f"session-file={escaped[1]}"])


def _child_argv(inv: QemuInvocation, private: PrivateMonitors, sev_object: str, attest_socket: str) -> list[str]:
    """The real QEMU's arguments: libvirt's, with its monitors on private sockets, the sev-guest object
    reading the launch FIFOs, and one more monitor, the wrapper's own, for the attestation."""
    assert inv.sev_object_index is not None
    argv = private.child_argv()
    argv[inv.sev_object_index] = sev_object
    return [*argv, "-qmp", f"unix:{attest_socket},server=on,wait=off"]


def _serve(inv: QemuInvocation, checked_guest: Callable[[], ManagedGuest], qemu: str, cache: Path, files: Path,
           log: StepLog) -> int:
    """QEMU first; then, while it starts, the full metadata checks (`checked_guest`), the broker's launch
    (asked in a thread at once) and the relay. QEMU waits for its launch on the FIFOs until then."""
    from sevhook.interpose.child import PrivateMonitors  # no asyncio: QEMU starts before the relay is imported

    assert inv.sev_object_index is not None
    fifos = _launch_fifos(files)
    sev_object = sev_object_with_files(inv.argv[inv.sev_object_index], files)
    private = PrivateMonitors(inv.argv, inv.monitors, "sevhook-qemu-")
    attest_socket = private.extra_socket(ATTEST_SOCKET)
    try:
        child = private.spawn(qemu, _child_argv(inv, private, sev_object, attest_socket), relay_stderr=True,
                              daemonize=False)
    except OSError as exc:
        private.cleanup()
        raise Refused("qemu", f"cannot run the real QEMU {qemu}: {exc.strerror}") from exc
    try:
        guest = checked_guest()
        for module in LAUNCH_MODULES:  # here, not in the thread: one thread imports at a time
            importlib.import_module(module)
        from sevhook.wrapper.launch_request import LaunchRequest

        request = LaunchRequest(partial(fresh_launch, guest, cache, log))  # the broker works while the relay loads
        return _relay(inv, guest, log, fifos, private, child, attest_socket, request)
    finally:
        if child.poll() is None:  # the relay never took it over (a failure before the event loop ran)
            child.kill()
            child.wait()
        private.cleanup()  # done already by the relay, unless it failed before it ran


def _relay(inv: QemuInvocation, guest: ManagedGuest, log: StepLog, fifos: tuple[Path, Path],
           private: PrivateMonitors, child: subprocess.Popen[bytes], attest_socket: str,
           request: LaunchRequest) -> int:
    import asyncio  # while QEMU starts

    from sevhook.sim.qmp_server import listening_socket
    from sevhook.wrapper.interposer import AttestingInterposer

    interposer = AttestingInterposer(inv, guest, log, request, fifos, private, child, attest_socket)
    try:
        sockets = [listening_socket(spec) for spec in inv.monitors]
        status = asyncio.run(interposer.run(child.args[0], sockets, lambda: None))
    finally:
        interposer.cleanup()
    if interposer.launch_refusal is not None:
        log.total("failed")
        return _refuse(guest.name, interposer.launch_refusal.step, interposer.launch_refusal.reason)
    return status
