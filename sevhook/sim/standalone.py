"""Standalone mode: a QEMU stand-in with no real QEMU behind it. It runs the SEV launch against the
software processor and answers, on every QMP monitor, what a launch needs (run state, stop/cont/quit,
the SEV commands and a few common queries) with QEMU's shapes, events and error classes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import uuid as uuid_module

from sevhook.sim.argv import QemuInvocation
from sevhook.sim.platform import SoftwarePlatform
from sevhook.sim.qemu_sev import LaunchFailed, SevLaunch, SevMonitor
from sevhook.sim.qmp_protocol import SCHEMAS, Request, event
from sevhook.sim.qmp_server import Connection, EventHub, LocalSession, MonitorListener

PROG = "qemu-system-x86_64"
PACKAGE = "sevhook-sim"
SIGNAL_EXIT = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class StandaloneQemu:
    """The QMP command handler and run state of one stand-in process."""

    def __init__(self, inv: QemuInvocation, platform: SoftwarePlatform, launch: SevLaunch | None,
                 version: tuple[int, int, int]) -> None:
        self.inv = inv
        self.launch = launch
        self.version = version
        self.sev = SevMonitor(platform, launch, version)
        self.hub = EventHub()
        self.run_state = "prelaunch" if inv.start_paused else "running"
        self.exit_code = 0
        self._exit: asyncio.Event | None = None
        self._listeners: list[MonitorListener] = []

    # protocol --------------------------------------------------------------------------------------
    def greeting(self) -> dict:
        return {"QMP": {"version": self._version(), "capabilities": ["oob"]}}

    def _version(self) -> dict:
        major, minor, micro = self.version
        return {"qemu": {"micro": micro, "minor": minor, "major": major}, "package": PACKAGE}

    def commands(self) -> list[str]:
        return list(SCHEMAS)

    async def execute(self, request: Request) -> object:
        command = request.command
        if command in SevMonitor.COMMANDS:
            return self.sev.execute(command, request.arguments)
        handler = getattr(self, "_cmd_" + command.replace("-", "_"))
        return handler()

    def _cmd_query_version(self) -> dict:
        return self._version()

    def _cmd_query_status(self) -> dict:
        return {"status": self.run_state, "singlestep": False, "running": self.run_state == "running"}

    def _cmd_query_name(self) -> dict:
        return {"name": self.inv.name} if self.inv.name else {}

    def _cmd_query_uuid(self) -> dict:
        return {"UUID": self.inv.uuid or str(uuid_module.UUID(int=0))}

    def _cmd_query_kvm(self) -> dict:
        return {"enabled": True, "present": True}

    def _cmd_query_target(self) -> dict:
        return {"arch": "x86_64"}

    def _cmd_query_commands(self) -> list[dict]:
        return [{"name": name} for name in self.commands()]

    def _cmd_query_cpus_fast(self) -> list[dict]:
        return [
            {"thread-id": os.getpid(), "props": {"core-id": 0, "thread-id": 0, "socket-id": index},
             "qom-path": f"/machine/unattached/device[{index}]", "cpu-index": index, "target": "x86_64"}
            for index in range(self.inv.vcpus)
        ]

    def _cmd_stop(self) -> dict:
        if self.run_state == "running":
            self.run_state = "paused"
            self.hub.broadcast(event("STOP"))
        return {}

    def _cmd_cont(self) -> dict:
        if self.run_state in ("prelaunch", "paused"):
            self.hub.broadcast(event("RESUME"))
            self.run_state = "running"
            if self.launch is not None and not self.launch.finished:
                try:
                    self.launch.finish()
                except LaunchFailed as exc:  # QEMU exits when LAUNCH_FINISH fails
                    for line in exc.lines:
                        print(f"{PROG}: {line}", file=sys.stderr)
                    self.request_exit(1)
        return {}

    def _cmd_quit(self) -> dict:
        self.hub.broadcast(event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"}))
        self.request_exit(0)
        return {}

    def _cmd_system_reset(self) -> dict:
        self.hub.broadcast(event("RESET", {"guest": False, "reason": "host-qmp-system-reset"}))
        return {}

    def _cmd_system_powerdown(self) -> dict:
        self.hub.broadcast(event("POWERDOWN"))
        return {}

    # process -----------------------------------------------------------------------------------------
    def request_exit(self, code: int) -> None:
        self.exit_code = code
        if self._exit is not None:
            asyncio.get_running_loop().call_soon(self._exit.set)

    def _on_signal(self, signum: int) -> None:
        print(f"{PROG}: terminating on signal {signum}", file=sys.stderr)
        self.hub.broadcast(event("SHUTDOWN", {"guest": False, "reason": "host-signal"}))
        self.request_exit(0)

    async def _session(self, connection: Connection) -> None:
        await LocalSession(connection, self, self.hub).run()

    async def serve(self, sockets: list[socket.socket]) -> int:
        """Serve every monitor until quit or a signal; then close them all."""
        self._exit = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in SIGNAL_EXIT:
            loop.add_signal_handler(signum, self._on_signal, signum)
        self._listeners = [MonitorListener(spec, sock, self._session)
                           for spec, sock in zip(self.inv.monitors, sockets, strict=True)]
        for listener in self._listeners:
            await listener.start()
        try:
            await self._exit.wait()
        finally:
            for listener in self._listeners:
                await listener.close()
            for signum in SIGNAL_EXIT:
                loop.remove_signal_handler(signum)
        return self.exit_code
