"""`sevhook prepare-domain`: turn a domain with <launchSecurity type='sev'> into an attested one, in
one of three modes (docs/emulator.md says which to use when):
- emulator (the default): <emulator> becomes the wrapper sevhook-qemu, which gets a fresh launch from
  the broker at every start and attests at libvirt's `cont`; the metadata names the real QEMU;
- hook: the key broker makes a launch for this host's platform (its PDH and certificate chain); its
  GODH certificate and session go into <launchSecurity>, and the domain gets the private QMP monitor
  the hook talks to;
- start: `sevhook start` makes the launch and attests through libvirt's APIs.
Converting between modes removes what the previous mode added. The result is checked with sevhook's
own validator."""

from __future__ import annotations

import base64
import shutil
import sys
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path

from lxml import etree

from sevhook.config import MODES
from sevhook.errors import UsageError
from sevhook.files import UnwritableFileError, read_input_file, write_private_file
from sevhook.hook.plan import private_monitor_arg
from sevhook.hook.runtime import default_monitor_socket
from sevhook.launch.broker import SESSION_RETRIES, open_broker
from sevhook.monitor.libvirt_monitor import host_capabilities
from sevhook.sev.certs import SEV_CERT_SIZE, SevCertificate
from sevhook.sev.chain import SEV_CHAIN_ORDER, maybe_base64
from sevhook.sev.platform_export import CHAIN_FILE, DEFAULT_PLATFORM_DIR, FULL_CHAIN_FILE, read_export
from sevhook.virt import open_connection
from sevhook.xml import load_domain
from sevhook.xml.models import QEMU_NS, SEVHOOK_NS, BrokerRef
from sevhook.xml.parsing import MAX_DOCUMENT_BYTES, parse_document, read_source

MAX_EXPORT_BYTES = 64 * 1024  # a full chain is six certificates of 2084 bytes, base64 a third more

DEFAULT_QEMU = "/usr/bin/qemu-system-x86_64"
WRAPPER_NAME = "sevhook-qemu"
_QEMU = f"{{{QEMU_NS}}}"
_SEVHOOK = f"{{{SEVHOOK_NS}}}"


@dataclass(frozen=True)
class PreparedLaunch:
    """What prepare-domain writes into the domain: the broker's launch and how the hook reaches it."""

    broker_url: str
    guest_id: str
    launch_id: str | None
    godh_b64: str | None
    session_b64: str | None
    policy: int | None
    socket: str | None
    timeout: float
    token_file: str | None = None
    ca_file: str | None = None
    emulator_qemu: str | None = None  # emulator mode: the real QEMU sevhook-qemu runs


def default_socket(domain_name: str) -> str:
    return str(default_monitor_socket(domain_name))


def domain_name(root: etree._Element, filename: str) -> str:
    name = (root.findtext("name") or "").strip()
    if not name:
        raise UsageError(f"{filename}: the domain has no <name>; add one before preparing it")
    return name


def apply_launch(root: etree._Element, launch: PreparedLaunch, filename: str) -> None:
    """Rewrite the parsed domain in place: launch security, metadata, private monitor."""
    security = root.find("launchSecurity")
    if security is None or security.get("type") != "sev":
        raise UsageError(f"{filename}: prepare-domain needs <launchSecurity type='sev'> with a <policy>; add it "
                         "(SEV-ES: policy bit 0x4) and run again")
    previous = root.find(f"metadata/{_SEVHOOK}attestation/{_SEVHOOK}monitor")
    previous_emulator = root.find(f"metadata/{_SEVHOOK}attestation/{_SEVHOOK}emulator")
    stale_sockets = {launch.socket or ""} | ({previous.get("socket", "")} if previous is not None else set())
    _set_launch_security(security, launch)
    _set_metadata(root, launch)
    _set_private_monitor(root, launch.socket, stale_sockets)
    _set_emulator(root, launch, previous_emulator.get("qemu") if previous_emulator is not None else None)


def _set_launch_security(security: etree._Element, launch: PreparedLaunch) -> None:
    for tag in ("dhCert", "session"):
        for old in security.findall(tag):
            security.remove(old)
    if launch.godh_b64 is None or launch.session_b64 is None or launch.policy is None:
        return  # emulator and start mode: a fresh session is made at every start
    policy = security.find("policy")
    if policy is None:
        policy = etree.SubElement(security, "policy")
    policy.text = f"0x{launch.policy:04x}"  # the session is MACed with the broker's policy: they must agree
    etree.SubElement(security, "dhCert").text = launch.godh_b64
    etree.SubElement(security, "session").text = launch.session_b64


def wrapper_path() -> str:
    """sevhook-qemu's absolute path: next to this Python (a virtualenv), else on PATH."""
    beside = Path(sys.executable).with_name(WRAPPER_NAME)
    found = str(beside) if beside.is_file() else shutil.which(WRAPPER_NAME)
    if found is None:
        raise UsageError(f"{WRAPPER_NAME} is not installed next to {sys.executable} nor on PATH; install sevhook "
                         "(it provides the console script) or use --mode hook")
    return str(Path(found).absolute())


