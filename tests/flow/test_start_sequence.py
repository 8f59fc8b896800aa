"""The start sequence's fail-closed rules, on its injected ports (test_start.py drives the same code
through real libvirtd): a guest it started is destroyed on every kind of failure, including an
interruption; a domain it did not start is never destroyed; the steps come in order with times."""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

from sevhook.broker.client import LaunchGrant, SecretGrant
from sevhook.errors import SevhookError
from sevhook.flow.start import StartSequence
from sevhook.hook.runtime import MarkerState, start_marker, start_marker_path, start_marker_state
from sevhook.launch.steps import FAILED, OK, StepFailed, Steps
from sevhook.monitor.types import LaunchInfo
from sevhook.sev.certs import SevCertificate
from sevhook.sev.session import create_session
from sevhook.xml.models import SEVHOOK_NS

XML = f"""<domain type='kvm'><name>d</name>
  <metadata><sevhook:attestation xmlns:sevhook='{SEVHOOK_NS}' timeout='30'>
    <sevhook:broker url='http://127.0.0.1:9'/><sevhook:guest id='g'/>
  </sevhook:attestation></metadata>
  <memory unit='MiB'>128</memory><vcpu>1</vcpu>
  <os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
  <launchSecurity type='sev'><policy>0x0001</policy></launchSecurity>
</domain>"""
MEASUREMENT = base64.b64encode(bytes(range(48))).decode()


class Domain:
    """A domain whose libvirt side is a list of calls; `fail_at` makes one call raise."""

    name = "d"

    def __init__(self, fail_at: str | None = None, error: BaseException | None = None, state: str = "shutoff",
                 xml: str = XML):
        self.xml = xml
        self.calls: list[str] = []
        self.fail_at = fail_at
        self.error = error or SevhookError(f"libvirt refused {fail_at}")
        self._state = state

    def _do(self, call: str) -> None:
        self.calls.append(call)
        if call == self.fail_at:
            raise self.error

    def state(self) -> str:
        return self._state

    def inactive_xml(self) -> str:
        return self.xml

    def redefine(self, xml: str) -> None:
        self._do("redefine")

    def start_paused(self) -> None:
        self._do("start")
        self._state = "paused"

    def launch_info(self) -> LaunchInfo:
        self._do("launch_info")
        return LaunchInfo(MEASUREMENT, 1, 55, 21, 1)

    def inject(self, header_b64: str, secret_b64: str) -> None:
        self._do("inject")

    def resume(self) -> None:
        self._do("resume")
        self._state = "running"

    def destroy(self) -> bool:
        self.calls.append("destroy")
        was_running = self._state != "shutoff"
        self._state = "shutoff"
        return was_running


class Broker:
    def __init__(self, godh_b64: str, session_b64: str, refuse: bool = False) -> None:
        self.grant = LaunchGrant("L1", godh_b64, session_b64, 1)
        self.refuse = refuse

    def create_launch(self, guest: str, pdh_b64: str, cert_chain_b64: str,
                      cpu0_id_b64: str | None = None) -> LaunchGrant:
        assert cpu0_id_b64 == "Y3B1MA=="  # the chip id reaches the broker, for the signed CEK
        return self.grant

    def attest(self, launch_id: str, measurement_b64: str, api_major: int, api_minor: int, build_id: int,
               policy: int) -> SecretGrant:
        if self.refuse:
            raise SevhookError("the key broker refused: no (reason: measurement-mismatch)")
        return SecretGrant(base64.b64encode(bytes(52)).decode(), base64.b64encode(bytes(64)).decode())

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def blobs(shared: Path) -> tuple[str, str]:
    session = create_session(SevCertificate.parse((shared / "vectors/chains/naples/pdh.cert").read_bytes()), 1)
    return session.godh_b64, session.session_b64


def run(domain: Domain, broker: Broker) -> Steps:
    steps = Steps()
    StartSequence(domain, lambda: ("pdh", "chain", "Y3B1MA=="), steps, lambda _ref, _timeout, _retries: broker,
                  claim=claim_recorder(domain)).run()
    return steps


def claim_recorder(domain: Domain) -> Callable[[str], AbstractContextManager[None]]:
    """A LaunchClaim that records in the domain's calls when the hook's marker is held."""

    @contextmanager
    def claim(name: str) -> Iterator[None]:
        domain.calls.append(f"claim {name}")
        try:
            yield
        finally:
            domain.calls.append(f"release {name}")

    return claim


