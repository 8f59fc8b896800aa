"""The one attested-launch sequence over a LaunchPort: the steps in order for a port that reads the
launch state (QMP) and for one that does not (libvirt's public API), fail closed on every kind of
failure, no secret for a refused measurement, and the time budget. The real transports are driven
by tests/hook (QMP monitor) and tests/flow (libvirt)."""

from __future__ import annotations

import base64

import pytest

from sevhook.broker.client import SecretGrant
from sevhook.errors import SevhookError
from sevhook.launch.checks import Deadline
from sevhook.launch.sequence import AttestedLaunch, LaunchRequest, MeasuredLaunch
from sevhook.launch.steps import StepFailed, Steps
from sevhook.monitor.types import SevInfo, VmStatus
from sevhook.sev.measurement import LaunchMeasurement
from sevhook.xml.models import BrokerRef

HEADER = base64.b64encode(bytes(52)).decode()
SECRET = base64.b64encode(bytes(range(64))).decode()
REQUEST = LaunchRequest("g", "L1", 1, BrokerRef("http://127.0.0.1:9"), 10.0)


class Port:
    """A paused guest whose transport is a list of calls; `fail_at` makes one call raise."""

    def __init__(self, reads_launch_state: bool = True, fail_at: str | None = None, state: str = "launch-secret",
                 running: bool = False) -> None:
        self.reads_launch_state = reads_launch_state
        self.fail_closed_step = "halt"
        self.timeout = 0.0
        self.fail_at = fail_at
        self.state = state
        self.running = running
        self.calls: list[str] = []
        self.timeouts: list[float] = []

    def _do(self, call: str) -> None:
        self.calls.append(call)
        self.timeouts.append(self.timeout)
        if call == self.fail_at:
            raise SevhookError(f"QEMU refused {call}")

    def status(self) -> VmStatus:
        self._do("status")
        return VmStatus("running" if self.running else "paused", self.running)

    def launch_state(self) -> SevInfo:
        self._do("query-sev")
        return SevInfo(True, 1, 49, 6, self.state, "sev", policy=1)

    def measured_launch(self, info: SevInfo | None) -> MeasuredLaunch:
        self._do("measure")
        return MeasuredLaunch(LaunchMeasurement(bytes(32), bytes(16)), 1, 49, 6, 1)

    def inject_secret(self, header_b64: str, secret_b64: str) -> None:
        self._do("inject")

    def resume(self) -> None:
        self._do("cont")
        self.running = True

    def fail_closed(self) -> str:
        self.calls.append("fail-closed")
        if not self.running:
            return ""
        self.running = False
        return "stopped"


class Broker:
    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.asked: list[tuple[object, ...]] = []

    def attest(self, *args: object) -> SecretGrant:
        self.asked.append(args)
        if self.refuse:
            raise SevhookError("the key broker refused the launch (reason: measurement-mismatch)")
        return SecretGrant(HEADER, SECRET)

    def create_launch(self, *args: object) -> object:
        raise AssertionError("not part of the attestation")

    def close(self) -> None:
        pass


def _run(port: Port, broker: Broker, steps: Steps, request: LaunchRequest = REQUEST) -> AttestedLaunch:
    launch = AttestedLaunch(request, port, steps, Deadline(request.timeout), lambda _ref, _timeout, _retries: broker)
    launch.run()
    return launch


def test_over_a_port_that_reads_the_launch_state():
    port, broker, steps = Port(), Broker(), Steps()
    _run(port, broker, steps)
    assert [r.name for r in steps.results] == ["paused-check", "query-sev", "measure", "attest", "inject", "verify",
                                               "resume"]
    assert port.calls == ["status", "query-sev", "measure", "inject", "query-sev", "cont"]
    assert broker.asked == [("L1", base64.b64encode(bytes(48)).decode(), 1, 49, 6, 1)]
    assert all(0 < timeout <= 10 for timeout in port.timeouts)
    assert steps.results[4].detail == "64-byte secret packet injected"


def test_over_a_port_without_the_launch_state():
    port, steps = Port(reads_launch_state=False), Steps()
    _run(port, Broker(), steps, LaunchRequest("g", "L1", 1, BrokerRef("http://127.0.0.1:9"), 10.0, resume=False))
    assert [r.name for r in steps.results] == ["measure", "attest", "inject", "resume"]
    assert steps.results[-1].status == "info" and port.calls == ["status", "measure", "inject"]


@pytest.mark.parametrize(("fail_at", "step"), [("query-sev", "query-sev"), ("measure", "measure"),
                                                 ("inject", "inject"), ("cont", "resume")])
def test_every_failure_fails_closed(fail_at, step):
    port, steps = Port(fail_at=fail_at), Steps()
    with pytest.raises(StepFailed) as caught:
        _run(port, Broker(), steps)
    assert caught.value.step == step and port.calls[-1] == "fail-closed"
    assert steps.current == step


def test_a_refused_measurement_gets_no_secret():
    port, steps = Port(), Steps()
    with pytest.raises(StepFailed, match="measurement-mismatch") as caught:
        _run(port, Broker(refuse=True), steps)
    assert caught.value.step == "attest" and "inject" not in port.calls and port.calls[-1] == "fail-closed"


def test_a_guest_started_running_is_stopped():
    port, steps = Port(running=True), Steps()
    with pytest.raises(StepFailed, match="virsh start --paused g"):
        _run(port, Broker(), steps)
    assert not port.running and [(r.name, r.detail) for r in steps.results][-1] == ("halt", "stopped")


def test_a_launch_no_longer_waiting_for_its_secret_is_refused():
    port = Port(state="running")
    with pytest.raises(StepFailed, match="expected 'launch-secret'") as caught:
        _run(port, Broker(), Steps())
    assert caught.value.step == "query-sev"


def test_an_interruption_fails_closed_too():
    class Interrupted(Port):
        def inject_secret(self, header_b64: str, secret_b64: str) -> None:
            raise KeyboardInterrupt

    port = Interrupted()
    with pytest.raises(KeyboardInterrupt):
        _run(port, Broker(), Steps())
    assert port.calls[-1] == "fail-closed"