def _set_emulator(root: etree._Element, launch: PreparedLaunch, previous_qemu: str | None) -> None:
    """Emulator mode: <emulator> is the wrapper. Other modes: a wrapper left by emulator mode gives way
    to the real QEMU it ran."""
    devices = root.find("devices")
    if devices is None:
        devices = etree.SubElement(root, "devices")
    emulator = devices.find("emulator")
    if launch.emulator_qemu is not None:
        if emulator is None:
            emulator = etree.Element("emulator")
            devices.insert(0, emulator)
        emulator.text = wrapper_path()
    elif emulator is not None and Path((emulator.text or "").strip()).name == WRAPPER_NAME:
        emulator.text = previous_qemu or DEFAULT_QEMU


def _set_metadata(root: etree._Element, launch: PreparedLaunch) -> None:
    metadata = root.find("metadata")
    if metadata is None:
        metadata = etree.Element("metadata")
        name = root.find("name")
        position = list(root).index(name) + 1 if name is not None else 0
        root.insert(position, metadata)
    for old in metadata.findall(f"{_SEVHOOK}attestation"):
        metadata.remove(old)
    attestation = etree.SubElement(metadata, f"{_SEVHOOK}attestation", nsmap={"sevhook": SEVHOOK_NS},
                                   timeout=f"{launch.timeout:g}")
    broker = etree.SubElement(attestation, f"{_SEVHOOK}broker", url=launch.broker_url)
    if launch.ca_file:
        broker.set("ca-file", launch.ca_file)
    if launch.token_file:
        broker.set("token-file", launch.token_file)
    guest = etree.SubElement(attestation, f"{_SEVHOOK}guest", id=launch.guest_id)
    if launch.launch_id is not None:
        guest.set("launch", launch.launch_id)
    if launch.socket is not None:
        etree.SubElement(attestation, f"{_SEVHOOK}monitor", socket=launch.socket)
    if launch.emulator_qemu is not None:
        etree.SubElement(attestation, f"{_SEVHOOK}emulator", qemu=launch.emulator_qemu)


def _set_private_monitor(root: etree._Element, socket: str | None, stale_sockets: set[str]) -> None:
    """One `-qmp unix:SOCKET,server=on,wait=off` pair in <qemu:commandline> (hook mode; none in the
    other modes), replacing the pairs of earlier preparations (their sockets in `stale_sockets`), so
    that preparing again is idempotent."""
    commandline = root.find(f"{_QEMU}commandline")
    if commandline is None:
        commandline = etree.SubElement(root, f"{_QEMU}commandline")
    args = commandline.findall(f"{_QEMU}arg")
    for flag, value in pairwise(args):
        target = (value.get("value") or "").partition(",")[0]
        if flag.get("value") == "-qmp" and target.startswith("unix:") and target[5:] in stale_sockets:
            commandline.remove(flag)
            commandline.remove(value)
    if socket is not None:
        etree.SubElement(commandline, f"{_QEMU}arg", value="-qmp")
        etree.SubElement(commandline, f"{_QEMU}arg", value=private_monitor_arg(socket))
    if len(commandline) == 0:
        root.remove(commandline)  # no custom arguments at all: libvirt marks no custom-argv taint
    etree.cleanup_namespaces(root, top_nsmap={"qemu": QEMU_NS})


def serialize(root: etree._Element) -> bytes:
    return etree.tostring(root, encoding="utf-8", xml_declaration=False) + b"\n"


FULL_CHAIN_NAMES = ("full_chain.bin", "full_chain.bin.b64")  # `sevhook sim platform export --out-dir`


def exported_platform(path: Path) -> tuple[str, str, str | None]:
    """(pdh_b64, cert_chain_b64, cpu0_id_b64) from a platform export: the full chain PDH|PEK|OCA|CEK[|ASK|ARK]
    (raw or base64) as `sevhook sim platform export` and `sevctl export --full` write it, or the
    directory `sevhook platform export` or `sevhook sim platform export --out-dir` filled (with the chip
    id, so the broker can fetch the signed CEK). Each certificate is parsed and its usage checked, so a
    wrong file fails here rather than at the broker."""

    if path.is_dir() and ((path / CHAIN_FILE).is_file() or (path / FULL_CHAIN_FILE).is_file()):
        return read_export(path).launch_fields()
    if path.is_dir():
        found = [path / name for name in FULL_CHAIN_NAMES if (path / name).is_file()]
        if not found:
            raise UsageError(f"{path}: no full_chain.bin here; write it with "
                             f"`sevhook sim platform export --out-dir {path}`")
        path = found[0]
    data = maybe_base64(read_input_file(path, MAX_EXPORT_BYTES, "platform export"))
    parts = [data[i * SEV_CERT_SIZE:(i + 1) * SEV_CERT_SIZE] for i in range(len(SEV_CHAIN_ORDER))]
    for index, (part, usage) in enumerate(zip(parts, SEV_CHAIN_ORDER, strict=True)):
        name = f"{path} certificate {index + 1}"
        certificate = SevCertificate.parse(part, name)
        if certificate.usage != usage:
            raise UsageError(f"{name}: holds a {certificate.usage.name} certificate where the {usage.name} "
                             "belongs; expected the full chain PDH|PEK|OCA|CEK|ASK|ARK")
    return base64.b64encode(parts[0]).decode("ascii"), base64.b64encode(b"".join(parts[1:])).decode("ascii"), None


