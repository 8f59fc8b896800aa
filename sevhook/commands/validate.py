"""`sevhook validate`: check domain XML files the way sevhook will read them before a launch."""

from __future__ import annotations

import argparse
import json
import sys

EPILOG = """examples:
  sevhook validate guest.xml
  virsh dumpxml guest | sevhook validate -
  sevhook validate --strict --require-sev /etc/libvirt/qemu/*.xml
  sevhook validate --json guest.xml

output: FILE:LINE: error: MESSAGE / FILE:LINE: warning: MESSAGE for each problem, FILE: valid otherwise.
exit status: 0 every file is valid, 1 any error (or any warning with --strict),
2 usage or I/O error (e.g. a missing file).
See docs/validation.md for every rule."""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "validate",
        help="validate domain XML: <launchSecurity>, sevhook metadata and SEV rules",
        description="Validate libvirt domain XML files: <launchSecurity> and the sevhook attestation metadata "
        "against sevhook's schemas, then the rules libvirt, QEMU and the SEV firmware apply (policy bits, "
        "blob lengths, the guest owner's certificate) and warnings for launches that are unsafe or will not attest.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="domain XML file, or - for standard input")
    parser.add_argument("--strict", action="store_true", help="treat warnings as errors (exit 1)")
    parser.add_argument("--json", action="store_true", help="print a JSON array of {file, valid, problems}")
    parser.add_argument("--require-sev", action="store_true", help="a domain without <launchSecurity> is an error")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sevhook.console import debug_requested, report_error
    from sevhook.errors import UsageError
    from sevhook.xml import validate_file
    from sevhook.xml.parsing import MAX_DOCUMENT_BYTES
    from sevhook.xml.problems import ERROR, Problem

    results: list[dict[str, object]] = []
    worst = 0
    lines: list[str] = []
    for name in args.files:
        try:
            if name == "-":
                data = sys.stdin.buffer.read(MAX_DOCUMENT_BYTES + 1)
                problems = validate_file(data, require_sev=args.require_sev)
                problems = [Problem(p.level, "-", p.line, p.message) for p in problems]
            else:
                problems = validate_file(name, require_sev=args.require_sev)
        except UsageError as exc:
            report_error(exc, debug_requested(args))
            results.append(
                {"file": name, "valid": False, "problems": [{"level": ERROR, "line": None, "message": exc.message}]}
            )
            worst = 2
            continue
        failing = [p for p in problems if args.strict or p.level == ERROR]
        if failing:
            worst = max(worst, 1)
        results.append({"file": name, "valid": not failing, "problems": [p.to_json() for p in problems]})
        lines.extend(str(p) for p in problems)
        if not problems:
            lines.append(f"{name}: valid")
    if args.json:
        print(json.dumps(results, indent=2))
    elif lines:
        print("\n".join(lines))
    return worst
