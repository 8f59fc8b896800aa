"""The hook's decisions, free of I/O: what each libvirt operation means for a guest, which guests it
manages, and what their attested launch asks for (the launch itself, its checks and its time budget
are sevhook.launch's). Every refusal is a HookFailure naming the step, so the administrator reads in
virsh's error where the launch stopped."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from sevhook.errors import StepError
from sevhook.xml.models import Attestation, Domain, SevLaunchSecurity

if TYPE_CHECKING:
    from sevhook.launch.sequence import LaunchRequest


class Action(Enum):
    """What the hook does for one libvirt operation."""

    VALIDATE = "validate"  # prepare: refuse a domain that cannot be attested
    PREPARE_RUNTIME = "prepare-runtime"  # start: private monitor directory, no stale socket
    ATTEST = "attest"  # started: measurement -> broker -> secret -> cont
    CLEAN_UP = "clean-up"  # stopped, release: remove the domain's runtime files
    REFUSE_MOVE = "refuse-move"  # migrate, restore: launch state cannot move
    NOTHING = "nothing"  # reconnect, attach, and operations newer libvirt may add
    REFUSE_START_MODE = "refuse-start-mode"  # no <sevhook:monitor> and no live `sevhook start`: nobody attests
    REMOVE_STALE_MARKER = "remove-stale-marker"  # stopped, release of such a guest: `sevhook start`'s leftovers


_ACTIONS = {
    "prepare": Action.VALIDATE,
    "start": Action.PREPARE_RUNTIME,
    "started": Action.ATTEST,
    "stopped": Action.CLEAN_UP,
    "release": Action.CLEAN_UP,
    "migrate": Action.REFUSE_MOVE,
    "restore": Action.REFUSE_MOVE,
}


def action_for(operation: str) -> Action:
    return _ACTIONS.get(operation, Action.NOTHING)


def start_mode_action(action: Action, started_by_sevhook_start: bool) -> Action:
    """The action for a guest whose metadata declares no <sevhook:monitor>: `sevhook start` attests
    it through libvirt's APIs, so the hook has no monitor to attest it with. While a live `sevhook
    start` owns the launch the hook stays out of its way; otherwise nothing would attest the launch,
    so the hook refuses it (at prepare, and at start and started should prepare have been skipped)."""
    if started_by_sevhook_start:
        return Action.NOTHING
    if action in (Action.VALIDATE, Action.PREPARE_RUNTIME, Action.ATTEST):
        return Action.REFUSE_START_MODE
    if action is Action.CLEAN_UP:
        return Action.REMOVE_STALE_MARKER
    return action


def emulator_mode_action(action: Action) -> Action:
    """The action for a guest whose metadata declares <sevhook:emulator>: its emulator, sevhook-qemu,
    makes the launch and attests it at libvirt's `cont` over a monitor of its own, so the hook leaves
    it alone except to refuse moving its launch state (migrate, restore)."""
    return action if action is Action.REFUSE_MOVE else Action.NOTHING


def start_mode_refusal(name: str) -> HookFailure:
    return HookFailure("metadata", f"this guest is attested by `sevhook start` (its metadata declares no "
                       f"<sevhook:monitor>): start it with `sevhook start {name}`, or run `sevhook prepare-domain` "
                       "so the hook can attest it")


class HookFailure(StepError):
    """A step of the hook failed; the message goes to virsh's error."""


@dataclass(frozen=True)
class ManagedGuest:
    """A domain the hook attests: its SEV launch security and sevhook metadata, both present."""

    name: str
    launch_security: SevLaunchSecurity
    attestation: Attestation
    loader: str | None = None  # the firmware file, whose secret area must hold the secret

    @property
    def socket(self) -> Path:
        if not self.attestation.socket:
            raise HookFailure("metadata", "<sevhook:monitor socket=...> is missing; run `sevhook prepare-domain`")
        return Path(self.attestation.socket)


def managed_guest(domain: Domain) -> ManagedGuest | None:
    """The guest as the hook sees it, or None when it carries no sevhook metadata. Metadata on a
    guest whose launch security is missing, invalid or not SEV is refused, not ignored: the owner
    asked for attestation, and starting it unattested would fail open."""
    if domain.attestation is None:
        return None
    security = domain.launch_security
    if not isinstance(security, SevLaunchSecurity):
        found = f"type '{security.type}'" if security is not None else "no valid <launchSecurity>"
        raise HookFailure("metadata", f"<sevhook:attestation> is set but the domain has {found}; sevhook attests "
                          "type='sev' guests (SEV and SEV-ES) only: fix <launchSecurity> or remove the metadata")
    return ManagedGuest(domain.name, security, domain.attestation, domain.os.loader)


def readiness_problems(guest: ManagedGuest) -> list[str]:
    """What keeps a managed guest from being attested, found before QEMU starts (the XML loader
    reports these as warnings for a human; for the hook they are fatal)."""
    problems = []
    if not guest.launch_security.dh_cert or not guest.launch_security.session:
        problems.append("<launchSecurity> has no <dhCert>/<session>: run `sevhook prepare-domain` to get a "
                        "launch session from the key broker")
    if not guest.attestation.launch_id:
        problems.append("<sevhook:guest> has no launch='...': run `sevhook prepare-domain` to register the launch")
    return problems


def private_monitor_arg(socket: str) -> str:
    """The value of QEMU's -qmp option for the hook's private monitor."""
    return f"unix:{socket},server=on,wait=off"


def launch_request(guest: ManagedGuest) -> LaunchRequest:
    """What the attested launch of this guest asks for (the launch was registered by prepare-domain)."""
    from sevhook.launch.sequence import LaunchRequest  # the hook's other operations never load it

    if not guest.attestation.launch_id:
        raise HookFailure("metadata", "<sevhook:guest> has no launch='...': run `sevhook prepare-domain`")
    return LaunchRequest(guest.name, guest.attestation.launch_id, guest.launch_security.policy.value,
                         guest.attestation.broker, guest.attestation.timeout, guest.attestation.resume,
                         guest.loader)
