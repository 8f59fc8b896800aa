"""One hook call for a domain sevhook manages: load the domain, then do what the operation needs
(plan.action_for; for a start-mode domain, one without <sevhook:monitor>, plan.start_mode_action
after looking for a live `sevhook start`'s marker). Failures print one line per reason on stderr,
`sevhook: NAME: STEP: REASON`, which libvirt shows in virsh's error, and exit 1; nothing is
printed on stdout (for migrate and restore, stdout would replace the domain XML)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sevhook.errors import SevhookError, StepError
from sevhook.hook import plan
from sevhook.hook.plan import Action, HookFailure, ManagedGuest
from sevhook.hook.steplog import StepLog
from sevhook.launch.checks import Deadline

if TYPE_CHECKING:
    from pathlib import Path

    from sevhook.xml.domain import DomainDocument

USAGE = "usage: sevhook hook run NAME OP SUBOP EXTRA < domain.xml (as libvirtd calls it)"


def run(argv: Sequence[str], domain_xml: bytes) -> int:
    if len(argv) < 2:
        print(f"sevhook hook: {USAGE}", file=sys.stderr)
        return 2
    name, operation = argv[0], argv[1]
    action = plan.action_for(operation)
    if action is Action.NOTHING:
        return 0
    log = StepLog.open(name, operation)
    steps = log.steps
    try:
        with steps.step("load"):
            document = _load(name, domain_xml, decode_certificates=action is Action.VALIDATE)
        guest, errors = _managed(document)
        if guest is not None and guest.attestation.mode == "emulator":
            action = plan.emulator_mode_action(action)
        elif guest is not None and guest.attestation.socket is None:
            from sevhook.hook import runtime  # runtime files: not needed to attest

            with steps.step("owner"):
                owned = runtime.start_marker_state(guest.name) is runtime.MarkerState.LIVE
            action = plan.start_mode_action(action, owned)
        if guest is not None:
            _perform(action, guest, errors, log)
    except StepError as failure:
        log.total("failed")
        for reason in failure.reason.splitlines():
            print(f"sevhook: {name}: {failure.step}: {reason}", file=sys.stderr)
        return 1
    except SevhookError as exc:
        log.total("failed")
        print(f"sevhook: {name}: {operation}: {exc.message}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001  fail closed with one line, never a traceback
        log.total("failed")
        print(f"sevhook: {name}: {operation}: internal error ({exc.__class__.__name__}: {exc}); "
              "the guest was not attested", file=sys.stderr)
        return 1
    log.total("ok")
    return 0


def _quiet_library_logging() -> None:
    """Libraries' warnings (qemu.qmp's, the broker client's) would add lines to the one stderr line
    libvirt shows; the step log already records what happened."""
    import logging

    logging.getLogger().addHandler(logging.NullHandler())


def _load(name: str, domain_xml: bytes, *, decode_certificates: bool) -> DomainDocument:
    """The domain XML, read with sevhook's validator. Decoding <dhCert>'s certificate costs the
    import of cryptography: `prepare` does it, before QEMU starts; later operations check the same
    document without it (at `started` the firmware has accepted the certificate already)."""
    from sevhook.xml import load_domain  # the hook's hot path: managed guests only

    try:
        return load_domain(domain_xml, filename=f"domain XML of {name} (hook stdin)",
                           decode_certificates=decode_certificates)
    except SevhookError as exc:
        raise HookFailure("load", exc.message) from exc


def _managed(document: DomainDocument) -> tuple[ManagedGuest | None, list[str]]:
    """The managed guest (None if sevhook has nothing to do) and the XML's validation errors."""
    errors = [str(problem) for problem in document.errors]
    guest = plan.managed_guest(document.domain)
    if guest is None and errors:  # it names sevhook's namespace but its metadata could not be read
        raise HookFailure("load", "\n".join(errors))
    return guest, errors


def _perform(action: Action, guest: ManagedGuest, errors: list[str], log: StepLog) -> None:
    if action is Action.ATTEST:
        from sevhook.status import recording  # the verdict `sevhook status` shows

        with recording(guest.name, "hook", guest.attestation.launch_id):
            if errors:  # `prepare` refused this document already; whatever happened since, never attest it
                with log.steps.step("validate"):
                    raise HookFailure("validate", "\n".join(errors))
            _attest(guest, log)
        return
    from sevhook.hook import runtime  # the runtime files of the other operations

    if action is Action.VALIDATE:
        with log.steps.step("validate"):
            problems = errors + plan.readiness_problems(guest)
            if problems:
                raise HookFailure("validate", "\n".join(problems))
    elif action is Action.PREPARE_RUNTIME:
        with log.steps.step("runtime-dir"):
            runtime.prepare_monitor_directory(guest.socket)
    elif action is Action.CLEAN_UP:
        with log.steps.step("clean-up"):
            runtime.remove_socket(guest.socket, "clean-up")
    elif action is Action.REFUSE_START_MODE:
        runtime.remove_stale_start_marker(guest.name, "metadata")
        raise plan.start_mode_refusal(guest.name)
    elif action is Action.REMOVE_STALE_MARKER:
        with log.steps.step("clean-up"):
            runtime.remove_stale_start_marker(guest.name, "clean-up")
    elif action is Action.REFUSE_MOVE:
        raise HookFailure(log.operation, "an attested SEV guest cannot be migrated or restored: its encryption "
                          "key and injected secrets stay in this host's secure processor; shut it down and start "
                          "it again (attested) instead")


def _attest(guest: ManagedGuest, log: StepLog) -> None:
    """The attested launch (sevhook.launch) over the guest's private QMP monitor. A failure leaves
    the vCPUs stopped; the hook's exit status 1 makes libvirt destroy the guest."""
    from sevhook.launch.qmp_port import MonitorPort  # the hook's hot path: `started` only
    from sevhook.launch.sequence import AttestedLaunch
    from sevhook.monitor.errors import MonitorError
    from sevhook.monitor.qmp import QmpMonitor

    _quiet_library_logging()
    request = plan.launch_request(guest)
    deadline = Deadline(request.timeout)
    with log.steps.step("monitor"):
        try:
            monitor = QmpMonitor(guest.socket, timeout=deadline.remaining("monitor"))
        except MonitorError as exc:
            raise HookFailure("monitor", exc.message + _monitor_hint(guest.socket)) from exc
    try:
        AttestedLaunch(request, MonitorPort(monitor), log.steps, deadline).run()
    finally:
        monitor.close()


def _monitor_hint(socket: Path) -> str:
    if socket.exists():
        return ""
    return (f"; QEMU did not create the private monitor: the domain XML must pass `-qmp "
            f"{plan.private_monitor_arg(str(socket))}` in <qemu:commandline> (`sevhook prepare-domain` adds it)")
