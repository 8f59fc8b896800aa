"""The package's one error hierarchy: every expected failure is a SevhookError with a message fit
for a user (what went wrong, where, and what to do), so the CLI never shows a traceback."""

from __future__ import annotations


class SevhookError(Exception):
    """Base of every error sevhook raises on bad input or a failed check."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(SevhookError):
    """Bad command-line usage or an unreadable input file (exit status 2)."""

    exit_code = 2


class FormatError(SevhookError):
    """A wire structure (certificate, session blob, header, table) is malformed."""


class StepError(SevhookError):
    """A named step of a launch flow failed; the message is '<step>: <reason>', so a user reads
    where the launch stopped and why in one line."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason


class VerificationError(SevhookError):
    """A signature, MAC, chain or measurement check failed."""


def cause_chain(error: BaseException) -> list[str]:
    """`Type: message (file:line)` for each exception that led to `error`, innermost last: its explicit
    cause, else the exception it was raised while handling. For `sevhook --debug`, so it prints
    messages only, never an exception's arguments when they are not text (they may be key bytes)."""
    lines: list[str] = []
    seen = {id(error)}
    current = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        lines.append(f"{type_name(current)}: {_message_of(current)} ({raised_at(current)})")
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return lines


def type_name(error: BaseException) -> str:
    module = type(error).__module__
    name = type(error).__qualname__
    return name if module == "builtins" else f"{module}.{name}"


def _message_of(error: BaseException) -> str:
    if isinstance(error, SevhookError):
        return error.message
    if isinstance(error, OSError):
        filename = error.filename if isinstance(error.filename, str) else None
        text = error.strerror if isinstance(error.strerror, str) else "operating system error"
        return f"{text}: {filename}" if filename else text
    if all(isinstance(arg, str | int | float) for arg in error.args):
        return str(error) or "(no message)"
    return "(message not shown: its arguments are not text)"


def raised_at(error: BaseException) -> str:
    """`file:line` where the exception was raised (its traceback's innermost frame), sevhook's own
    files relative to the package."""
    trace = error.__traceback__
    if trace is None:
        return "where unknown"
    while trace.tb_next is not None:
        trace = trace.tb_next
    filename = trace.tb_frame.f_code.co_filename
    _, marker, inside = filename.rpartition("/sevhook/")
    return f"{'sevhook/' + inside if marker else filename}:{trace.tb_lineno}"
