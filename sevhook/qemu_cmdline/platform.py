"""The host's cbitpos and reducedPhysBits, for domain XML that leaves them out.

libvirt fills them at start from QEMU's `query-sev-capabilities`. sevhook takes them from one of:
a saved `virsh domcapabilities` XML, explicit numbers, a live QMP socket, or libvirt's
getSEVInfo. Each source is asked only when the XML actually lacks a value."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lxml import etree
from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError

from sevhook.errors import SevhookError, UsageError
from sevhook.files import read_input_file
from sevhook.xml.models import LaunchSecurity, SevLaunchSecurity, SevSnpLaunchSecurity
from sevhook.xml.parsing import safe_parser

QMP_TIMEOUT = 10.0
MAX_DOMCAPS_BYTES = 1 << 20  # `virsh domcapabilities` prints a few KiB


@dataclass(frozen=True)
class PlatformInfo:
    """What the host's SEV firmware and CPU dictate, and where that came from (for messages)."""

    cbitpos: int
    reduced_phys_bits: int
    source: str


class PlatformSource(Protocol):
    """Anything that can tell the host's values; `describe` names it in messages."""

    def describe(self) -> str: ...

    def load(self) -> PlatformInfo: ...


def _unsigned(text: str | None, what: str) -> int:
    if text is None or not text.strip().isdigit():
        raise SevhookError(f"{what}: expected an unsigned number, got {text!r}")
    return int(text.strip())


@dataclass(frozen=True)
class ExplicitValues:
    cbitpos: int
    reduced_phys_bits: int

    def describe(self) -> str:
        return "--cbitpos/--reduced-phys-bits"

    def load(self) -> PlatformInfo:
        return PlatformInfo(self.cbitpos, self.reduced_phys_bits, self.describe())


@dataclass(frozen=True)
class DomainCapabilitiesFile:
    """A saved `virsh domcapabilities` document: `<features><sev supported='yes'><cbitpos>...`."""

    path: Path

    def describe(self) -> str:
        return str(self.path)

    def load(self) -> PlatformInfo:
        data = read_input_file(self.path, MAX_DOMCAPS_BYTES, "cannot read domain capabilities")
        return parse_domain_capabilities(data, str(self.path))


def parse_domain_capabilities(data: bytes, where: str) -> PlatformInfo:
    try:
        root = etree.fromstring(data, safe_parser())
    except etree.XMLSyntaxError as exc:
        raise SevhookError(f"{where}:{exc.lineno}: not XML ({exc.msg}); "
                           "save it with `virsh domcapabilities > FILE`") from exc
    if root.tag != "domainCapabilities":
        raise SevhookError(f"{where}: root element is <{root.tag}>, not <domainCapabilities> (`virsh domcapabilities`)")
    sev = root.find("features/sev")
    if sev is None or sev.get("supported") != "yes":
        found = "has no <features><sev>" if sev is None else f"says <sev supported='{sev.get('supported')}'>"
        raise SevhookError(
            f"{where}: the host has no usable SEV (the document {found}); cbitpos and reducedPhysBits cannot "
            "come from it: give them in the domain XML or with --cbitpos N --reduced-phys-bits N"
        )
    line = sev.sourceline
    return PlatformInfo(
        _unsigned(sev.findtext("cbitpos"), f"{where}:{line}: <sev><cbitpos>"),
        _unsigned(sev.findtext("reducedPhysBits"), f"{where}:{line}: <sev><reducedPhysBits>"),
        where,
    )


