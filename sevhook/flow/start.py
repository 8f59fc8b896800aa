"""`sevhook start`: the attested launch through libvirt's own APIs, with no private monitor and no
custom QEMU arguments. The sequence is pure: libvirt (DomainPort), the host's platform certificates
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

import base64
import binascii
import hashlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from lxml import etree

from sevhook.errors import SevhookError
from sevhook.flow.steps import StepFailed, Steps
from sevhook.hook.plan import Deadline, check_secret_packet
from sevhook.sev.secret_area import check_injection_target
from sevhook.xml.models import SEVHOOK_NS, Attestation, BrokerRef, SevLaunchSecurity

if TYPE_CHECKING:
    from sevhook.broker.client import LaunchGrant, SecretGrant

MAX_BROKER_TIMEOUT = 60.0
MEASUREMENT_SIZE = 48  # measurement(32) || mnonce(16)
_GUEST = f"{{{SEVHOOK_NS}}}attestation/{{{SEVHOOK_NS}}}guest"


@dataclass(frozen=True)
class LaunchInfo:
    """What libvirt reports for a measured launch (virDomainGetLaunchSecurityInfo)."""

    measurement_b64: str
    api_major: int
    api_minor: int
    build_id: int
    policy: int


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


class BrokerPort(Protocol):
    """The key broker as the host sees it (sevhook.broker.client.BrokerClient)."""

    def create_launch(self, guest: str, pdh_b64: str, cert_chain_b64: str,
                      cpu0_id_b64: str | None = None) -> LaunchGrant: ...

    def attest(self, launch_id: str, measurement_b64: str, api_major: int, api_minor: int, build_id: int,
               policy: int) -> SecretGrant: ...

    def close(self) -> None: ...


PlatformSource = Callable[[], "tuple[str, str, str | None]"]  # -> (pdh_b64, cert_chain_b64, cpu0_id_b64)
BrokerFactory = Callable[[BrokerRef, float, int], BrokerPort]  # (ref, timeout, retries)
LaunchClaim = Callable[[str], AbstractContextManager[object]]  # held (domain name) while libvirt starts it


@contextmanager
def claim_for_the_hook(name: str) -> Iterator[None]:
    """Hold the marker that tells sevhook's libvirt hook that this process attests the launch
    (sevhook.hook.runtime.start_marker); an installed hook refuses the start without it. When it
    cannot be written (not root, say) and no hook is installed, there is nobody to tell."""
    from sevhook.hook.install import DEFAULT_HOOKS_DIR, script_path  # noqa: PLC0415
    from sevhook.hook.runtime import start_marker  # noqa: PLC0415

    with ExitStack() as held:
        try:
            held.enter_context(start_marker(name))
        except SevhookError:
            if script_path(DEFAULT_HOOKS_DIR).exists():
                raise
        yield


def open_broker(ref: BrokerRef, timeout: float, retries: int) -> BrokerPort:
    from sevhook.broker.client import BrokerClient  # noqa: PLC0415  (only when asked)

    return BrokerClient(ref.url, ca_file=ref.ca_file, token_file=ref.token_file, timeout=timeout, retries=retries)


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
    from sevhook.xml import load_domain  # noqa: PLC0415

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
    from sevhook.xml.parsing import parse_document  # noqa: PLC0415

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


def measurement_fingerprint(measurement_b64: str) -> str:
    """A short, non-secret name for a measurement in progress lines: SHA-256 of its bytes."""
    try:
        data = base64.b64decode(measurement_b64, validate=True)
    except (binascii.Error, ValueError):
        raise SevhookError("libvirt returned a sev-measurement that is not base64") from None
    if len(data) != MEASUREMENT_SIZE:
        raise SevhookError(f"libvirt returned a {len(data)}-byte sev-measurement, expected {MEASUREMENT_SIZE} "
                           "(measurement and mnonce)")
    return hashlib.sha256(data).hexdigest()


class StartSequence:
    """One `sevhook start` of one domain; `run()` returns StartedGuest or raises StepFailed."""

    def __init__(self, domain: DomainPort, platform: PlatformSource, steps: Steps,
                 broker_factory: BrokerFactory = open_broker, claim: LaunchClaim = claim_for_the_hook) -> None:
        self.domain = domain
        self.platform = platform
        self.steps = steps
        self.broker_factory = broker_factory
        self.claim = claim
        self._started = False
        self.destroyed = False  # set when a failure made it destroy the guest it started

    def run(self) -> StartedGuest:
        try:
            return self._run()
        except BaseException:  # a failed step, and also an interruption or a bug: never leave it half-started
            if self._started:
                self._destroy()
            raise

    def _run(self) -> StartedGuest:
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
        with self.steps.step("session") as note:
            grant = self._create_launch(attestation, deadline, pdh_b64, chain_b64, cpu0_id_b64)
            note.detail = f"launch {grant.launch_id}, policy {grant.policy:#06x}"
        with self.steps.step("define") as note:
            deadline.remaining("define")
            prepared = with_launch(managed.xml, grant, f"domain {name}")
            read_domain(name, prepared)  # what libvirt gets must still be a valid managed domain
            self.domain.redefine(prepared)
            note.detail = "dhCert and session of the new launch written into the domain"
        with self.steps.step("start") as note:
            deadline.remaining("start")
            self._started = True
            with self.claim(name):  # the hook's prepare/start/started calls all run inside start_paused
                self.domain.start_paused()
            note.detail = "started paused; QEMU measured the launch"
        with self.steps.step("measure") as note:
            deadline.remaining("measure")
            state = self.domain.state()
            if state != "paused":
                raise SevhookError(f"the domain is {state} instead of paused, so its launch may have finished "
                                   "without a verdict")
            info = self.domain.launch_info()
            fingerprint = measurement_fingerprint(info.measurement_b64)
            if info.policy != grant.policy:
                raise SevhookError(f"the guest was launched with policy {info.policy:#06x}, the broker's session "
                                   f"is for {grant.policy:#06x}")
            note.detail = (f"firmware API {info.api_major}.{info.api_minor} build {info.build_id}, "
                           f"measurement sha256 {fingerprint[:16]}")
        with self.steps.step("attest") as note:
            secret = self._attest(attestation, deadline, grant.launch_id, info)
            note.detail = "the key broker accepted the measurement and released the secret"
        with self.steps.step("inject") as note:
            deadline.remaining("inject")
            check_secret_packet(secret.header_b64, secret.secret_b64)
            check_injection_target(managed.loader, secret.secret_b64)
            self.domain.inject(secret.header_b64, secret.secret_b64)
            note.detail = f"{len(base64.b64decode(secret.secret_b64))}-byte secret packet injected"
        if attestation.resume:
            with self.steps.step("resume") as note:
                self.domain.resume()
                note.detail = "running"
        else:
            self.steps.info("resume", "left paused as the metadata asks (resume='no')")
        return StartedGuest(name, attestation.guest_id, grant.launch_id, fingerprint, attestation.resume)

    def _create_launch(self, attestation: Attestation, deadline: Deadline, pdh_b64: str, chain_b64: str,
                       cpu0_id_b64: str | None) -> LaunchGrant:
        timeout = min(deadline.remaining("session"), MAX_BROKER_TIMEOUT)
        broker = self.broker_factory(attestation.broker, timeout, 2)  # nothing is spent: retrying is safe
        try:
            return broker.create_launch(attestation.guest_id, pdh_b64, chain_b64, cpu0_id_b64)
        finally:
            broker.close()

    def _attest(self, attestation: Attestation, deadline: Deadline, launch_id: str, info: LaunchInfo
                ) -> SecretGrant:
        timeout = min(deadline.remaining("attest"), MAX_BROKER_TIMEOUT)
        broker = self.broker_factory(attestation.broker, timeout, 0)  # a measurement is sent once only
        try:
            return broker.attest(launch_id, info.measurement_b64, info.api_major, info.api_minor, info.build_id,
                                 info.policy)
        finally:
            broker.close()

    def _destroy(self) -> None:
        """Best effort: the failure being raised is the reason; a failed destroy is reported too."""
        failed_step = self.steps.current
        try:
            with self.steps.step("destroy") as note:
                was_running = self.domain.destroy()
                self.destroyed = was_running
                note.detail = ("the guest was destroyed without its secret" if was_running
                               else "the domain is not running")
        except StepFailed:
            pass
        finally:
            self.steps.current = failed_step
