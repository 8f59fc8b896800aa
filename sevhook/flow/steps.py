"""Named, timed steps: each flow is a sequence of them, every outcome is reported as it happens (so a
user sees where a launch is and where it stopped), and every failure is one StepFailed naming its
step. Details and reasons never carry secrets: callers pass step names, sizes, hashes and the error
texts of QEMU, libvirt and the broker."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from sevhook.errors import SevhookError, StepError

OK = "ok"
FAILED = "failed"
INFO = "info"


class StepFailed(StepError):
    """A step of `sevhook start` or the demo failed."""


@dataclass(frozen=True)
class StepResult:
    """One finished step: its name, outcome (ok/failed/info), time taken and what it found."""

    name: str
    status: str
    seconds: float
    detail: str = ""

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "seconds": round(self.seconds, 4)}


Listener = Callable[[StepResult], None]


class Steps:
    """Runs and records steps; `listener` sees each result as soon as the step ends."""

    def __init__(self, listener: Listener | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.results: list[StepResult] = []
        self.current: str | None = None  # the step running (or the last one begun)
        self._listener = listener
        self._clock = clock
        self._started = clock()

    @property
    def elapsed(self) -> float:
        return self._clock() - self._started

    def record(self, result: StepResult) -> None:
        self.results.append(result)
        if self._listener is not None:
            self._listener(result)

    @contextmanager
    def step(self, name: str) -> Iterator[StepNote]:
        """Time the block. A SevhookError inside becomes StepFailed(name, its message); the block may
        set `note.detail` to say what it found."""
        note = StepNote()
        self.current = name
        begin = self._clock()
        try:
            yield note
        except StepFailed:
            raise  # a step inside this one failed and has recorded itself
        except SevhookError as exc:
            reason = exc.message.removeprefix(f"{name}: ")  # e.g. a HookFailure that names this step already
            self.record(StepResult(name, FAILED, self._clock() - begin, reason))
            raise StepFailed(name, reason) from None
        self.record(StepResult(name, OK, self._clock() - begin, note.detail))

    def info(self, name: str, detail: str) -> None:
        """A line that is not a step of its own (e.g. the command line being shown)."""
        self.record(StepResult(name, INFO, 0.0, detail))


@dataclass
class StepNote:
    """What a running step found, for its result line."""

    detail: str = ""
