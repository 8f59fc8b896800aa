"""The LaunchPort over a QEMU QMP monitor the caller owns: the libvirt hook's private monitor, and
the monitor the emulator wrapper interposes. Failing closed stops the vCPUs; whoever owns QEMU ends
it afterwards (libvirt destroys a guest whose hook failed; the wrapper quits QEMU)."""

from __future__ import annotations

from sevhook.launch.sequence import MeasuredLaunch
from sevhook.launch.steps import StepFailed
from sevhook.monitor.types import LaunchMonitor, SevInfo, VmStatus


class MonitorPort:
    """LaunchPort on a LaunchMonitor (sevhook.monitor.qmp.QmpMonitor)."""

    reads_launch_state = True
    fail_closed_step = "halt"

    def __init__(self, monitor: LaunchMonitor) -> None:
        self.monitor = monitor

    @property
    def timeout(self) -> float:
        return self.monitor.timeout

    @timeout.setter
    def timeout(self, seconds: float) -> None:
        self.monitor.timeout = seconds

    def status(self) -> VmStatus:
        return self.monitor.status()

    def launch_state(self) -> SevInfo:
        return self.monitor.query_sev()

    def measured_launch(self, info: SevInfo | None) -> MeasuredLaunch:
        if info is None or info.policy is None:
            raise StepFailed("measure", "the firmware version and policy were not read (query-sev) before the "
                             "measurement")
        return MeasuredLaunch(self.monitor.launch_measurement(), info.api_major, info.api_minor, info.build_id,
                              info.policy)

    def inject_secret(self, header_b64: str, secret_b64: str) -> None:
        self.monitor.inject_secret(header_b64, secret_b64)

    def resume(self) -> None:
        self.monitor.cont()

    def fail_closed(self) -> str:
        if not self.monitor.status().running:
            return ""
        self.monitor.stop()
        return "the vCPUs were stopped"
