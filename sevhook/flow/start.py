"""`sevhook start`: the attested launch through libvirt's own APIs, with no private monitor and no
custom QEMU arguments. What is its own: reading the defined domain, writing the broker's launch
session into it and starting it paused; the session, measure, attest, inject and resume steps are
sevhook.launch's, over DomainLaunchPort. libvirt (DomainPort), the host's platform certificates
(PlatformSource) and the key broker (BrokerFactory) are injected, so tests can drive every path.

    metadata  read the defined domain: <launchSecurity type='sev'> and <sevhook:attestation>
    platform  this host's PDH and certificate chain (getSEVInfo, or a platform export file)
    session   the key broker makes a fresh launch for that platform: GODH certificate and session
    define    write dhCert, session, policy and the launch id into the domain and redefine it
    start     start it paused (VIR_DOMAIN_START_PAUSED): QEMU measures and waits in launch-secret
    measure   the launch measurement and firmware version (virDomainGetLaunchSecurityInfo)
    attest    the broker judges the measurement and wraps the secret for exactly this launch
    inject    virDomainSetLaunchSecurityState
    resume    virDomainResume (LAUNCH_FINISH), unless the metadata says resume='no'

Fail closed: once the domain was started, any failure destroys it, so an unattested guest never
runs; a domain that was already running is refused and left alone.

Start mode: the metadata declares no <sevhook:monitor> (a domain that declares one belongs to the
libvirt hook and is refused). While libvirt starts the domain this process holds the hook's start
marker (LaunchClaim), so an installed hook lets this start through and refuses any other."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import Protocol

from lxml import etree

from sevhook.broker.client import LaunchGrant
from sevhook.errors import SevhookError
from sevhook.hook.install import DEFAULT_HOOKS_DIR, script_path
from sevhook.hook.runtime import start_marker
from sevhook.launch.broker import BrokerFactory, open_broker
from sevhook.launch.checks import Deadline
from sevhook.launch.sequence import AttestedLaunch, LaunchRequest, MeasuredLaunch, create_launch, fail_closed
from sevhook.launch.steps import Steps
from sevhook.monitor.types import LaunchInfo, SevInfo, VmStatus
from sevhook.sev.measurement import LaunchMeasurement
from sevhook.xml import load_domain
from sevhook.xml.models import SEVHOOK_NS, Attestation, SevLaunchSecurity
from sevhook.xml.parsing import parse_document

_GUEST = f"{{{SEVHOOK_NS}}}attestation/{{{SEVHOOK_NS}}}guest"


class DomainPort(Protocol):
    """The libvirt operations the start sequence needs on one defined domain."""

    name: str

    def state(self) -> str: ...  # "shutoff", "paused", "running", ...

    def inactive_xml(self) -> str: ...

    def redefine(self, xml: str) -> None: ...

    def start_paused(self) -> None: ...

    def launch_info(self) -> LaunchInfo: ...

    def inject(self, header_b64: str, secret_b64: str) -> None: ...

    def resume(self) -> None: ...

    def destroy(self) -> bool: ...  # True when it was running


PlatformSource = Callable[[], "tuple[str, str, str | None]"]  # -> (pdh_b64, cert_chain_b64, cpu0_id_b64)
LaunchClaim = Callable[[str], AbstractContextManager[object]]  # held (domain name) while libvirt starts it


@contextmanager
def claim_for_the_hook(name: str) -> Iterator[None]:
    """Hold the marker that tells sevhook's libvirt hook that this process attests the launch
    (sevhook.hook.runtime.start_marker); an installed hook refuses the start without it. When it
    cannot be written (not root, say) and no hook is installed, there is nobody to tell."""
    with ExitStack() as held:
        try:
            held.enter_context(start_marker(name))
        except SevhookError:
            if script_path(DEFAULT_HOOKS_DIR).exists():
                raise
        yield


@dataclass(frozen=True)
class StartedGuest:
    """What a successful start did (no secrets: the packet went straight to libvirt)."""

    domain: str
    guest_id: str
    launch_id: str
    measurement_sha256: str
    resumed: bool


@dataclass(frozen=True)
class ManagedDomain:
    """The parts of the defined domain the sequence works with."""

    xml: str
    launch_security: SevLaunchSecurity
    attestation: Attestation
    loader: str | None = None  # the firmware file, whose secret area must hold the secret


def read_domain(name: str, xml: str) -> ManagedDomain:
    """The domain's SEV launch security and sevhook metadata, or the reason it cannot be attested."""
    document = load_domain(xml, filename=f"domain {name}")
    if document.errors:
        listed = "; ".join(f"line {p.line}: {p.message}" for p in document.errors[:3])
        more = f" (and {len(document.errors) - 3} more)" if len(document.errors) > 3 else ""
        raise SevhookError(f"the domain XML has errors: {listed}{more}; fix them with `virsh edit {name}`")
    domain = document.domain
    if domain.attestation is None:
        raise SevhookError(f"domain {name} has no <sevhook:attestation> in its <metadata>: add the broker URL and "
                           "guest id (see docs/quickstart.md), e.g. with `sevhook prepare-domain`")
    if not isinstance(domain.launch_security, SevLaunchSecurity):
        found = f"type '{domain.launch_security.type}'" if domain.launch_security else "no <launchSecurity>"
        raise SevhookError(f"domain {name} has {found}; sevhook start attests <launchSecurity type='sev'> "
                           "guests (SEV and SEV-ES) only")
    if domain.attestation.socket:
        raise SevhookError(f"domain {name} declares <sevhook:monitor> in its metadata, so sevhook's libvirt hook "
                           f"attests it (hook mode): start it with `virsh start --paused {name}`, or remove "
                           "<sevhook:monitor> (and the -qmp <qemu:arg>s for its socket) to use sevhook start")
    return ManagedDomain(xml, domain.launch_security, domain.attestation, domain.os.loader)


