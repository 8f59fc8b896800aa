"""`sevhook start`'s DomainPort on a real libvirt connection: the domain's life cycle (XML, define,
start, destroy) here, its launch operations through sevhook.monitor.libvirt_monitor.LibvirtMonitor's
public-API calls only (no QEMU monitor passthrough, so the domain is not tainted); and the host's
platform certificates from virNodeGetSEVInfo or from an exported chain file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sevhook.flow.start import PlatformSource
from sevhook.hook.prepare import exported_platform as read_export
from sevhook.hook.runtime import RUNTIME_DIR
from sevhook.monitor.libvirt_monitor import LibvirtMonitor, host_capabilities
from sevhook.monitor.types import LaunchInfo
from sevhook.virt import LibvirtError, libvirt_module

_HOOK_FAILED = "Hook script execution failed"


def _message(exc: Any) -> str:
    return " ".join((exc.get_error_message() or str(exc)).split())


class LibvirtDomain:
    """One defined domain on a libvirt connection (the connection belongs to the caller)."""

    def __init__(self, connection: Any, name: str) -> None:
        self._libvirt = libvirt_module()
        self.connection = connection
        self.name = name
        try:
            self.domain = connection.lookupByName(name)
        except self._libvirt.libvirtError as exc:
            if exc.get_error_code() == self._libvirt.VIR_ERR_NO_DOMAIN:
                raise LibvirtError(f"domain {name} is not defined on this connection: define it first "
                                   f"(virsh define {name}.xml) or pass -c URI") from exc
            raise LibvirtError(f"cannot look up domain {name}: {_message(exc)}") from exc
        self.monitor = LibvirtMonitor(self.domain)

    def _call(self, what: str, function: Any, *args: Any) -> Any:
        try:
            return function(*args)
        except self._libvirt.libvirtError as exc:
            raise LibvirtError(f"libvirt refused {what}: {_message(exc)}") from exc

    def state(self) -> str:
        return self.monitor.status().status

    def inactive_xml(self) -> str:
        if not self._call("virDomainIsPersistent", self.domain.isPersistent):
            raise LibvirtError(f"domain {self.name} is transient; sevhook start needs a defined domain so that it "
                               "can store the launch session in it: virsh define it first")
        flags = self._libvirt.VIR_DOMAIN_XML_INACTIVE | self._libvirt.VIR_DOMAIN_XML_SECURE  # keep passwords
        return self._call("virDomainGetXMLDesc", self.domain.XMLDesc, flags)

    def redefine(self, xml: str) -> None:
        self.domain = self._call("virDomainDefineXML", self.connection.defineXML, xml)
        self.monitor = LibvirtMonitor(self.domain)

    def start_paused(self) -> None:
        try:
            self.domain.createWithFlags(self._libvirt.VIR_DOMAIN_START_PAUSED)
        except self._libvirt.libvirtError as exc:
            message = _message(exc)
            hint = ""
            if _HOOK_FAILED in message:
                hint = ("; a libvirt hook refused the start: sevhook's own hook lets sevhook start through only "
                        "when sevhook start runs as root on the libvirt host itself (it marks the launch in "
                        f"{RUNTIME_DIR})")
            raise LibvirtError(f"libvirt refused to start the domain: {message}{hint}") from exc

    def launch_info(self) -> LaunchInfo:
        return self.monitor.launch_info()

    def inject(self, header_b64: str, secret_b64: str) -> None:
        self.monitor.inject_secret(header_b64, secret_b64)

    def resume(self) -> None:
        self.monitor.cont()

    def destroy(self) -> bool:
        if not self._call("virDomainIsActive", self.domain.isActive):
            return False
        self._call("virDomainDestroy", self.domain.destroy)
        return True


def host_platform(connection: Any) -> PlatformSource:
    """The host's PDH and chain from virNodeGetSEVInfo (needs libvirt to see SEV on this host)."""

    def read() -> tuple[str, str, str | None]:
        capabilities = host_capabilities(connection)
        return capabilities.pdh_b64, capabilities.cert_chain_b64, capabilities.cpu0_id_b64

    return read


def exported_platform(path: Path) -> PlatformSource:
    """The PDH and chain from a platform export (`sevctl export`, `sevhook sim platform export`)."""

    def read() -> tuple[str, str, str | None]:
        return read_export(path)

    return read
