"""`sevhook start DOMAIN`: start a defined SEV domain attested, through libvirt's own APIs."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sevhook.commands.arguments import config_defaults
from sevhook.console import Console
from sevhook.flow.report import StepPrinter, format_seconds
from sevhook.launch.steps import StepFailed, Steps

EPILOG = """examples:
  sevhook start web1
  sevhook start web1 -c qemu+ssh://root@host1/system
  sevhook start web1 --platform /etc/sevhook/full_chain.bin     chain from `sevctl export --full`
  sevhook start web1 --json | jq .ok

The domain needs <launchSecurity type='sev'> with its <policy> and a <sevhook:attestation> element in
its <metadata> naming the key broker and the guest (docs/quickstart.md). Steps: connect, metadata,
platform, session, define, start (paused), measure, attest, inject, resume; after the domain was
started, any failure destroys it. The metadata must not declare <sevhook:monitor>: such domains are the
libvirt hook's (hook mode, `virsh start --paused`) and are refused. Both modes work on one host: while
libvirt starts the domain, sevhook start holds /run/sevhook/DOMAIN.start, and an installed hook lets that
start through and refuses any other start of a domain without <sevhook:monitor>. Run sevhook start as
root on the host itself when the hook is installed there (over a remote URI the marker cannot be set).

output: one line per step with its time (coloured on a terminal). --json prints nothing until the end,
then one JSON object on stdout: {"domain", "ok", "launch_id", "failed_step", "error", "total_seconds",
"steps": [{"name", "status": "ok"|"failed"|"info", "seconds", "detail"}]}.
exit status: 0 the guest was attested and started; 1 any step failed (the reason names the step);
2 usage error."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "start", help="start a defined SEV domain attested, through libvirt's own APIs",
        description="Ask the domain's key broker for a fresh launch session, start the domain paused, read its "
                    "launch measurement through libvirt, let the broker judge it, inject the secret it releases "
                    "and resume. No private QEMU monitor and no custom QEMU arguments are needed.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("domain", metavar="DOMAIN", help="name of a defined (persistent), shut-off domain")
    parser.add_argument("-c", "--connect", metavar="URI", default=None,
                        help="libvirt URI (default: $LIBVIRT_DEFAULT_URI or libvirt's default)")
    parser.add_argument("--platform-export", "--platform", dest="platform", type=Path, metavar="FILE",
                        help="take the host's PDH and certificate chain from this export (a directory of "
                             "sevctl-named certificates or one PDH|PEK|OCA|CEK[|ASK|ARK] file) instead of "
                             "the host's platform cache (/var/lib/sevhook/platform, `sevhook platform export`) "
                             "or libvirt's getSEVInfo")
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end (see below)")
    parser.set_defaults(func=run)
    config_defaults(parser, platform="host.platform-export")


def run(args: argparse.Namespace) -> int:
    logging.getLogger().addHandler(logging.NullHandler())  # library retry warnings: the step line says it all
    console = None if args.json else Console()
    steps = Steps(StepPrinter(console) if console else None)
    if console:
        console.line(f"sevhook start {args.domain}" + (f" on {args.connect}" if args.connect else ""), "step")
    outcome: dict[str, Any] = {"domain": args.domain, "ok": False, "launch_id": None, "failed_step": None,
                               "error": None}
    sequence = None
    try:
        sequence = _sequence(args, steps)
        started = sequence.run()
    except StepFailed as failure:
        outcome.update(failed_step=failure.step, error=failure.reason)
    except Exception as exc:  # noqa: BLE001  fail closed with one line, never a traceback
        reason = f"internal error ({exc.__class__.__name__}: {exc}); the guest was not attested"
        outcome.update(failed_step=steps.current or "connect", error=reason)
    else:
        outcome.update(ok=True, launch_id=started.launch_id)
    finally:
        if sequence is not None:
            sequence.domain.connection.close()
    if sequence is not None:  # the domain was found: this was an attestation, whatever its verdict
        from sevhook.status import record_verdict

        record_verdict(args.domain, mode="start", ok=outcome["ok"], step=outcome["failed_step"],
                       reason=outcome["error"], launch_id=outcome["launch_id"])
    outcome["total_seconds"] = round(steps.elapsed, 4)
    outcome["steps"] = [result.to_json() for result in steps.results]
    if args.json:
        print(json.dumps(outcome, indent=2))
    if not outcome["ok"]:
        tail = "; the guest was destroyed" if sequence is not None and sequence.destroyed else ""
        print(f"sevhook: error: start {args.domain}: {outcome['failed_step']}: {outcome['error']}{tail}",
              file=sys.stderr)
        return 1
    if console:
        state = "running" if started.resumed else "paused (resume='no')"
        console.line(f"{args.domain}: attested, secret injected, {state} (total {format_seconds(steps.elapsed)})",
                     "ok")
    return 0


def _sequence(args: argparse.Namespace, steps: Any) -> Any:
    """The StartSequence for the domain on its connection (closed by the caller)."""
    from sevhook.flow.libvirt_domain import LibvirtDomain, exported_platform, host_platform
    from sevhook.flow.start import StartSequence
    from sevhook.virt import open_connection

    with steps.step("connect") as note:
        connection = open_connection(args.connect)
        try:
            domain = LibvirtDomain(connection, args.domain)
        except BaseException:
            connection.close()
            raise
        note.detail = f"libvirt {connection.getURI()}"
    from sevhook.sev.platform_export import CHAIN_FILE, DEFAULT_PLATFORM_DIR

    cached = is_local(connection.getURI()) and (DEFAULT_PLATFORM_DIR / CHAIN_FILE).is_file()  # this host's cache
    source = args.platform or (DEFAULT_PLATFORM_DIR if cached else None)
    platform = exported_platform(source) if source else host_platform(connection)
    if is_local(connection.getURI()):
        return StartSequence(domain, platform, steps)
    return StartSequence(domain, platform, steps, claim=lambda _name: nullcontext())


def is_local(uri: str) -> bool:
    """Whether libvirtd (and so its hook) runs on this machine: a URI without a host part. The start
    marker is a local file; set for a remote libvirtd it could only let a local start of a domain of
    the same name through unattested, so it is not set (a hook on the remote host then refuses)."""
    return not urlsplit(uri).netloc
