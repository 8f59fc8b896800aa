"""libvirt's view of a domain for sevhook, the one libvirt adapter: the names of libvirt's domain
states, the host's SEV platform (virNodeGetSEVInfo), and LibvirtMonitor, the LaunchMonitor interface
over a libvirt domain handle. `sevhook start` (sevhook.flow.libvirt_domain) drives its launches
through LibvirtMonitor's public-API calls (state, launchSecurityInfo, setLaunchSecurityState,
resume); only query-sev and the attestation report, which libvirt does not wrap, go through QEMU
monitor passthrough (libvirt_qemu.qemuMonitorCommand), which marks the domain tainted, so `sevhook
start` never calls those two. Never call libvirt from inside a libvirt hook: a hook must not call
back into libvirtd."""

from __future__ import annotations

import base64
import json
from typing import Any

from sevhook.errors import FormatError
from sevhook.monitor.errors import MonitorError, MonitorProtocolError
from sevhook.monitor.types import LaunchInfo, SevCapabilities, SevInfo, VmStatus, parse_report
from sevhook.sev.measurement import LaunchMeasurement
from sevhook.virt import libvirt_module

MNONCE_SIZE = 16
# virDomainState values -> names (libvirt's enum is stable ABI).
_STATES = {0: "nostate", 1: "running", 2: "blocked", 3: "paused", 4: "shutdown", 5: "shutoff", 6: "crashed",
           7: "pmsuspended"}


def state_name(state: int) -> str:
    """The name of a virDomainState value ("paused", "running", "shutoff", ...)."""
    return _STATES.get(state, f"state-{state}")


def host_capabilities(connection: Any) -> SevCapabilities:
    """The host's SEV platform (PDH, certificate chain) from virNodeGetSEVInfo."""
    libvirt = libvirt_module()
    try:
        info = connection.getSEVInfo()
    except libvirt.libvirtError as exc:
        desc = exc.get_error_message() or str(exc)
        raise MonitorError(f"libvirt cannot report the host's SEV platform (getSEVInfo): {desc}; does this host "
                           "have SEV (virsh domcapabilities shows <sev supported='yes'>)?",
                           command="getSEVInfo", desc=desc) from exc
    return SevCapabilities.from_qmp({
        "pdh": info.get("pdh"),
        "cert-chain": info.get("cert-chain"),
        "cpu0-id": info.get("cpu0-id"),
        "cbitpos": info.get("cbitpos"),
        "reduced-phys-bits": info.get("reduced-phys-bits"),
    })


class LibvirtMonitor:
    """LaunchMonitor over a libvirt domain handle (`virDomain`)."""

    def __init__(self, domain: Any) -> None:
        self._libvirt = libvirt_module()
        self.domain = domain
        self.timeout = 0.0  # libvirt bounds its own calls (job timeouts); kept for the LaunchMonitor interface

    def _call(self, what: str, function: Any, *args: Any) -> Any:
        try:
            return function(*args)
        except self._libvirt.libvirtError as exc:
            desc = exc.get_error_message() or str(exc)
            raise MonitorError(f"libvirt refused {what} for domain {self.domain.name()}: {desc}",
                               command=what, desc=desc) from exc

    def execute(self, command: str, arguments: dict[str, object] | None = None) -> object:
        """A raw QMP command via libvirt-qemu; QMP errors keep their class and description."""
        import libvirt_qemu  # noqa: PLC0415  (ships with the libvirt binding)

        request: dict[str, object] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        raw = self._call(command, libvirt_qemu.qemuMonitorCommand, self.domain, json.dumps(request), 0)
        try:
            reply = json.loads(raw)
        except ValueError as exc:
            raise MonitorProtocolError(f"{command}: libvirt passed back non-JSON from QEMU", command=command) from exc
        if not isinstance(reply, dict):
            raise MonitorProtocolError(f"{command}: QEMU's reply is not an object", command=command)
        error = reply.get("error")
        if isinstance(error, dict):
            qmp_class, desc = str(error.get("class")), str(error.get("desc"))
            raise MonitorError(f"QEMU refused {command}: {desc} ({qmp_class})", command=command,
                               qmp_class=qmp_class, desc=desc)
        return reply.get("return")

    def status(self) -> VmStatus:
        state, _reason = self._call("state", self.domain.state)
        name = state_name(state)
        return VmStatus(status=name, running=name == "running")

    def query_sev(self) -> SevInfo:
        return SevInfo.from_qmp(self.execute("query-sev"))

    def launch_info(self) -> LaunchInfo:
        """The measurement and the firmware version and policy libvirt reports for the launch."""
        info = self._call("launchSecurityInfo", self.domain.launchSecurityInfo)
        measurement = info.get("sev-measurement")
        keys = ("sev-api-major", "sev-api-minor", "sev-build-id", "sev-policy")
        numbers = [value for value in (info.get(key) for key in keys) if isinstance(value, int)]
        if not isinstance(measurement, str) or len(numbers) != len(keys):
            raise MonitorProtocolError(f"libvirt's launch security info lacks the SEV measurement or firmware "
                                       f"version (got {sorted(info)}); is this an SEV guest?",
                                       command="launchSecurityInfo")
        api_major, api_minor, build_id, policy = numbers
        return LaunchInfo(measurement, api_major, api_minor, build_id, policy)

    def launch_measurement(self) -> LaunchMeasurement:
        try:
            return LaunchMeasurement.parse(self.launch_info().measurement_b64, what="libvirt sev-measurement")
        except FormatError as exc:
            raise MonitorProtocolError(exc.message, command="launchSecurityInfo") from exc

    def capabilities(self) -> SevCapabilities:
        return host_capabilities(self.domain.connect())

    def inject_secret(self, header_b64: str, secret_b64: str, gpa: int | None = None) -> None:
        params: dict[str, object] = {"sev-secret-header": header_b64, "sev-secret": secret_b64}
        if gpa is not None:
            params["sev-secret-set-address"] = gpa
        self._call("setLaunchSecurityState", self.domain.setLaunchSecurityState, params, 0)

    def attestation_report(self, mnonce: bytes) -> bytes:
        if len(mnonce) != MNONCE_SIZE:
            raise MonitorError(f"attestation report: mnonce must be {MNONCE_SIZE} bytes, got {len(mnonce)}")
        return parse_report(self.execute("query-sev-attestation-report",
                                         {"mnonce": base64.b64encode(mnonce).decode("ascii")}))

    def cont(self) -> None:
        """virDomainResume (libvirt waits for QEMU's RESUME itself)."""
        if not self.status().running:
            self._call("resume", self.domain.resume)

    def stop(self) -> None:
        if self.status().running:
            self._call("suspend", self.domain.suspend)

    def close(self) -> None:
        """Nothing to release: the libvirt connection belongs to the caller."""
