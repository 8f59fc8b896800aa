"""Named, timed steps, recorded once for every shell: each outcome goes to a listener as soon as the
step ends (the hook's log file, the terminal of `sevhook start` or the demo), and every failure is one
StepFailed naming its step. Details and reasons never carry secrets: callers pass step names, sizes,
hashes and the error texts of QEMU, libvirt and the broker."""

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
    """A step of an attested launch failed; `step` names it, `reason` says why."""


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


@dataclass
class StepNote:
    """What a running step found, for its result line."""

    detail: str = ""


class Steps:
    """Runs and records steps; `listener` sees each result as soon as the step ends."""

    def __init__(self, listener: Listener | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.results: list[StepResult] = []
        self.current: str | None = None  # the step running (or the last one begun)
        self._listener = listener
        self._clock = clock
        self._started = clock()
        self._recorded_failure: BaseException | None = None

    @property
    def elapsed(self) -> float:
        return self._clock() - self._started

    def record(self, result: StepResult) -> None:
        self.results.append(result)
        if self._listener is not None:
            self._listener(result)

    @contextmanager
    def step(self, name: str) -> Iterator[StepNote]:
        """Time the block and record its outcome. A StepError of this step passes unchanged; any other
        SevhookError becomes StepFailed(name, its message); any other exception is recorded as failed
        and passes unchanged. A failure an inner step recorded is not recorded again. The block may set
        `note.detail` to say what it found."""
        note = StepNote()
        self.current = name
        begin = self._clock()
        try:
            yield note
        except BaseException as exc:
            if exc is self._recorded_failure:
                raise  # a step inside this one failed and has recorded itself
            if isinstance(exc, StepError) and exc.step == name:
                self._failed(name, begin, exc.reason, exc)
                raise
            if isinstance(exc, SevhookError):
                failure = StepFailed(name, exc.message)
                self._failed(name, begin, exc.message, failure)
                raise failure from exc
            self._failed(name, begin, f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__, exc)
            raise
        self.record(StepResult(name, OK, self._clock() - begin, note.detail))

    def _failed(self, name: str, begin: float, reason: str, raised: BaseException) -> None:
        self._recorded_failure = raised
        self.record(StepResult(name, FAILED, self._clock() - begin, reason))

    def info(self, name: str, detail: str) -> None:
        """A line that is not a step of its own (e.g. the command line being shown)."""
        self.record(StepResult(name, INFO, 0.0, detail))
