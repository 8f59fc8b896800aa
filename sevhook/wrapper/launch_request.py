"""The broker's launch for one start, asked in a thread from the moment QEMU is spawned: the broker works
while the wrapper imports its relay (asyncio) and QEMU starts. Kept free of asyncio so that the request
goes out before the relay is even imported; the relay awaits `LaunchRequest.future` and writes the
launch into QEMU's FIFOs (sevhook.wrapper.interposer)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from sevhook.hook.plan import ManagedGuest


@dataclass(frozen=True)
class FreshLaunch:
    """The launch the broker made for this start: the guest with its launch id, and the GODH and session
    QEMU's sev-guest object reads (base64, as in libvirt's <dhCert>/<session>)."""

    guest: ManagedGuest
    godh_b64: str
    session_b64: str


class LaunchRequest:
    """`call` (a blocking HTTP request to the broker) run once in a daemon thread; its launch, or what it
    raised, ends up in `future`, which an event loop awaits with asyncio.wrap_future."""

    def __init__(self, call: Callable[[], FreshLaunch]) -> None:
        self._call = call
        self.future: Future[FreshLaunch] = Future()
        self._thread = threading.Thread(target=self._run, name="sevhook-qemu-launch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.future.set_running_or_notify_cancel()
        try:
            launch = self._call()
        except BaseException as exc:  # noqa: BLE001  handed to whoever awaits the future
            self.future.set_exception(exc)
        else:
            self.future.set_result(launch)