@dataclass(frozen=True)
class QmpSocket:
    """A QEMU monitor socket: QMP `query-sev-capabilities`, as libvirt asks at start."""

    path: str
    timeout: float = QMP_TIMEOUT

    def describe(self) -> str:
        return f"QMP {self.path}"

    def load(self) -> PlatformInfo:
        logging.getLogger("qemu.qmp").addHandler(logging.NullHandler())  # failures are raised, not logged
        reply = asyncio.run(self._query())
        try:
            return PlatformInfo(int(reply["cbitpos"]), int(reply["reduced-phys-bits"]), self.describe())
        except (KeyError, TypeError, ValueError) as exc:
            raise SevhookError(f"{self.describe()}: query-sev-capabilities reply lacks "
                               "cbitpos/reduced-phys-bits") from exc

    async def _query(self) -> dict[str, Any]:
        client = QMPClient("sevhook-cmdline")
        try:
            await asyncio.wait_for(client.connect(self.path), self.timeout)
            reply = await asyncio.wait_for(client.execute("query-sev-capabilities"), self.timeout)
        except ExecuteError as exc:
            raise SevhookError(f"{self.describe()}: query-sev-capabilities failed: {exc.error.error.desc}") from exc
        except ConnectError as exc:
            raise SevhookError(
                f"{self.describe()}: cannot connect ({exc.exc}); is QEMU running with -qmp "
                f"unix:{self.path},server=on,wait=off?"
            ) from exc
        except TimeoutError as exc:
            raise SevhookError(f"{self.describe()}: no answer within {self.timeout:g} s") from exc
        except (QMPError, OSError, EOFError) as exc:
            raise SevhookError(f"{self.describe()}: the monitor failed: {exc}") from exc
        finally:
            await client.disconnect()
        if not isinstance(reply, dict):
            raise SevhookError(f"{self.describe()}: query-sev-capabilities returned {type(reply).__name__}, not an "
                               "object")
        return reply


@dataclass(frozen=True)
class LibvirtConnection:
    """libvirt's virNodeGetSEVInfo on a connection URI (`virsh nodesevinfo`)."""

    uri: str

    def describe(self) -> str:
        return f"libvirt {self.uri}"

    def load(self) -> PlatformInfo:
        try:
            import libvirt  # noqa: PLC0415  (an optional extra, only for -c URI)
        except ImportError as exc:
            raise UsageError("-c URI needs libvirt-python: install sevhook[libvirt]") from exc
        libvirt.registerErrorHandler(_ignore_libvirt_error, None)  # errors are raised, not printed
        try:
            conn = libvirt.open(self.uri)
            try:
                info = conn.getSEVInfo()
            finally:
                conn.close()
        except libvirt.libvirtError as exc:
            raise SevhookError(f"{self.describe()}: getSEVInfo failed: {exc.get_error_message()}") from exc
        try:
            return PlatformInfo(int(info["cbitpos"]), int(info["reduced-phys-bits"]), self.describe())
        except (KeyError, TypeError, ValueError) as exc:
            raise SevhookError(f"{self.describe()}: getSEVInfo gave no cbitpos/reduced-phys-bits") from exc


def _ignore_libvirt_error(_context: object, _error: object) -> None:
    """libvirt-python prints every error to stderr unless a handler takes it; ours are raised instead."""


def needs_platform(model: LaunchSecurity) -> bool:
    return isinstance(model, (SevLaunchSecurity, SevSnpLaunchSecurity)) and (
        model.cbitpos is None or model.reduced_phys_bits is None
    )


def fill_platform(model: LaunchSecurity, source: PlatformSource | None) -> tuple[LaunchSecurity, PlatformInfo | None]:
    """Fill only what the XML leaves out, as libvirt does; the XML's own values always win."""
    if not needs_platform(model):
        return model, None
    assert isinstance(model, (SevLaunchSecurity, SevSnpLaunchSecurity))
    if source is None:
        missing = " and ".join(
            name for name, value in (("<cbitpos>", model.cbitpos),
                                     ("<reducedPhysBits>", model.reduced_phys_bits)) if value is None
        )
        raise SevhookError(
            f"<launchSecurity> has no {missing}, which libvirt takes from the host at start: pass --domcaps FILE "
            "(saved from `virsh domcapabilities`), --cbitpos N --reduced-phys-bits N, --qmp SOCKET or -c URI"
        )
    info = source.load()
    filled = dataclasses.replace(
        model,
        cbitpos=info.cbitpos if model.cbitpos is None else model.cbitpos,
        reduced_phys_bits=info.reduced_phys_bits if model.reduced_phys_bits is None else model.reduced_phys_bits,
    )
    return filled, info