def host_platform(uri: str | None) -> tuple[str, str, str | None]:
    """(pdh_b64, cert_chain_b64, cpu0_id_b64) of this host's SEV platform: the platform cache
    (`sevhook platform export`) when no URI is given and it exists, else libvirt's getSEVInfo."""
    if uri is None and (DEFAULT_PLATFORM_DIR / CHAIN_FILE).is_file():
        return read_export(DEFAULT_PLATFORM_DIR).launch_fields()

    connection = open_connection(uri)  # virNodeGetSEVInfo is refused on a read-only connection
    try:
        capabilities = host_capabilities(connection)
    finally:
        connection.close()
    return capabilities.pdh_b64, capabilities.cert_chain_b64, capabilities.cpu0_id_b64


def prepare_domain_file(domain_xml: str | Path, *, broker_url: str, guest_id: str, uri: str | None = None,
                        platform_export: Path | None = None, socket: str | None = None, timeout: float = 30.0,
                        token_file: Path | None = None, ca_file: Path | None = None,
                        output: Path | None = None, mode: str = "hook", qemu: str | None = None) -> list[str]:
    """The whole command: returns the validator's warnings; raises on any error. Only hook mode asks
    the broker now; the other modes get a fresh launch at every start."""
    if not 0 < timeout <= 3600:
        raise UsageError(f"--timeout {timeout:g}: give the hook between 0 and 3600 seconds")
    if socket is not None and not socket.startswith("/"):
        raise UsageError(f"--socket {socket}: the private monitor socket needs an absolute path")
    if mode not in MODES:
        raise UsageError(f"--mode {mode}: choose one of {', '.join(MODES)}")
    if socket is not None and mode != "hook":
        raise UsageError(f"--socket is for --mode hook only (the private monitor of the hook); drop it for {mode} mode")
    if qemu is not None and (mode != "emulator" or not qemu.startswith("/")):
        raise UsageError(f"--qemu {qemu}: give an absolute path, with --mode emulator (the QEMU sevhook-qemu runs)")
    if str(domain_xml) == "-":
        data, filename = read_source(sys.stdin.buffer.read(MAX_DOCUMENT_BYTES + 1), "<stdin>")
    else:
        data, filename = read_source(str(domain_xml))
    root = parse_document(data, filename).getroot()
    name = domain_name(root, filename)
    launch = PreparedLaunch(
        broker_url=broker_url, guest_id=guest_id, launch_id=None, godh_b64=None, session_b64=None, policy=None,
        socket=None, timeout=timeout, token_file=str(token_file.resolve()) if token_file else None,
        ca_file=str(ca_file.resolve()) if ca_file else None,
        emulator_qemu=(qemu or DEFAULT_QEMU) if mode == "emulator" else None,
    )
    if mode == "hook":
        pdh_b64, chain_b64, cpu0_id_b64 = exported_platform(platform_export) if platform_export else host_platform(uri)
        ref = BrokerRef(broker_url, ca_file=str(ca_file) if ca_file else None,
                        token_file=str(token_file) if token_file else None)
        broker = open_broker(ref, timeout, SESSION_RETRIES)
        try:
            grant = broker.create_launch(guest_id, pdh_b64, chain_b64, cpu0_id_b64)
        finally:
            broker.close()
        launch = replace(launch, launch_id=grant.launch_id, godh_b64=grant.godh_b64, session_b64=grant.session_b64,
                         policy=grant.policy, socket=socket or default_socket(name))
    apply_launch(root, launch, filename)
    prepared = serialize(root)
    target = str(output) if output else "<prepared domain>"
    document = load_domain(prepared, filename=target)
    document.require_valid()
    if output is None:
        sys.stdout.buffer.write(prepared)
    else:
        _write_atomically(output, prepared)
    return [str(problem) for problem in document.warnings]


def _write_atomically(path: Path, data: bytes) -> None:
    try:
        write_private_file(path, data, mode=0o644)
    except UnwritableFileError as exc:
        raise UsageError(f"{path}: cannot write the prepared domain ({exc.reason})") from exc
