"""`sevhook doctor`: is this host ready for attested SEV guests, and what to fix if not."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

EPILOG = """examples:
  sevhook doctor
  sevhook doctor -c qemu:///system --json
exit status: 0 when every check passes (warnings allowed), 1 when any check fails."""


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
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sevhook import doctor  # noqa: PLC0415
    from sevhook.console import Console  # noqa: PLC0415

    pidfiles = args.daemon_pidfile or doctor.DEFAULT_DAEMON_PIDFILES
    checks = doctor.run_checks(doctor.gather_facts(args.connect, args.hooks_dir, pidfiles))
    failed = any(c.status == "fail" for c in checks)
    if args.json:
        print(json.dumps({"ready": not failed, "checks": [asdict(c) for c in checks]}, indent=2))
        return 1 if failed else 0
    console = Console()
    console.table(["check", "status", "found", "what to do"],
                  [[c.name, c.status, c.found, c.fix] for c in checks], [c.status for c in checks])
    console.line("host is ready for SEV guests" if not failed else "host is NOT ready for SEV guests",
                 "fail" if failed else "ok")
    return 1 if failed else 0
