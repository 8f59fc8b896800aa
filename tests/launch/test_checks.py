"""The attested launch's pure checks: paused and launch-state checks, the broker's packet, and the
time budget all steps share."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sevhook.launch import checks
from sevhook.launch.checks import Deadline
from sevhook.launch.steps import StepFailed
from sevhook.monitor.types import SevInfo, VmStatus


def _info(**changes: object) -> SevInfo:
    values: dict[str, object] = {"enabled": True, "api_major": 1, "api_minor": 49, "build_id": 6,
                                 "state": "launch-secret", "sev_type": "sev", "policy": 1, "handle": 1}
    values.update(changes)
    return SevInfo(**values)  # type: ignore[arg-type]


def test_running_guest_fails_the_paused_check_with_the_way_out():
    checks.check_paused("g", VmStatus("prelaunch", False))
    with pytest.raises(StepFailed) as caught:
        checks.check_paused("g", VmStatus("running", True))
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
    with pytest.raises(StepFailed, match=words) as caught:
        checks.check_launch_state(info, policy=1)
    assert caught.value.step == "query-sev"


def test_waiting_sev_launch_passes():
    checks.check_launch_state(_info(), policy=1)
    checks.check_after_inject(_info())
    with pytest.raises(StepFailed, match="after the secret"):
        checks.check_after_inject(_info(state="running"))


def test_secret_packet_shape():
    header = base64.b64encode(bytes(52)).decode()
    assert checks.check_secret_packet(header, base64.b64encode(bytes(32)).decode()) == 32
    with pytest.raises(StepFailed, match="51 bytes"):
        checks.check_secret_packet(base64.b64encode(bytes(51)).decode(), "AAAA")
    with pytest.raises(StepFailed, match="base64"):
        checks.check_secret_packet(header, "not base64!")
    with pytest.raises(StepFailed, match="empty"):
        checks.check_secret_packet(header, "")


def test_deadline_is_shared_by_the_steps():
    now = [100.0]
    deadline = Deadline(5, clock=lambda: now[0])
    assert deadline.remaining("monitor") == 5
    now[0] = 103.5
    assert deadline.remaining("attest") == pytest.approx(1.5)
    assert not deadline.expired()
    now[0] = 105.0
    assert deadline.expired()
    with pytest.raises(StepFailed, match="5 s budget") as caught:
        deadline.remaining("inject")
    assert caught.value.step == "inject"


@given(st.text(max_size=120), st.text(max_size=120))
def test_any_packet_is_accepted_or_refused_as_an_inject_failure(header_b64, secret_b64):
    """Whatever the broker sends, the check answers with a size or one clear inject failure."""
    try:
        size = checks.check_secret_packet(header_b64, secret_b64)
    except StepFailed as failure:
        assert failure.step == "inject" and failure.reason
    else:
        assert size > 0
