"""Launch operations over a QMP socket, on the qemu.qmp library (asyncio).

Every command has a deadline; QMP errors become MonitorError with QEMU's class and text; `cont`
and `stop` return only once QEMU has emitted RESUME / STOP, so "done" means the vCPUs really run
(or stopped). QmpMonitor is the same API for synchronous callers such as the hook."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Awaitable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

from qemu.qmp import ConnectError, EventListener, ExecInterruptedError, ExecuteError, QMPClient, QMPError, StateError

from sevhook.monitor.errors import MonitorError, MonitorTimeout, MonitorUnavailable
from sevhook.monitor.types import SevCapabilities, SevInfo, VmStatus, parse_measurement, parse_report

if TYPE_CHECKING:
    from sevhook.sev.measurement import LaunchMeasurement

DEFAULT_TIMEOUT = 10.0
MNONCE_SIZE = 16
_T = TypeVar("_T")


class AsyncQmpMonitor:
    """One QMP session on a UNIX socket (QEMU's `-qmp unix:PATH,server=on,wait=off`)."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self._qmp = QMPClient("sevhook")

    @classmethod
    async def open(cls, path: str | os.PathLike[str], timeout: float = DEFAULT_TIMEOUT) -> AsyncQmpMonitor:
        """Connect and negotiate capabilities within `timeout` seconds."""
        monitor = cls(path, timeout)
        await monitor.connect()
        return monitor

    async def connect(self) -> None:
        try:
            await asyncio.wait_for(self._qmp.connect(self.path), self.timeout)
        except TimeoutError as exc:
            await self.close()
            raise MonitorTimeout(f"QEMU monitor {self.path} accepted no QMP session within {self.timeout:g} s; "
                                 "is another client holding it, or is QEMU hung?") from exc
        except ConnectError as exc:
            raise MonitorUnavailable(f"cannot connect to the QEMU monitor {self.path}: {_cause(exc)}") from exc

    @property
    def qemu_version(self) -> tuple[int, int, int] | None:
        """QEMU's (major, minor, micro) from the greeting."""
        greeting = self._qmp.greeting
        if greeting is None:
            return None
        version = greeting.QMP.version["qemu"]
        return (int(version["major"]), int(version["minor"]), int(version["micro"]))

    async def close(self) -> None:
        """Hang up; a session QEMU already ended (EOF) is not an error when closing."""
        try:
            await self._qmp.disconnect()
        except (QMPError, EOFError, OSError):
            pass

    async def __aenter__(self) -> AsyncQmpMonitor:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> object:
        """Run one QMP command within the deadline, mapping every failure to a MonitorError."""
        return await self._bounded(self._qmp.execute(command, arguments), command)

    async def _bounded(self, operation: Awaitable[_T], command: str) -> _T:
        try:
            return await asyncio.wait_for(operation, self.timeout)
        except TimeoutError as exc:
            raise MonitorTimeout(f"QEMU did not answer {command} within {self.timeout:g} s on {self.path}",
                                 command=command) from exc
        except ExecuteError as exc:
            desc = str(exc)
            raise MonitorError(f"QEMU refused {command}: {desc} ({exc.error_class})", command=command,
                               qmp_class=exc.error_class, desc=desc) from exc
        except (ExecInterruptedError, StateError, EOFError, OSError) as exc:
            raise MonitorUnavailable(f"the QEMU monitor {self.path} went away during {command} "
                                     f"({exc.__class__.__name__}); QEMU has probably exited",
                                     command=command) from exc

    async def status(self) -> VmStatus:
        return VmStatus.from_qmp(await self.execute("query-status"))

    async def query_sev(self) -> SevInfo:
        return SevInfo.from_qmp(await self.execute("query-sev"))

    async def launch_measurement(self) -> LaunchMeasurement:
        return parse_measurement(await self.execute("query-sev-launch-measure"))

    async def capabilities(self) -> SevCapabilities:
        return SevCapabilities.from_qmp(await self.execute("query-sev-capabilities"))

    async def inject_secret(self, header_b64: str, secret_b64: str, gpa: int | None = None) -> None:
        """sev-inject-launch-secret; without `gpa` QEMU uses the secret area OVMF declares."""
        arguments: dict[str, object] = {"packet-header": header_b64, "secret": secret_b64}
        if gpa is not None:
            arguments["gpa"] = gpa
        await self.execute("sev-inject-launch-secret", arguments)

    async def attestation_report(self, mnonce: bytes) -> bytes:
        if len(mnonce) != MNONCE_SIZE:
            raise MonitorError(f"attestation report: mnonce must be {MNONCE_SIZE} bytes, got {len(mnonce)}")
        answer = await self.execute("query-sev-attestation-report",
                                    {"mnonce": base64.b64encode(mnonce).decode("ascii")})
        return parse_report(answer)

    async def cont(self) -> None:
        """Resume the vCPUs (SEV: LAUNCH_FINISH) and wait for QEMU's RESUME event."""
        await self._change_run_state("cont", "RESUME", want_running=True)

    async def stop(self) -> None:
        """Pause the vCPUs and wait for QEMU's STOP event."""
        await self._change_run_state("stop", "STOP", want_running=False)

    async def _change_run_state(self, command: str, event: str, *, want_running: bool) -> None:
        if (await self.status()).running == want_running:
            return  # QEMU sends no event when nothing changes
        listener = EventListener(event)
        with self._qmp.listen(listener):
            await self.execute(command)
            await self._bounded(listener.get(), f"{command} (waiting for the {event} event)")


class QmpMonitor:
    """Synchronous face of AsyncQmpMonitor, with its own event loop; use as a context manager."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = DEFAULT_TIMEOUT) -> None:
        self._loop = asyncio.new_event_loop()
        self._monitor = AsyncQmpMonitor(path, timeout)
        try:
            self._run(self._monitor.connect())
        except BaseException:
            self._loop.close()
            raise

    @property
    def path(self) -> str:
        return self._monitor.path

    @property
    def timeout(self) -> float:
        """Seconds each following command may take (the hook lowers it as its budget runs out)."""
        return self._monitor.timeout

    @timeout.setter
    def timeout(self, seconds: float) -> None:
        self._monitor.timeout = seconds

    @property
    def qemu_version(self) -> tuple[int, int, int] | None:
        return self._monitor.qemu_version

    def _run(self, operation: Awaitable[_T]) -> _T:
        return self._loop.run_until_complete(operation)

    def close(self) -> None:
        if not self._loop.is_closed():
            try:
                self._run(self._monitor.close())
            finally:
                self._loop.close()

    def __enter__(self) -> QmpMonitor:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> object:
        return self._run(self._monitor.execute(command, arguments))

    def status(self) -> VmStatus:
        return self._run(self._monitor.status())

    def query_sev(self) -> SevInfo:
        return self._run(self._monitor.query_sev())

    def launch_measurement(self) -> LaunchMeasurement:
        return self._run(self._monitor.launch_measurement())

    def capabilities(self) -> SevCapabilities:
        return self._run(self._monitor.capabilities())

    def inject_secret(self, header_b64: str, secret_b64: str, gpa: int | None = None) -> None:
        self._run(self._monitor.inject_secret(header_b64, secret_b64, gpa))

    def attestation_report(self, mnonce: bytes) -> bytes:
        return self._run(self._monitor.attestation_report(mnonce))

    def cont(self) -> None:
        self._run(self._monitor.cont())

    def stop(self) -> None:
        self._run(self._monitor.stop())


def _cause(exc: ConnectError) -> str:
    """The OS-level reason under qemu.qmp's ConnectError (e.g. 'No such file or directory')."""
    root = exc.exc
    if isinstance(root, OSError) and root.strerror:
        return root.strerror
    return str(root) or root.__class__.__name__
