"""The broker's vocabulary and the owner's rules, shared by its admin and launch services: the stable
reason codes of refusals, what a guest registration holds, and the checks of a reported platform and
policy against the guest's rules. No database and no HTTP here."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sevhook.encoding import decode_base64
from sevhook.errors import FormatError, SevhookError, UsageError
from sevhook.sev.measurement import uses_versioned_form
from sevhook.sev.policy import SevPolicy
from sevhook.sev.secret import SECRET_AREA_SIZE, SecretTable

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}$")
GUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")

# The stable reason codes of refused host requests (also listed in the OpenAPI spec and docs/broker.md).
REASONS = {
    "measurement-mismatch": "the measurement matches none of the guest's allowed launch digests",
    "policy-not-allowed": "the policy is not one of the guest's allowed policies",
    "policy-mismatch": "the reported policy differs from the one the launch session was made for",
    "debug-not-allowed": "the policy allows debugging but the guest forbids it",
    "launch-used": "this single-use launch has already had its attestation decided",
    "launch-expired": "the launch is older than the broker's launch lifetime; create a new one",
    "firmware-too-old": "the platform's SEV API version is below the guest's minimum",
    "build-too-old": "the platform's firmware build is below the guest's minimum",
    "version-unauthenticated": "the guest has a minimum API version or build, but the platform's SEV API is "
                               "below 0.17, whose launch measurement does not cover the version and build",
    "unknown-guest": "no such guest is registered",
    "unknown-host": "no such host is registered (admin API)",
    "guest-revoked": "the guest has been revoked by its owner",
    "chain-invalid": "the platform certificate chain does not verify",
    "unknown-root": "the chain does not lead to a registered root (ARK)",
    "cek-unsigned": "the chain's CEK is unsigned (as firmware exports it) and no signed CEK is cached or at the KDS",
    "kds-unavailable": "AMD's KDS (the broker's --kds-url) did not answer with the signed CEK; retry later",
    "cek-mismatch": "the signed CEK from the KDS or cache is for another key, or no registered ASK signed it",
    "unknown-launch": "no such launch for this host",
    "token-missing": "no bearer token was sent",
    "token-invalid": "the bearer token is not a registered host's (or the admin) token",
    "host-revoked": "the host's token has been revoked by the owner (sevhook broker revoke-host)",
    "bad-request": "malformed base64, wrong sizes or fields out of range",
    "body-too-large": "the request body exceeds the broker's limit",
    "rate-limited": "too many requests for this host, or too many unauthenticated or failed-auth requests from "
                    "this address; retry after the Retry-After delay",
    "database-unavailable": "the broker's database failed; retry later",
    "not-found": "no such API path",
    "method-not-allowed": "the path does not take this HTTP method",
    "internal": "an unexpected broker error (a bug); see the broker's log",
    "storage-integrity": "a sealed value in the database does not open (wrong storage key or tampered row)",
}


class Refusal(SevhookError):
    """A decision against the caller, with a stable reason code and an HTTP status."""

    def __init__(self, reason: str, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class GuestSpec:
    """What the owner registers for a guest; secrets are (GUID, value) pairs released as one table."""

    guest_id: str
    digests: tuple[bytes, ...]
    policies: tuple[int, ...]
    min_api: tuple[int, int] = (0, 0)
    min_build: int = 0
    secrets: tuple[tuple[uuid.UUID, bytes], ...] = field(default=(), repr=False)
    reusable: bool = False
    digest_labels: tuple[str, ...] = ()

    def check(self) -> None:
        """Refuse a registration the launch service could never honour, naming the field."""
        if not GUEST_ID_PATTERN.match(self.guest_id):
            raise UsageError(f"guest id {self.guest_id!r}: use 1-128 letters, digits and . _ : @ - "
                             "(starting with a letter or digit)")
        if not self.digests:
            raise UsageError(f"guest {self.guest_id}: give at least one launch digest (--digest or firmware inputs)")
        for digest in self.digests:
            if len(digest) != 32:
                raise UsageError(f"guest {self.guest_id}: a launch digest is {len(digest)} bytes, "
                                 "expected 32 (SHA-256)")
        if not self.policies:
            raise UsageError(f"guest {self.guest_id}: give at least one allowed policy (--policy)")
        for policy in self.policies:
            SevPolicy(policy)
        if not (0 <= self.min_api[0] <= 255 and 0 <= self.min_api[1] <= 255 and 0 <= self.min_build <= 255):
            raise UsageError(f"guest {self.guest_id}: minimum API parts and build must each be 0..255")
        guids = [guid for guid, _ in self.secrets]
        if len(set(guids)) != len(guids):
            raise UsageError(f"guest {self.guest_id}: a secret GUID is given twice")
        size = len(SecretTable(tuple(self.secrets)).build())
        if size > SECRET_AREA_SIZE:
            raise UsageError(f"guest {self.guest_id}: the secret table is {size} bytes; OVMF's secret area holds "
                             f"{SECRET_AREA_SIZE} (use smaller or fewer secrets)")


def decode_field(text: str, what: str) -> bytes:
    """A base64 request field, or a 400 naming it."""
    try:
        return decode_base64(text)
    except FormatError as exc:
        raise Refusal("bad-request", f"{what}: not valid base64 ({exc.message})", status=400) from exc


def _debug_allowed(policy: int) -> bool:
    return SevPolicy(policy).debug_allowed


def policy_refusal(policy: int, allowed: Iterable[int]) -> Refusal | None:
    """Why `policy` is not allowed (debugging named apart), or None when it is."""
    allowed = list(allowed)
    if policy in allowed:
        return None
    if _debug_allowed(policy) and not any(_debug_allowed(p) for p in allowed):
        return Refusal("debug-not-allowed", f"policy {policy:#x} allows debugging (NODBG clear); "
                       f"guest allows only {', '.join(f'{p:#x}' for p in allowed)}")
    return Refusal("policy-not-allowed", f"policy {policy:#x} is not allowed for this guest "
                   f"(allowed: {', '.join(f'{p:#x}' for p in allowed)})")


def check_launch_rules(row: Any, api_major: int, api_minor: int, build_id: int, policy: int) -> Refusal | None:
    """The owner's rules on the reported platform and policy. They are only as good as the measurement
    that authenticates the reported fields: below SEV API 0.17 it covers neither the API version nor the
    build, so a rule on those fields cannot be checked and the launch is refused."""
    if row.policies is None:
        return Refusal("unknown-guest", f"guest {row.guest_id!r} is no longer registered")
    if row.guest_revoked:
        return Refusal("guest-revoked", f"guest {row.guest_id!r} has been revoked by its owner")
    refusal = policy_refusal(policy, json.loads(row.policies))
    if refusal:
        return refusal
    if policy != row.policy:
        return Refusal("policy-mismatch", f"reported policy {policy:#x} differs from the launch session's "
                       f"policy {row.policy:#x}")
    has_version_rule = (row.min_api_major, row.min_api_minor) > (0, 0) or row.min_build > 0
    if has_version_rule and not uses_versioned_form(api_major, api_minor):
        return Refusal("version-unauthenticated", f"platform SEV API {api_major}.{api_minor} is below 0.17: its launch "
                       "measurement does not cover the API version and build, so the guest's minimum "
                       f"API {row.min_api_major}.{row.min_api_minor} / build {row.min_build} cannot be checked; "
                       "update the platform firmware, or register the guest without --min-api/--min-build")
    if (api_major, api_minor) < (row.min_api_major, row.min_api_minor):
        return Refusal("firmware-too-old", f"platform SEV API {api_major}.{api_minor} is below the guest's "
                       f"minimum {row.min_api_major}.{row.min_api_minor}")
    if build_id < row.min_build:
        return Refusal("build-too-old", f"platform firmware build {build_id} is below the guest's minimum "
                       f"{row.min_build}")
    return None
