"""The `started` sequence for a guest libvirt started paused: check it is paused and waiting in
launch-secret, read its launch measurement, let the guest owner's key broker judge it, inject the
secret the broker wraps for exactly this launch, check, and resume. Any failure leaves the vCPUs
stopped (the caller exits 1 and libvirt destroys the guest); a refused guest gets no secret.

The transport is a LaunchMonitor, so `sevhook start` can run the same sequence through libvirt."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from sevhook.errors import SevhookError
from sevhook.hook import plan
from sevhook.hook.plan import Deadline, HookFailure, ManagedGuest
from sevhook.hook.steplog import StepLog
from sevhook.monitor.types import LaunchMonitor

if TYPE_CHECKING:
    from sevhook.broker.client import BrokerClient, SecretGrant
    from sevhook.xml.models import BrokerRef

HALT_TIMEOUT = 2.0

BrokerFactory = Callable[["BrokerRef", float], "BrokerClient"]


def open_broker(ref: BrokerRef, timeout: float) -> BrokerClient:
    """A broker client bounded by what is left of the attestation's time (no retries: the
    measurement may be sent once only, and the budget is the administrator's)."""
    from sevhook.broker.client import BrokerClient  # noqa: PLC0415  (only when attesting)

    return BrokerClient(ref.url, ca_file=ref.ca_file, token_file=ref.token_file, timeout=timeout, retries=0)


class AttestedLaunch:
    """One attested launch on one monitor; `run()` performs it or raises HookFailure."""

    def __init__(self, guest: ManagedGuest, monitor: LaunchMonitor, deadline: Deadline, log: StepLog,
                 broker_factory: BrokerFactory = open_broker) -> None:
        self.guest = guest
        self.monitor = monitor
        self.deadline = deadline
        self.log = log
        self.broker_factory = broker_factory

    @contextmanager
    def _step(self, name: str) -> Iterator[None]:
        """Log the step, bound the monitor by the time left, and name the step in any failure."""
        with self.log.step(name):
            try:
                self.monitor.timeout = self.deadline.remaining(name)
                yield
            except HookFailure:
                raise
            except SevhookError as exc:
                reason = exc.message
                if self.deadline.expired():
                    reason += (f" (the attestation's {self.deadline.seconds:g} s budget ran out: "
                               "<sevhook:attestation timeout>)")
                raise HookFailure(name, reason) from None

    def run(self) -> None:
        try:
            self._attest()
        except BaseException:  # any failure, expected or not: the vCPUs must not run without a verdict
            self._halt()
            raise

    def _attest(self) -> None:
        guest, monitor = self.guest, self.monitor
        with self._step("paused-check"):
            plan.check_paused(guest, monitor.status())
        with self._step("query-sev"):
            info = monitor.query_sev()
            plan.check_launch_state(guest, info)
        with self._step("measure"):
            measurement = monitor.launch_measurement()
        with self._step("attest"):
            grant = self._ask_broker(plan.launch_id(guest), measurement.b64, info.api_major, info.api_minor,
                                     info.build_id, guest.launch_security.policy.value)
        with self._step("inject"):
            plan.check_secret_packet(grant.header_b64, grant.secret_b64)
            from sevhook.sev.secret_area import check_injection_target  # noqa: PLC0415  (only when injecting)

            check_injection_target(guest.loader, grant.secret_b64)
            monitor.inject_secret(grant.header_b64, grant.secret_b64)
        with self._step("verify"):
            plan.check_after_inject(monitor.query_sev())
        if guest.attestation.resume:
            with self._step("resume"):
                monitor.cont()

    def _ask_broker(self, launch_id: str, measurement_b64: str, api_major: int, api_minor: int, build_id: int,
                    policy: int) -> SecretGrant:
        broker = self.broker_factory(self.guest.attestation.broker, self.deadline.remaining("attest"))
        try:
            return broker.attest(launch_id, measurement_b64, api_major, api_minor, build_id, policy)
        finally:
            broker.close()

    def _halt(self) -> None:
        """Best effort after a failure: a guest whose vCPUs run without a verdict is stopped."""
        try:
            self.monitor.timeout = HALT_TIMEOUT
            if self.monitor.status().running:
                with self.log.step("halt"):
                    self.monitor.stop()
        except SevhookError:
            pass  # the caller's non-zero exit still makes libvirt destroy the guest
