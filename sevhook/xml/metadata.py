"""<sevhook:attestation> in the domain's <metadata> -> Attestation model, with the checks that the
attested launch will actually be able to run (see docs/metadata.md)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from lxml import etree

from sevhook.errors import SevhookError
from sevhook.xml.launch_security import Report
from sevhook.xml.models import SEVHOOK_NS, Attestation, BrokerRef, LaunchSecurity, SevLaunchSecurity
from sevhook.xml.problems import ERROR, WARNING

ATTESTATION_TAG = f"{{{SEVHOOK_NS}}}attestation"
QEMU_ARG_XPATH = (
    "{http://libvirt.org/schemas/domain/qemu/1.0}commandline/{http://libvirt.org/schemas/domain/qemu/1.0}arg"
)
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes including the terminating NUL
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
DEFAULT_TIMEOUT = 30.0


def build(element: etree._Element) -> Attestation:
    """The model of a schema-valid <sevhook:attestation>."""
    broker = element.find(f"{{{SEVHOOK_NS}}}broker")
    guest = element.find(f"{{{SEVHOOK_NS}}}guest")
    monitor = element.find(f"{{{SEVHOOK_NS}}}monitor")  # absent: `sevhook start` attests the guest
    emulator = element.find(f"{{{SEVHOOK_NS}}}emulator")  # present: sevhook-qemu attests the guest
    assert broker is not None and guest is not None  # the schema requires them
    timeout = element.get("timeout")
    return Attestation(
        broker=BrokerRef(url=broker.get("url", ""), ca_file=broker.get("ca-file"), token_file=broker.get("token-file")),
        guest_id=guest.get("id", ""),
        launch_id=guest.get("launch"),
        socket=monitor.get("socket") if monitor is not None else None,
        timeout=float(timeout.strip()) if timeout is not None else DEFAULT_TIMEOUT,
        resume=(element.get("resume") or "yes").strip() == "yes",
        emulator_qemu=emulator.get("qemu") if emulator is not None else None,
    )


def check(
    attestation: Attestation,
    element: etree._Element,
    root: etree._Element,
    launch_security: LaunchSecurity | None,
    launch_security_element: etree._Element | None,
    report: Report,
) -> None:
    """Rules across the metadata and the rest of the domain."""
    monitor = element.find(f"{{{SEVHOOK_NS}}}monitor")
    broker = element.find(f"{{{SEVHOOK_NS}}}broker")
    socket = attestation.socket or ""
    emulator = element.find(f"{{{SEVHOOK_NS}}}emulator")
    if monitor is not None and emulator is not None:
        report(
            ERROR,
            emulator,
            "<sevhook:emulator> and <sevhook:monitor> name two ways to attest the guest: keep one, e.g. with "
            "`sevhook prepare-domain --mode emulator` (or --mode hook)",
        )
    if monitor is not None and len(socket.encode()) > MAX_SOCKET_PATH:
        report(
            ERROR,
            monitor,
            f"<sevhook:monitor> socket path is {len(socket.encode())} bytes; a UNIX socket path holds at most "
            f"{MAX_SOCKET_PATH}: use a shorter path such as /run/sevhook/NAME.qmp",
        )
    elif monitor is not None and not any(socket in (arg.get("value") or "") for arg in root.iterfind(QEMU_ARG_XPATH)):
        report(
            WARNING,
            monitor,
            f"QEMU is not told to open the monitor socket {socket}: the hook cannot reach the paused guest; add "
            f"<qemu:commandline><qemu:arg value='-qmp'/><qemu:arg value='unix:{socket},server=on,wait=off'/>"
            "</qemu:commandline> (xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0')",
        )
    url = urlsplit(attestation.broker.url)
    if broker is not None and url.scheme == "http" and (url.hostname or "") not in LOOPBACK_HOSTS:
        report(
            WARNING,
            broker,
            f"the key broker URL {attestation.broker.url} is plain http: the host token and the launch "
            "measurement cross the network unprotected; use https:// (with ca-file if the broker's CA is private)",
        )
    if launch_security is None:
        if launch_security_element is None:
            report(
                WARNING,
                element,
                "<sevhook:attestation> on a domain without <launchSecurity>: there is nothing to attest and the "
                "hook will refuse to start the guest; add <launchSecurity type='sev'> or remove the metadata",
            )
        return
    _check_loader_secret_area(root.find("os/loader"), report)
    if launch_security.type != "sev":
        report(
            WARNING,
            element,
            f"sevhook attests type='sev' guests (SEV and SEV-ES) only, this one is type='{launch_security.type}': "
            "the hook will refuse to start it; remove <sevhook:attestation> or use type='sev'",
        )
    elif monitor is not None and isinstance(launch_security, SevLaunchSecurity) and (
        launch_security.dh_cert is None and launch_security.session is None
    ):  # without <monitor>, `sevhook start` writes a fresh <dhCert>/<session> at every start
        report(
            WARNING,
            launch_security_element if launch_security_element is not None else element,
            "<launchSecurity> has no <dhCert> and <session>: the firmware then makes keys nobody knows, so "
            "the launch cannot be attested or given a secret; add the guest owner's <dhCert> and <session>",
        )


def _check_loader_secret_area(loader: etree._Element | None, report: Report) -> None:
    """A readable loader file without a usable SEV secret area gets the owner's secret nowhere: warn now
    (the hook and `sevhook start` refuse to inject into it later). Unreadable files are left to them."""
    path = (loader.text or "").strip() if loader is not None else ""
    if loader is None or not path or not os.access(path, os.R_OK):
        return
    from sevhook.sev.secret_area import NoSecretArea, require_secret_area  # noqa: PLC0415  (reads the file)

    try:
        require_secret_area(Path(path), 1)
    except NoSecretArea as exc:
        report(WARNING, loader, f"{exc.message}; the attested launch's secret cannot be injected")
    except SevhookError as exc:  # not a firmware image at all (a device, a directory, a short file)
        report(WARNING, loader, f"{exc.message}; its SEV launch-secret area cannot be checked")