def test_success_runs_every_step_in_order(blobs: tuple[str, str]) -> None:
    domain = Domain()
    steps = run(domain, Broker(*blobs))
    assert [r.name for r in steps.results] == ["metadata", "platform", "session", "define", "start", "measure",
                                               "attest", "inject", "resume"]
    assert all(r.status == OK and r.seconds >= 0 for r in steps.results)
    assert domain.calls == ["redefine", "claim d", "start", "release d", "launch_info", "inject", "resume"]


@pytest.mark.parametrize("fail_at", ["launch_info", "inject", "resume"])
def test_a_failure_after_start_destroys_the_guest(blobs: tuple[str, str], fail_at: str) -> None:
    domain = Domain(fail_at)
    with pytest.raises(StepFailed) as failure:
        run(domain, Broker(*blobs))
    assert domain.calls[-1] == "destroy" and domain.state() == "shutoff"
    assert failure.value.step == {"launch_info": "measure", "inject": "inject", "resume": "resume"}[fail_at]


def test_a_refusal_destroys_the_guest_before_any_secret(blobs: tuple[str, str]) -> None:
    domain = Domain()
    with pytest.raises(StepFailed, match=r"^attest: the key broker refused"):
        run(domain, Broker(*blobs, refuse=True))
    assert "inject" not in domain.calls and domain.calls[-1] == "destroy"


def test_an_interruption_after_start_still_destroys_the_guest(blobs: tuple[str, str]) -> None:
    domain = Domain("inject", KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        run(domain, Broker(*blobs))
    assert domain.calls[-1] == "destroy" and domain.state() == "shutoff"


def test_a_failure_before_start_does_not_touch_the_domain(blobs: tuple[str, str]) -> None:
    domain = Domain("redefine")
    with pytest.raises(StepFailed) as failure:
        run(domain, Broker(*blobs))
    assert failure.value.step == "define" and domain.calls == ["redefine"]


def test_a_running_domain_is_never_destroyed(blobs: tuple[str, str]) -> None:
    domain = Domain(state="running")
    steps = Steps()
    with pytest.raises(StepFailed, match=r"^metadata: domain d is running"):
        StartSequence(domain, lambda: ("pdh", "chain", "Y3B1MA=="), steps, lambda *_args: Broker(*blobs),
                      claim=claim_recorder(domain)).run()
    assert domain.calls == [] and steps.results[-1].status == FAILED


def test_a_domain_prepared_for_the_hook_is_left_to_the_hook(blobs: tuple[str, str]) -> None:
    """<sevhook:monitor> declares hook mode: with the hook installed both would attest one start."""
    domain = Domain(xml=XML.replace("<sevhook:guest id='g'/>",
                                    "<sevhook:guest id='g'/><sevhook:monitor socket='/run/sevhook/d.qmp'/>"))
    with pytest.raises(StepFailed, match=r"declares <sevhook:monitor>.*virsh start --paused d"):
        run(domain, Broker(*blobs))
    assert domain.calls == []


def test_the_claim_is_released_when_libvirt_refuses_the_start(blobs: tuple[str, str]) -> None:
    domain = Domain("start")
    with pytest.raises(StepFailed) as failure:
        run(domain, Broker(*blobs))
    assert failure.value.step == "start"
    assert domain.calls[:3] == ["redefine", "claim d", "start"] and domain.calls[3] == "release d"


def test_the_real_claim_writes_the_hooks_marker_only_while_starting(blobs: tuple[str, str], tmp_path: Path) -> None:
    """The marker exists, 0600, with this process's pid, exactly while libvirt starts the domain."""
    seen: list[tuple[MarkerState, int, str]] = []
    marker = start_marker_path("d", tmp_path)

    class Watched(Domain):
        def start_paused(self) -> None:
            seen.append((start_marker_state("d", tmp_path), stat.S_IMODE(marker.stat().st_mode),
                         marker.read_text().split()[0]))
            super().start_paused()

    domain = Watched()
    StartSequence(domain, lambda: ("pdh", "chain", "Y3B1MA=="), Steps(), lambda *_args: Broker(*blobs),
                  claim=lambda name: start_marker(name, tmp_path)).run()
    assert seen == [(MarkerState.LIVE, 0o600, str(os.getpid()))]
    assert not marker.exists() and list(tmp_path.iterdir()) == []
