"""The attesting interposition: libvirt's monitor is relayed to the real QEMU as is, except that its
first `cont` is held until the attested launch (sevhook.launch.sequence.AttestedLaunch, over a private
monitor of the wrapper's own) has a verdict. Approved: libvirt's `cont` is forwarded and the guest
runs. Refused, failed or out of time: libvirt's `cont` gets a QMP GenericError naming the step and
the reason, and QEMU is killed, so its vCPUs never run. `system_reset` and migration (which `virsh
save` uses too) are refused for an attested guest.

Before that, while QEMU starts, the launch of this start (sevhook.wrapper.launch.fresh_launch, asked in a
thread since QEMU's spawn: sevhook.wrapper.launch_request) is written into the FIFOs QEMU's sev-guest
object reads its GODH and session from; a refused launch kills QEMU while it still waits for them."""

from __future__ import annotations

import asyncio
import errno
import gc
import importlib
import os
import signal
import subprocess
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

from sevhook.errors import SevhookError, StepError
from sevhook.hook.plan import HookFailure, ManagedGuest, launch_request
from sevhook.hook.steplog import StepLog
from sevhook.interpose.child import PrivateMonitors
from sevhook.interpose.core import POLL_INTERVAL, UPSTREAM_TIMEOUT, Interposer, MonitorRelay
from sevhook.launch.checks import Deadline
from sevhook.sim.argv import QemuInvocation
from sevhook.sim.qmp_protocol import GENERIC_ERROR, QmpError, error_reply
from sevhook.wrapper.config import PROG
from sevhook.wrapper.launch_request import LaunchRequest

DEADLINE_GRACE = 5.0  # past <sevhook:attestation timeout>, the held `cont` is refused whatever the steps do
KILL_DELAY = 0.5  # libvirt reads the refusal before the monitor closes
REFUSED_COMMANDS = {
    "system_reset": "an in-place reset of an attested SEV guest would run it again without a new attestation; "
                    "shut it down and start it again (a fresh attested launch)",
    "migrate": "an attested SEV guest cannot be migrated or saved: its memory key and secrets stay in this "
               "host's secure processor; shut it down and start it again instead",
    "migrate-incoming": "an attested SEV guest cannot receive a migration or a saved state",
}
STALE_PDH_MARKS = ("LAUNCH_START", "sev_launch_start")
# What run_attestation needs at libvirt's `cont` (qemu.qmp, the launch sequence), loaded while QEMU starts,
# once the launch thread (which imports what it needs itself) is done: never two threads importing at once.
ATTESTATION_MODULES = ("sevhook.launch.qmp_port", "sevhook.launch.sequence", "sevhook.monitor.qmp")


