"""How the wrapper learns its domain's metadata without calling back into libvirt (which waits on it):
libvirt writes the domain's status file, /run/libvirt/qemu/NAME.xml (emulator.conf's
libvirt-state-dir), before it execs the emulator, with the full domain XML (persistent or transient,
autostarted or not) and the pid of the process it is starting, which is ours. A status file of another
pid is not this start's and is refused."""

from __future__ import annotations

from pathlib import Path

from lxml import etree

from sevhook.errors import SevhookError
from sevhook.hook import plan
from sevhook.hook.plan import HookFailure, ManagedGuest
from sevhook.xml import load_domain
from sevhook.xml.parsing import read_source, safe_parser


def status_file(name: str, state_dir: Path) -> Path:
    return state_dir / f"{name}.xml"


def guest_from_status(name: str, pid: int, state_dir: Path) -> ManagedGuest | None:
    """The guest as sevhook manages it, from libvirt's status file; None when libvirt is not starting
    this QEMU (no status file) or the domain carries no sevhook metadata."""
    path = status_file(name, state_dir)
    if not path.exists():
        return None
    try:
        data, _filename = read_source(str(path))
        root = etree.fromstring(data, safe_parser())
    except SevhookError as exc:
        raise HookFailure("metadata", f"cannot read libvirt's status file: {exc.message}") from exc
    except etree.XMLSyntaxError as exc:
        raise HookFailure("metadata", f"{path}: libvirt's status file is not XML ({exc})") from exc
    if root.tag != "domstatus" or root.find("domain") is None:
        raise HookFailure("metadata", f"{path} is not a libvirt domain status file (<domstatus><domain>)")
    owner = root.get("pid")
    if owner != str(pid):
        raise HookFailure("metadata", f"{path} belongs to pid {owner}, not to this QEMU (pid {pid}): the domain "
                          f"{name} is not being started by libvirt now; start it with `virsh start {name}`")
    domain_xml = etree.tostring(root.find("domain"))
    document = load_domain(domain_xml, filename=f"{path} <domain>", decode_certificates=False)
    guest = plan.managed_guest(document.domain)
    if guest is not None and document.errors:
        raise HookFailure("metadata", "; ".join(str(problem) for problem in document.errors))
    return guest
