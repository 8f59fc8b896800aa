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