class AttestingInterposer(Interposer):
    """The real QEMU of one emulator-mode guest, with libvirt's `cont` held for the verdict."""

    def __init__(self, inv: QemuInvocation, guest: ManagedGuest, log: StepLog, launch_request: LaunchRequest,
                 fifos: tuple[Path, Path], private: PrivateMonitors, child: subprocess.Popen[bytes],
                 attest_socket: str) -> None:
        """`child`: the real QEMU, already started from `private` (sevhook.wrapper.launch), its sev-guest
        object reading `fifos` (GODH, session) and `attest_socket` the wrapper's own monitor;
        `launch_request`: the broker's launch, asked since QEMU's spawn."""
        super().__init__(inv.argv, inv.monitors, keep_stderr_tail=True, private=private)
        self.inv = inv
        self.guest = guest
        self.log = log
        self.child = child
        self.launch_request = launch_request
        self.fifos = fifos
        self.launch_refusal: StepError | None = None  # why the launch was not given to QEMU
        self._launch: asyncio.Future | None = None
        self.attest_socket = attest_socket
        self.attested = False
        self.refusal: str | None = None
        self._verdict_lock = asyncio.Lock()

    async def start(self, binary: str) -> None:
        """QEMU runs already: take it over, and give it its launch."""
        await self.adopt(self.child)
        self._launch = asyncio.ensure_future(self._deliver_launch())

    async def _deliver_launch(self) -> None:
        """The broker's launch into QEMU's FIFOs; on any failure, QEMU is killed before it has a session."""
        try:
            launch = await asyncio.wrap_future(self.launch_request.future)
            self.guest = launch.guest
            godh, session = self.fifos
            await asyncio.gather(self._feed(godh, launch.godh_b64.encode("ascii")),
                                 self._feed(session, launch.session_b64.encode("ascii")))
            for module in ATTESTATION_MODULES:  # QEMU takes far longer to open its monitors than these to load
                importlib.import_module(module)
            gc.freeze()  # what start-up loaded stays: later collections (the guest's lifetime) skip it
            gc.enable()  # sevhook.wrapper.main turned it off for start-up
        except StepError as exc:
            self.launch_refusal = exc
        except SevhookError as exc:
            self.launch_refusal = StepError("launch", exc.message)
        except Exception as exc:  # noqa: BLE001  fail closed with one line, never a traceback
            self.launch_refusal = StepError("launch", f"internal error ({exc.__class__.__name__}: {exc}); "
                                                      "the guest was not started")
        if self.launch_refusal is not None:
            self.kill(signal.SIGKILL)

    async def _feed(self, fifo: Path, data: bytes) -> None:
        """Write `data` into a FIFO once QEMU opened it for reading (a non-blocking open fails with ENXIO
        until then); closing it gives QEMU its end of file."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + UPSTREAM_TIMEOUT
        while True:
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
            if self.process is None or self.process.returncode is not None:
                return  # QEMU is gone before reading it; its own exit is the failure reported
            if loop.time() > deadline:
                raise StepError("launch", f"QEMU did not read {fifo.name} (its sev-guest object's file) within "
                                f"{UPSTREAM_TIMEOUT:g} s; the guest was not started")
            await asyncio.sleep(POLL_INTERVAL)
        try:
            os.set_blocking(fd, True)  # a few KiB: within the pipe's buffer
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except BrokenPipeError:
            return  # QEMU died while reading; its own exit is the failure reported
        finally:
            os.close(fd)

    def intercepts(self, command: str) -> bool:
        return command in REFUSED_COMMANDS or (command == "cont" and not self.attested)

    async def intercept(self, relay: MonitorRelay, command: str, request: dict) -> bool:
        if command in REFUSED_COMMANDS:
            await relay.answer(self._error(request, f"{command}: {REFUSED_COMMANDS[command]}"))
            return True
        if command != "cont" or self.attested:
            return False
        await relay.wait_idle()
        async with self._verdict_lock:  # two clients' `cont`s: one attestation
            if not self.attested and self.refusal is None:
                self.refusal = await self._attest()
                self.attested = self.refusal is None
        if self.attested:
            return False  # libvirt's own `cont` goes to QEMU: LAUNCH_FINISH, then the vCPUs run
        await relay.answer(self._error(request, self.refusal or "attest: refused"))
        asyncio.get_running_loop().call_later(KILL_DELAY, self.kill, signal.SIGKILL)
        return True

    def _error(self, request: dict, reason: str) -> dict:
        return error_reply(QmpError(GENERIC_ERROR, f"{PROG}: {self.guest.name}: {reason}"), request.get("id"))

    async def _attest(self) -> str | None:
        """None when the broker approved and the secret is in; else `step: reason`."""
        if self._launch is not None:
            await self._launch
        if self.launch_refusal is not None:
            return f"{self.launch_refusal.step}: {self.launch_refusal.reason}"
        budget = self.guest.attestation.timeout + DEADLINE_GRACE
        try:
            await asyncio.wait_for(asyncio.to_thread(partial(run_attestation, self.guest, self.attest_socket,
                                                             self.log)), budget)
        except StepError as exc:
            verdict = f"{exc.step}: {exc.reason}"
        except TimeoutError:
            verdict = (f"attest: no verdict within {budget:g} s (<sevhook:attestation timeout="
                       f"'{self.guest.attestation.timeout:g}'>); the guest was not resumed")
        except SevhookError as exc:
            verdict = f"attest: {exc.message}"
        except Exception as exc:  # noqa: BLE001  fail closed with one line, never a traceback
            verdict = f"attest: internal error ({exc.__class__.__name__}: {exc}); the guest was not resumed"
        else:
            self.log.total("ok")
            return None
        self.log.total("failed")
        return " ".join(verdict.split())

    def child_failed_early(self) -> None:
        """QEMU died at start-up. A LAUNCH_START failure on a session made for the cached PDH means the
        platform's PDH is not the cached one any more."""
        text = b"".join(self.stderr_tail).decode("utf-8", "replace")
        if self.launch_refusal is None and any(mark in text for mark in STALE_PDH_MARKS):
            print(f"{PROG}: {self.guest.name}: launch: the platform's PDH changed: run `sevhook platform export` "
                  "(the launch session was made for the cached PDH, and the firmware refused it)", file=sys.stderr)


def run_attestation(guest: ManagedGuest, socket: str, log: StepLog) -> None:
    """The attested launch (sevhook.launch, the hook's and `sevhook start`'s core) over the wrapper's
    private QMP monitor; it never resumes the guest itself: libvirt's held `cont` does that once it
    passed. Raises StepError or SevhookError."""
    from sevhook.launch.qmp_port import MonitorPort  # qemu.qmp: only once libvirt sends cont
    from sevhook.launch.sequence import AttestedLaunch
    from sevhook.monitor.errors import MonitorError
    from sevhook.monitor.qmp import QmpMonitor

    request = replace(launch_request(guest), resume=False)
    deadline = Deadline(request.timeout)
    with log.steps.step("monitor"):
        try:
            monitor = QmpMonitor(socket, timeout=deadline.remaining("monitor"))
        except MonitorError as exc:
            raise HookFailure("monitor", exc.message) from exc
    try:
        AttestedLaunch(request, MonitorPort(monitor), log.steps, deadline).run()
    finally:
        monitor.close()
