"""One attested launch over a LaunchPort: the guest is paused in launch-secret (QEMU measured it),
its launch measurement goes to the guest owner's key broker, the secret the broker wraps for exactly
this launch is injected and checked, and the guest is resumed. Any failure, expected or not, makes
the port fail closed (stop, destroy or quit, whichever the transport can) before it is raised, so no
vCPU runs without a verdict; a refused guest gets no secret.

Before the guest starts, `create_launch` asks the broker for the launch session (GODH certificate and
session blob) that QEMU needs to begin the launch."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from sevhook.errors import SevhookError, StepError
from sevhook.launch import checks
from sevhook.launch.broker import ATTEST_RETRIES, SESSION_RETRIES, BrokerFactory, open_broker
from sevhook.launch.checks import Deadline
from sevhook.launch.steps import FAILED, OK, StepFailed, StepNote, StepResult, Steps
from sevhook.sev.secret_area import check_injection_target

if TYPE_CHECKING:
    from sevhook.broker.client import LaunchGrant, SecretGrant
    from sevhook.monitor.types import SevInfo, VmStatus
    from sevhook.sev.measurement import LaunchMeasurement
    from sevhook.xml.models import BrokerRef

FAIL_CLOSED_TIMEOUT = 2.0


@dataclass(frozen=True)
class MeasuredLaunch:
    """A measured launch as the broker needs it: the measurement and the firmware that made it."""

    measurement: LaunchMeasurement
    api_major: int
    api_minor: int
    build_id: int
    policy: int


class LaunchPort(Protocol):
    """What the sequence needs from one paused guest, whatever the transport (QEMU's QMP monitor, or
    libvirt's public APIs). `timeout` bounds each following call where the transport allows it."""

    timeout: float
    reads_launch_state: bool  # query-sev is available: paused-check, query-sev and verify are steps of their own
    fail_closed_step: str  # the name of the step that fails closed: "halt", "destroy", "quit"

    def status(self) -> VmStatus:
        """The run state; a port without `reads_launch_state` reports a waiting guest as 'paused'."""
        ...

    def launch_state(self) -> SevInfo:
        """query-sev (only called when `reads_launch_state`)."""
        ...

    def measured_launch(self, info: SevInfo | None) -> MeasuredLaunch:
        """The launch measurement and firmware version (`info`: the launch state read before, if any)."""
        ...

    def inject_secret(self, header_b64: str, secret_b64: str) -> None: ...

    def resume(self) -> None: ...

    def fail_closed(self) -> str:
        """Keep the guest from running unattested (stop its vCPUs, destroy it or quit QEMU); says
        what it did, or '' when there was nothing to do (then no step is recorded)."""
        ...


@dataclass(frozen=True)
class LaunchRequest:
    """What the guest owner asked for, from the domain's metadata and launch security."""

    name: str
    launch_id: str
    policy: int
    broker: BrokerRef
    timeout: float
    resume: bool = True
    loader: str | None = None  # the firmware file, whose secret area must hold the packet (None: not known)


@dataclass(frozen=True)
class AttestedGuest:
    """What a successful attestation did (no secrets: the packet went straight to the port)."""

    launch_id: str
    measurement: LaunchMeasurement
    resumed: bool


class AttestedLaunch:
    """One attested launch on one port; `run()` performs it or raises StepFailed after failing closed."""

    def __init__(self, request: LaunchRequest, port: LaunchPort, steps: Steps, deadline: Deadline | None = None,
                 broker_factory: BrokerFactory = open_broker) -> None:
        self.request = request
        self.port = port
        self.steps = steps
        self.deadline = deadline or Deadline(request.timeout)
        self.broker_factory = broker_factory

    @contextmanager
    def _step(self, name: str) -> Iterator[StepNote]:
        """Record the step, bound the port by the time left, and say when the budget ran out."""
        with self.steps.step(name) as note:
            try:
                self.port.timeout = self.deadline.remaining(name)
                yield note
            except StepError:
                raise
            except SevhookError as exc:
                reason = exc.message
                if self.deadline.expired():
                    reason += (f" (the attestation's {self.deadline.seconds:g} s budget ran out: "
                               "<sevhook:attestation timeout>)")
                raise StepFailed(name, reason) from exc

    def run(self) -> AttestedGuest:
        try:
            return self._attest()
        except BaseException:  # any failure, expected or not: the vCPUs must not run without a verdict
            fail_closed(self.port, self.steps)
            raise

    def _attest(self) -> AttestedGuest:
        request, port = self.request, self.port
        info = self._check_state() if port.reads_launch_state else None
        with self._step("measure") as note:
            if info is None:  # without the launch state, at least the transport must report the guest paused
                status = port.status()
                if status.status != "paused":
                    raise StepFailed("measure", f"the domain is {status.status} instead of paused, so its launch "
                                     "may have finished without a verdict")
            launch = port.measured_launch(info)
            if launch.policy != request.policy:
                raise StepFailed("measure", f"the guest was launched with policy {launch.policy:#06x}, the "
                                 f"broker's session is for {request.policy:#06x}")
            # the measurement is not secret: the broker gets it in clear
            note.detail = (f"firmware API {launch.api_major}.{launch.api_minor} build {launch.build_id}, "
                           f"measurement {launch.measurement.measurement.hex()[:16]}")
        with self._step("attest") as note:
            grant = self._ask_broker(launch)
            note.detail = "the key broker accepted the measurement and released the secret"
        with self._step("inject") as note:
            size = checks.check_secret_packet(grant.header_b64, grant.secret_b64)
            check_injection_target(request.loader, grant.secret_b64)
            port.inject_secret(grant.header_b64, grant.secret_b64)
            note.detail = f"{size}-byte secret packet injected"
        if info is not None:
            with self._step("verify") as note:
                checks.check_after_inject(port.launch_state())
                note.detail = "the launch waits for LAUNCH_FINISH"
        if request.resume:
            with self._step("resume") as note:
                port.resume()
                note.detail = "running"
        else:
            self.steps.info("resume", "left paused as the metadata asks (resume='no')")
        return AttestedGuest(request.launch_id, launch.measurement, request.resume)

    def _check_state(self) -> SevInfo:
        """paused-check and query-sev, for a port that can read the launch state."""
        with self._step("paused-check"):
            checks.check_paused(self.request.name, self.port.status())
        with self._step("query-sev"):
            info = self.port.launch_state()
            checks.check_launch_state(info, self.request.policy)
        return info

    def _ask_broker(self, launch: MeasuredLaunch) -> SecretGrant:
        broker = self.broker_factory(self.request.broker, self.deadline.remaining("attest"), ATTEST_RETRIES)
        try:
            return broker.attest(self.request.launch_id, launch.measurement.b64, launch.api_major,
                                 launch.api_minor, launch.build_id, launch.policy)
        finally:
            broker.close()


def fail_closed(port: LaunchPort, steps: Steps) -> None:
    """Best effort after a failure: the port stops, destroys or quits the guest. What it did is
    recorded as a step of its own (nothing, when there was nothing to do); a failure there is
    recorded too, but the first failure is the one the caller raises."""
    begin = time.monotonic()
    try:
        port.timeout = FAIL_CLOSED_TIMEOUT
        done = port.fail_closed()
    except SevhookError as exc:  # the caller's failure still makes libvirt (or the wrapper) end the guest
        steps.record(StepResult(port.fail_closed_step, FAILED, time.monotonic() - begin, exc.message))
        return
    if done:
        steps.record(StepResult(port.fail_closed_step, OK, time.monotonic() - begin, done))


def create_launch(steps: Steps, broker: BrokerRef, guest_id: str, pdh_b64: str, chain_b64: str,
                  deadline: Deadline, broker_factory: BrokerFactory = open_broker,
                  cpu0_id_b64: str | None = None) -> LaunchGrant:
    """The `session` step: a fresh launch of `guest_id` at the broker for this platform's PDH (the chip
    id lets the broker find the ASK-signed CEK the firmware's export lacks)."""
    with steps.step("session") as note:
        client = broker_factory(broker, deadline.remaining("session"), SESSION_RETRIES)
        try:
            grant = client.create_launch(guest_id, pdh_b64, chain_b64, cpu0_id_b64)
        except SevhookError:
            deadline.remaining("session")  # out of time: say so, rather than the broker's timeout it caused
            raise
        finally:
            client.close()
        note.detail = f"launch {grant.launch_id}, policy {grant.policy:#06x}"
    return grant
