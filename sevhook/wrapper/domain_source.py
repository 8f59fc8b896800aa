"""How the wrapper learns its domain's metadata without calling back into libvirt (which waits on it):
libvirt writes the domain's status file, /run/libvirt/qemu/NAME.xml (emulator.conf's
libvirt-state-dir), before it execs the emulator, with the full domain XML (persistent or transient,
autostarted or not) and the pid of the process it is starting, which is ours. A status file of another
pid is not this start's and is refused.

Read in two steps, so that QEMU starts early: `read_status` (lxml only: the file, its owner) and
`emulator_qemu` (a first look at the metadata) decide before QEMU's spawn whether this start is to be
attested; `managed_guest` (the full checks of sevhook.xml, as `sevhook validate` makes them) runs
while QEMU starts, and nothing reaches QEMU's FIFOs unless it passes."""

from __future__ import annotations

from pathlib import Path

from lxml import etree

from sevhook.errors import SevhookError
from sevhook.hook import plan
from sevhook.hook.plan import HookFailure, ManagedGuest
from sevhook.xml.models import SEVHOOK_NS
from sevhook.xml.parsing import read_source, safe_parser

ATTESTATION_TAG = f"{{{SEVHOOK_NS}}}attestation"
EMULATOR_TAG = f"{{{SEVHOOK_NS}}}emulator"


def status_file(name: str, state_dir: Path) -> Path:
    return state_dir / f"{name}.xml"


def read_status(name: str, pid: int, state_dir: Path) -> etree._Element | None:
    """The <domain> of libvirt's status file for this very start (its pid ours); None when there is no
    status file (libvirt is not starting this QEMU). Raises HookFailure when it cannot be this start's."""
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
    domain = root.find("domain")
    if root.tag != "domstatus" or domain is None:
        raise HookFailure("metadata", f"{path} is not a libvirt domain status file (<domstatus><domain>)")
    owner = root.get("pid")
    if owner != str(pid):
        raise HookFailure("metadata", f"{path} belongs to pid {owner}, not to this QEMU (pid {pid}): the domain "
                          f"{name} is not being started by libvirt now; start it with `virsh start {name}`")
    return domain


def _attestation_element(domain: etree._Element) -> etree._Element | None:
    """<metadata>'s first <sevhook:attestation>, the one sevhook.xml reads."""
    metadata = domain.find("metadata")
    return metadata.find(ATTESTATION_TAG) if metadata is not None else None


def emulator_qemu(domain: etree._Element) -> str | None:
    """A first look, before QEMU's spawn: the QEMU that the domain's <sevhook:attestation> names in its
    <sevhook:emulator qemu=...>, read from the element sevhook.xml reads; None when the metadata does not
    ask for emulator mode. It only decides whether QEMU is spawned for an attested launch;
    `managed_guest` judges the metadata."""
    attestation = _attestation_element(domain)
    emulator = attestation.find(EMULATOR_TAG) if attestation is not None else None
    return emulator.get("qemu") if emulator is not None else None


def managed_guest(domain: etree._Element, name: str, state_dir: Path) -> ManagedGuest | None:
    """The guest as sevhook manages it, the whole domain checked as `sevhook validate` checks it; None when
    the domain carries no sevhook metadata. Metadata that cannot be read is refused, not ignored: the
    owner asked for attestation."""
    from sevhook.xml import load_domain  # the XML checks: loaded while QEMU starts

    document = load_domain(etree.tostring(domain), filename=f"{status_file(name, state_dir)} <domain>",
                           decode_certificates=False)
    guest = plan.managed_guest(document.domain)
    if (guest is not None or _attestation_element(domain) is not None) and document.errors:
        raise HookFailure("metadata", "; ".join(str(problem) for problem in document.errors))
    return guest


def guest_from_status(name: str, pid: int, state_dir: Path) -> ManagedGuest | None:
    """The guest as sevhook manages it, from libvirt's status file; None when libvirt is not starting
    this QEMU (no status file) or the domain carries no sevhook metadata."""
    domain = read_status(name, pid, state_dir)
    return managed_guest(domain, name, state_dir) if domain is not None else None
