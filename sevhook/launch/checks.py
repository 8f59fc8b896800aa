"""The attested launch's decisions, free of I/O: how much of the time budget is left, and whether
what QEMU (or libvirt) and the broker said allows the next step. Every refusal is a StepFailed naming
the step, so the administrator reads where the launch stopped."""

from __future__ import annotations

import time
from collections.abc import Callable

from sevhook.encoding import decode_base64
from sevhook.errors import FormatError
from sevhook.launch.steps import StepFailed
from sevhook.monitor.types import LAUNCH_SECRET, SevInfo, VmStatus

PACKET_HEADER_SIZE = 52  # flags(4) || iv(16) || mac(32), sev-inject-launch-secret's packet-header


class Deadline:
    """The attestation's whole time budget (sevhook:attestation timeout), shared by all steps."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self._end = clock() + seconds

    def expired(self) -> bool:
        return self._clock() >= self._end

    def remaining(self, step: str) -> float:
        """Seconds left for `step`; none left is a failure of that step."""
        left = self._end - self._clock()
        if left <= 0:
            raise StepFailed(step, f"timed out: the attestation took longer than its {self.seconds:g} s budget "
                             "(<sevhook:attestation timeout=...>)")
        return left


def check_paused(name: str, status: VmStatus) -> None:
    """A guest that already runs finished its launch without a verdict: it must not keep running."""
    if status.running:
        raise StepFailed("paused-check", f"the guest was started running (QEMU status '{status.status}'), so "
                         "its launch was finished before it could be attested; start it with "
                         f"`virsh start --paused {name}`")


def check_launch_state(info: SevInfo, policy: int) -> None:
    """QEMU must hold an SEV launch waiting for its secret, with the policy the domain asked for."""
    if not info.enabled:
        raise StepFailed("query-sev", "QEMU reports SEV is not enabled for this guest (not a sev-guest, or no "
                         "SEV platform); refusing to attest a guest that is not encrypted")
    if info.sev_type != "sev":
        raise StepFailed("query-sev", f"QEMU runs a {info.sev_type} guest; sevhook attests SEV/SEV-ES only")
    if info.state != LAUNCH_SECRET:
        raise StepFailed("query-sev", f"SEV launch state is '{info.state}', expected '{LAUNCH_SECRET}' (measured "
                         "and waiting for its secret); was the guest started paused?")
    if info.policy != policy:
        raise StepFailed("query-sev", f"QEMU launched with policy {info.policy:#06x} but the domain asks for "
                         f"{policy:#06x}")


def check_secret_packet(header_b64: str, secret_b64: str) -> int:
    """The broker's packet must be well-formed before it goes to QEMU (whose errors are vaguer);
    returns the size of the encrypted secret, for the step's line."""
    if not secret_b64:
        raise StepFailed("inject", "the key broker sent an empty secret")
    try:
        header = decode_base64(header_b64)
        secret = decode_base64(secret_b64)
    except FormatError as exc:
        raise StepFailed("inject", "the key broker's secret packet is not valid base64") from exc
    if len(header) != PACKET_HEADER_SIZE:
        raise StepFailed("inject", f"the key broker's packet header is {len(header)} bytes, expected "
                         f"{PACKET_HEADER_SIZE}")
    return len(secret)


def check_after_inject(info: SevInfo) -> None:
    """After a successful injection the launch must still wait in launch-secret for LAUNCH_FINISH."""
    if info.state != LAUNCH_SECRET:
        raise StepFailed("verify", f"SEV launch state is '{info.state}' after the secret was injected, "
                         f"expected '{LAUNCH_SECRET}'")
