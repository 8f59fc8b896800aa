"""`sevhook doctor`: is this host ready for attested SEV guests, and what to fix if not."""

from __future__ import annotations

import argparse
import json
import textwrap
from dataclasses import asdict
from pathlib import Path

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at every command start
if TYPE_CHECKING:
    from sevhook.doctor import Check

EPILOG = """examples:
  sevhook doctor
  sevhook doctor -c qemu:///system --json
  sevhook doctor --emulator /usr/local/bin/sevhook-qemu-sim     the software platform's stand-in (a wrapper)
exit status: 0 when every check passes (warnings allowed), 1 when any check fails.

With --emulator, doctor starts that QEMU binary as libvirt probes it and asks query-sev-capabilities,
and reads libvirt's domain capabilities for it; when it provides SEV (the software platform), the
missing SEV hardware is a warning, not a failure."""

WIDTH = 100


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "doctor", help="check this host for SEV readiness and say what to fix",
        description="Check CPU flags, kvm_amd, /dev/sev, libvirt and QEMU versions, libvirt's SEV "
                    "capability, OVMF firmware descriptors and the sevhook hook.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--connect", metavar="URI", default="qemu:///system", help="libvirt URI")
    parser.add_argument("--hooks-dir", type=Path, default=Path("/etc/libvirt/hooks"), help="libvirt hooks directory")
    parser.add_argument("--daemon-pidfile", type=Path, action="append",
                        help="pidfile of the running libvirt daemon (default /run/libvirtd.pid, /run/virtqemud.pid)")
    parser.add_argument("--emulator", type=Path, metavar="PATH",
                        help="the QEMU binary SEV domains use in <emulator> (the stand-in, a wrapper): probe it "
                             "over QMP (query-sev-capabilities) and check libvirt's capabilities for it")
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    parser.set_defaults(func=run)


def render(checks: list[Check], width: int = WIDTH) -> list[tuple[str, str | None]]:
    """One line per check (status, name, what was found), the fix indented below, none wider than
    `width`; each line with the status that colours it."""
    lines: list[tuple[str, str | None]] = []
    for check in checks:
        found = textwrap.wrap(f"{check.status:<4}  {check.name}: {check.found}", width, subsequent_indent=" " * 6,
                              break_on_hyphens=False)
        lines += [(line, check.status) for line in found]
        if check.fix and check.status != "ok":
            lines += [(line, None) for line in textwrap.wrap(f"fix: {check.fix}", width, initial_indent=" " * 6,
                                                              subsequent_indent=" " * 11, break_on_hyphens=False)]
    return lines


def run(args: argparse.Namespace) -> int:
    from sevhook import doctor
    from sevhook.console import Console

    pidfiles = args.daemon_pidfile or doctor.DEFAULT_DAEMON_PIDFILES
    emulator = args.emulator.absolute() if args.emulator else None
    checks = doctor.run_checks(doctor.gather_facts(args.connect, args.hooks_dir, pidfiles, emulator))
    failed = any(c.status == "fail" for c in checks)
    if args.json:
        print(json.dumps({"ready": not failed, "checks": [asdict(c) for c in checks]}, indent=2))
        return 1 if failed else 0
    console = Console()
    for line, status in render(checks):
        console.line(line, status)
    console.line("host is ready for SEV guests" if not failed else "host is NOT ready for SEV guests",
                 "fail" if failed else "ok")
    return 1 if failed else 0
