"""The one step recorder: every step is recorded once with its time, a failure names its step, a
failure inside a nested step is not recorded twice, and the listener sees each result as it ends."""

from __future__ import annotations

import pytest

from sevhook.errors import SevhookError, StepError
from sevhook.launch.steps import FAILED, INFO, OK, StepFailed, StepResult, Steps


class Clock:
    def __init__(self) -> None:
        self.now = 10.0

    def __call__(self) -> float:
        return self.now


def test_steps_are_timed_and_reported_as_they_end():
    clock, seen = Clock(), []
    steps = Steps(seen.append, clock=clock)
    with steps.step("measure") as note:
        clock.now += 0.25
        note.detail = "found it"
    steps.info("resume", "left paused")
    assert seen == steps.results == [StepResult("measure", OK, 0.25, "found it"), StepResult("resume", INFO, 0.0,
                                                                                             "left paused")]
    assert steps.elapsed == pytest.approx(0.25)


def test_a_sevhook_error_becomes_a_failure_of_its_step_with_its_cause():
    steps = Steps()
    with pytest.raises(StepFailed) as caught, steps.step("attest"):
        raise SevhookError("the broker refused the measurement")
    assert (caught.value.step, caught.value.reason) == ("attest", "the broker refused the measurement")
    assert isinstance(caught.value.__cause__, SevhookError)
    assert [(r.name, r.status, r.detail) for r in steps.results] == [("attest", FAILED,
                                                                      "the broker refused the measurement")]


def test_a_step_error_of_the_step_keeps_its_type_and_is_recorded_once():
    class ShellFailure(StepError):
        pass

    steps = Steps()
    with pytest.raises(ShellFailure), steps.step("load"):
        raise ShellFailure("load", "not XML")
    with pytest.raises(StepFailed) as caught, steps.step("outer"), steps.step("inner"):
        raise SevhookError("broken")
    assert caught.value.step == "inner"
    assert [(r.name, r.status, r.detail) for r in steps.results] == [("load", FAILED, "not XML"),
                                                                      ("inner", FAILED, "broken")]
    assert steps.current == "inner"


def test_a_bug_is_recorded_and_passes_unchanged():
    steps = Steps()
    with pytest.raises(KeyError), steps.step("inject"):
        raise KeyError("x")
    assert steps.results[-1].status == FAILED and "KeyError" in steps.results[-1].detail
