"""The hook's listener for sevhook.launch.steps: one log line per step, with the domain and the time
the step took, so an administrator can see where a launch spent its time or stopped. Lines never
carry secrets: steps record names and reasons only (reasons are built from QEMU/broker error texts,
never from packets or keys).

Where: $SEVHOOK_HOOK_LOG if set (a file path, or 'syslog'), else /var/log/sevhook/hook.log, and
syslog when that file cannot be opened. libvirtd clears a hook's environment, so `sevhook hook
install --log FILE` writes the variable into the installed script."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TextIO

from sevhook.launch.steps import StepResult, Steps

LOG_ENV = "SEVHOOK_HOOK_LOG"
DEFAULT_LOG = "/var/log/sevhook/hook.log"
SYSLOG = "syslog"


class StepLog:
    """Writes `<time> sevhook[pid] <domain> <op> <step> ok|failed <ms> [reason]` lines for the steps
    of one hook call (`steps`)."""

    def __init__(self, domain: str, operation: str, write: Callable[[str], None]) -> None:
        self.domain = domain
        self.operation = operation
        self._write = write
        self.steps = Steps(self.write_result)

    @classmethod
    def open(cls, domain: str, operation: str, target: str | None = None) -> StepLog:
        target = target or os.environ.get(LOG_ENV) or DEFAULT_LOG
        if target != SYSLOG:
            stream = _open_file(target)
            if stream is not None:
                return cls(domain, operation, lambda line: _append(stream, line))
        return cls(domain, operation, _syslog_writer())

    def write_result(self, result: StepResult) -> None:
        self.line(result.name, result.status, result.seconds, result.detail)

    def line(self, step: str, outcome: str, seconds: float, detail: str = "") -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"
        text = f"{stamp} sevhook[{os.getpid()}] {self.domain} {self.operation} {step} {outcome} {seconds * 1000:.1f}ms"
        if detail:
            text += " " + " ".join(detail.split())  # one line, whatever the reason contained
        try:
            self._write(text)
        except OSError:
            pass  # logging must never change the hook's verdict

    def total(self, outcome: str) -> None:
        self.line("total", outcome, self.steps.elapsed)


def _open_file(path: str) -> TextIO | None:
    try:
        os.makedirs(os.path.dirname(path) or ".", mode=0o750, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        return os.fdopen(fd, "a", encoding="utf-8")
    except OSError:
        return None


def _append(stream: TextIO, line: str) -> None:
    stream.write(line + "\n")  # one write of a whole line per step: lines of parallel hooks never mix
    stream.flush()


def _syslog_writer() -> Callable[[str], None]:
    import syslog  # the hook's hot path: only when the log file cannot be opened

    syslog.openlog("sevhook-hook", 0, syslog.LOG_DAEMON)
    return lambda line: syslog.syslog(syslog.LOG_INFO, line)
