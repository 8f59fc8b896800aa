"""The hook's pure decisions: operations to actions, managed guests, readiness before QEMU starts and
the launch a guest asks for (the launch's own checks are tests/launch/test_checks.py's)."""

from __future__ import annotations

import pytest

from sevhook.hook import plan
from sevhook.hook.plan import Action, HookFailure, ManagedGuest
from sevhook.sev.policy import SevPolicy, SnpPolicy
from sevhook.xml.models import Attestation, BrokerRef, Domain, SevLaunchSecurity, SevSnpLaunchSecurity


def _guest(policy: int = 1, launch_id: str | None = "L1", blobs: bool = True) -> ManagedGuest:
    security = SevLaunchSecurity(policy=SevPolicy(policy), dh_cert="A" * 8 if blobs else None,
                                 session="B" * 8 if blobs else None)
    attestation = Attestation(broker=BrokerRef("http://127.0.0.1:1"), guest_id="g", launch_id=launch_id,
                              socket="/run/sevhook/g.qmp")
    return ManagedGuest("g", security, attestation)


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


def test_missing_launch_id_is_a_metadata_failure():
    request = plan.launch_request(_guest(policy=3))
    assert (request.name, request.launch_id, request.policy, request.broker.url) == ("g", "L1", 3,
                                                                                    "http://127.0.0.1:1")
    with pytest.raises(HookFailure, match="prepare-domain"):
        plan.launch_request(_guest(launch_id=None))


def test_private_monitor_argument():
    assert plan.private_monitor_arg("/run/sevhook/g.qmp") == "unix:/run/sevhook/g.qmp,server=on,wait=off"
