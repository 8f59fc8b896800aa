"""The hook's pure decisions: operations to actions, paused and launch-state checks, the broker's
packet, readiness before QEMU starts, and the shared time budget."""

from __future__ import annotations

import base64

import pytest

from sevhook.hook import plan
from sevhook.hook.plan import Action, Deadline, HookFailure, ManagedGuest
from sevhook.monitor.types import SevInfo, VmStatus
from sevhook.sev.policy import SevPolicy, SnpPolicy
from sevhook.xml.models import Attestation, BrokerRef, Domain, SevLaunchSecurity, SevSnpLaunchSecurity


def _guest(policy: int = 1, launch_id: str | None = "L1", blobs: bool = True) -> ManagedGuest:
    security = SevLaunchSecurity(policy=SevPolicy(policy), dh_cert="A" * 8 if blobs else None,
                                 session="B" * 8 if blobs else None)
    attestation = Attestation(broker=BrokerRef("http://127.0.0.1:1"), guest_id="g", launch_id=launch_id,
                              socket="/run/sevhook/g.qmp")
    return ManagedGuest("g", security, attestation)


def _info(**changes: object) -> SevInfo:
    values: dict[str, object] = dict(enabled=True, api_major=1, api_minor=49, build_id=6, state="launch-secret",
                                     sev_type="sev", policy=1, handle=1)
    values.update(changes)
    return SevInfo(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("operation", "action"),
    [("prepare", Action.VALIDATE), ("start", Action.PREPARE_RUNTIME), ("started", Action.ATTEST),
     ("stopped", Action.CLEAN_UP), ("release", Action.CLEAN_UP), ("migrate", Action.REFUSE_MOVE),
     ("restore", Action.REFUSE_MOVE), ("reconnect", Action.NOTHING), ("attach", Action.NOTHING),
     ("some-future-op", Action.NOTHING)],
)
def test_operations_map_to_actions(operation, action):
    assert plan.action_for(operation) is action


def test_domains_without_metadata_are_not_managed():
    assert plan.managed_guest(Domain(name="plain", type="kvm")) is None
    with_sev = Domain(name="sev", type="kvm", launch_security=SevLaunchSecurity(policy=SevPolicy(1)))
    assert plan.managed_guest(with_sev) is None


def test_metadata_on_a_guest_without_valid_sev_is_refused():
    attestation = _guest().attestation
    with pytest.raises(HookFailure, match="no valid <launchSecurity>"):
        plan.managed_guest(Domain(name="x", type="kvm", attestation=attestation))
    snp = Domain(name="x", type="kvm", attestation=attestation,
                 launch_security=SevSnpLaunchSecurity(SnpPolicy(0x30000)))
    with pytest.raises(HookFailure, match="type 'sev-snp'"):
        plan.managed_guest(snp)


def test_readiness_names_what_prepare_domain_adds():
    assert plan.readiness_problems(_guest()) == []
    problems = plan.readiness_problems(_guest(launch_id=None, blobs=False))
    assert len(problems) == 2
    assert all("sevhook prepare-domain" in problem for problem in problems)


def test_running_guest_fails_the_paused_check_with_the_way_out():
    plan.check_paused(_guest(), VmStatus("prelaunch", False))
    with pytest.raises(HookFailure) as caught:
        plan.check_paused(_guest(), VmStatus("running", True))
    assert caught.value.step == "paused-check"
    assert "virsh start --paused g" in caught.value.reason and "sevhook start" not in caught.value.reason


@pytest.mark.parametrize(
    ("info", "words"),
    [
        (_info(enabled=False, state="uninit"), "not enabled"),
        (_info(sev_type="sev-snp", policy=None, snp_policy=0x30000), "sev-snp"),
        (_info(state="running"), "'running'"),
        (_info(policy=5), "policy 0x0005"),
    ],
)
def test_launch_state_checks(info, words):
    with pytest.raises(HookFailure, match=words) as caught:
        plan.check_launch_state(_guest(), info)
    assert caught.value.step == "query-sev"


def test_waiting_sev_launch_passes():
    plan.check_launch_state(_guest(), _info())
    plan.check_after_inject(_info())
    with pytest.raises(HookFailure, match="after the secret"):
        plan.check_after_inject(_info(state="running"))


def test_secret_packet_shape():
    header = base64.b64encode(bytes(52)).decode()
    plan.check_secret_packet(header, base64.b64encode(bytes(32)).decode())
    with pytest.raises(HookFailure, match="51 bytes"):
        plan.check_secret_packet(base64.b64encode(bytes(51)).decode(), "AAAA")
    with pytest.raises(HookFailure, match="base64"):
        plan.check_secret_packet(header, "not base64!")
    with pytest.raises(HookFailure, match="empty"):
        plan.check_secret_packet(header, "")


def test_missing_launch_id_is_a_metadata_failure():
    assert plan.launch_id(_guest()) == "L1"
    with pytest.raises(HookFailure, match="prepare-domain"):
        plan.launch_id(_guest(launch_id=None))


def test_deadline_is_shared_by_the_steps():
    now = [100.0]
    deadline = Deadline(5, clock=lambda: now[0])
    assert deadline.remaining("monitor") == 5
    now[0] = 103.5
    assert deadline.remaining("attest") == pytest.approx(1.5)
    assert not deadline.expired()
    now[0] = 105.0
    assert deadline.expired()
    with pytest.raises(HookFailure, match="5 s budget") as caught:
        deadline.remaining("inject")
    assert caught.value.step == "inject"


def test_private_monitor_argument():
    assert plan.private_monitor_arg("/run/sevhook/g.qmp") == "unix:/run/sevhook/g.qmp,server=on,wait=off"
