"""The one way a launch reaches the guest owner's key broker: a client for the domain's
<sevhook:broker> reference, bounded by what is left of the launch's time."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from sevhook.broker.client import LaunchGrant, SecretGrant
    from sevhook.xml.models import BrokerRef

MAX_BROKER_TIMEOUT = 60.0
SESSION_RETRIES = 2  # creating a session spends nothing: retrying is safe
ATTEST_RETRIES = 0  # a measurement is sent once only


class BrokerPort(Protocol):
    """The key broker as the host sees it (sevhook.broker.client.BrokerClient)."""

    def create_launch(self, guest: str, pdh_b64: str, cert_chain_b64: str,
                      cpu0_id_b64: str | None = None) -> LaunchGrant: ...

    def attest(self, launch_id: str, measurement_b64: str, api_major: int, api_minor: int, build_id: int,
               policy: int) -> SecretGrant: ...

    def close(self) -> None: ...


BrokerFactory = Callable[["BrokerRef", float, int], BrokerPort]  # (ref, timeout, retries)


def open_broker(ref: BrokerRef, timeout: float, retries: int) -> BrokerPort:
    """A BrokerClient for `ref`. Imported when called: the hook's other operations never load the
    HTTP client."""
    from sevhook.broker.client import BrokerClient  # noqa: PLC0415  (the hook's hot path)

    return BrokerClient.from_ref(ref, timeout=min(timeout, MAX_BROKER_TIMEOUT), retries=retries)