def with_launch(xml: str, grant: LaunchGrant, filename: str) -> str:
    """The domain XML with the broker's launch: policy, dhCert and session in <launchSecurity> (the
    session is MACed with the broker's policy, so they must agree) and launch='...' in the metadata."""
    root = parse_document(xml.encode("utf-8"), filename).getroot()
    security = root.find("launchSecurity")
    guest = root.find(f"metadata/{_GUEST}")
    if security is None or guest is None:
        raise SevhookError(f"{filename}: <launchSecurity> or <sevhook:guest> disappeared while starting")
    for old in security.findall("dhCert") + security.findall("session"):
        security.remove(old)
    policy = security.find("policy")
    if policy is None:
        policy = etree.SubElement(security, "policy")
    policy.text = f"0x{grant.policy:04x}"
    etree.SubElement(security, "dhCert").text = grant.godh_b64
    etree.SubElement(security, "session").text = grant.session_b64
    guest.set("launch", grant.launch_id)
    return etree.tostring(root, encoding="unicode")


class DomainLaunchPort:
    """sevhook.launch's LaunchPort on a DomainPort: libvirt's public SEV APIs cannot read the launch
    state (query-sev), so the sequence checks that libvirt reports the domain paused instead; failing
    closed destroys the domain."""

    reads_launch_state = False
    fail_closed_step = "destroy"

    def __init__(self, domain: DomainPort) -> None:
        self.domain = domain
        self.timeout = 0.0  # libvirt bounds its own calls (job timeouts)
        self.destroyed = False  # set when failing closed destroyed a running domain

    def status(self) -> VmStatus:
        state = self.domain.state()
        return VmStatus(state, state == "running")

    def launch_state(self) -> SevInfo:
        raise SevhookError("libvirt's public API does not report the SEV launch state")

    def measured_launch(self, info: SevInfo | None) -> MeasuredLaunch:
        launch = self.domain.launch_info()
        measurement = LaunchMeasurement.parse(launch.measurement_b64, what="libvirt's sev-measurement")
        return MeasuredLaunch(measurement, launch.api_major, launch.api_minor, launch.build_id, launch.policy)

    def inject_secret(self, header_b64: str, secret_b64: str) -> None:
        self.domain.inject(header_b64, secret_b64)

    def resume(self) -> None:
        self.domain.resume()

    def fail_closed(self) -> str:
        self.destroyed = self.domain.destroy()
        return "the guest was destroyed without its secret" if self.destroyed else "the domain is not running"


class StartSequence:
    """One `sevhook start` of one domain; `run()` returns StartedGuest or raises StepFailed."""

    def __init__(self, domain: DomainPort, platform: PlatformSource, steps: Steps,
                 broker_factory: BrokerFactory = open_broker, claim: LaunchClaim = claim_for_the_hook) -> None:
        self.domain = domain
        self.port = DomainLaunchPort(domain)
        self.platform = platform
        self.steps = steps
        self.broker_factory = broker_factory
        self.claim = claim

    @property
    def destroyed(self) -> bool:
        """Whether a failure made it destroy the guest it started."""
        return self.port.destroyed

    def run(self) -> StartedGuest:
        name = self.domain.name
        with self.steps.step("metadata") as note:
            state = self.domain.state()
            if state != "shutoff":
                raise SevhookError(f"domain {name} is {state}; sevhook start launches a shut-off domain (its "
                                   "launch cannot be attested once it has begun): shut it down first")
            managed = read_domain(name, self.domain.inactive_xml())
            attestation = managed.attestation
            note.detail = f"guest {attestation.guest_id} at {attestation.broker.url}, timeout {attestation.timeout:g} s"
        deadline = Deadline(attestation.timeout)
        with self.steps.step("platform") as note:
            pdh_b64, chain_b64, cpu0_id_b64 = self.platform()
            note.detail = "PDH and certificate chain of this host's SEV platform"
        grant = create_launch(self.steps, attestation.broker, attestation.guest_id, pdh_b64, chain_b64, deadline,
                              self.broker_factory, cpu0_id_b64)
        with self.steps.step("define") as note:
            deadline.remaining("define")
            prepared = with_launch(managed.xml, grant, f"domain {name}")
            read_domain(name, prepared)  # what libvirt gets must still be a valid managed domain
            self.domain.redefine(prepared)
            note.detail = "dhCert and session of the new launch written into the domain"
        try:
            with self.steps.step("start") as note:
                deadline.remaining("start")
                with self.claim(name):  # the hook's prepare/start/started calls all run inside start_paused
                    self.domain.start_paused()
                note.detail = "started paused; QEMU measured the launch"
        except BaseException:  # a start that failed half-way may have left QEMU running
            fail_closed(self.port, self.steps)
            raise
        request = LaunchRequest(name, grant.launch_id, grant.policy, attestation.broker, attestation.timeout,
                                attestation.resume, managed.loader)
        attested = AttestedLaunch(request, self.port, self.steps, deadline, self.broker_factory).run()
        fingerprint = hashlib.sha256(attested.measurement.to_bytes()).hexdigest()
        return StartedGuest(name, attestation.guest_id, grant.launch_id, fingerprint, attested.resumed)
