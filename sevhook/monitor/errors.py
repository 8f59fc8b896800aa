"""What can go wrong when talking to QEMU's monitor, as SevhookErrors a caller can tell apart."""

from __future__ import annotations

from sevhook.errors import SevhookError


class MonitorError(SevhookError):
    """QEMU (or libvirt on its behalf) answered a launch command with an error.

    `qmp_class` is QMP's error class (e.g. GenericError) and `desc` QEMU's own text, kept apart so
    that callers can match on them without parsing the message."""

    def __init__(self, message: str, *, command: str | None = None, qmp_class: str | None = None,
                 desc: str | None = None) -> None:
        super().__init__(message)
        self.command = command
        self.qmp_class = qmp_class
        self.desc = desc


class MonitorUnavailable(MonitorError):
    """The monitor cannot be reached, or went away in the middle of a command."""


class MonitorTimeout(MonitorError):
    """The monitor did not answer (or an awaited event did not come) within the time allowed."""


class MonitorProtocolError(MonitorError):
    """QEMU answered with something that is not the documented shape (wrong type, missing field)."""
