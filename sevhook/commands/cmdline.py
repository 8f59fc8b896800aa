"""`sevhook cmdline`: the QEMU arguments libvirt derives from <launchSecurity>, and the reverse check."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sevhook.qemu_cmdline.domain_input import CmdlineInput
    from sevhook.qemu_cmdline.platform import PlatformSource
    from sevhook.qemu_cmdline.translate import CmdlineOptions

MAX_ARGS_FILE_BYTES = 1 << 20  # a QEMU command line is a few KiB
EPILOG = """examples:
  sevhook cmdline guest.xml
      -machine / confidential-guest-support=lsec0 / -object / {"qom-type":"sev-guest",...}, one per line
  virsh dumpxml guest | sevhook cmdline - --domcaps domcaps.xml
  sevhook cmdline guest.xml --qemu-version 5.2             keyval -object, memory-encryption=lsec0
  sevhook cmdline guest.xml --libvirt4-compat              what libvirt 4.x passed (sev0, policy=0x..)
  sevhook cmdline guest.xml --cbitpos 51 --reduced-phys-bits 1 --lib-dir /var/lib/sevhook/guest --write-files
  sevhook cmdline guest.xml --passthrough                  the same as a <qemu:commandline> block
  sevhook cmdline --check guest.xml -- /usr/bin/qemu-system-x86_64 -machine q35,... -object ...
  sevhook cmdline --check guest.xml --args-file /var/log/libvirt/qemu/guest.log

host values: cbitpos and reducedPhysBits missing from the XML come from --domcaps FILE (saved
`virsh domcapabilities`), --cbitpos/--reduced-phys-bits, --qmp SOCKET (query-sev-capabilities)
or -c URI (libvirt getSEVInfo); give one.
exit status: 0 done (--check: the argv carries exactly the domain's launch security);
1 the domain cannot be translated, host values are missing, or --check found differences;
2 usage or I/O error. See docs/cmdline.md."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cmdline",
        help="print the QEMU arguments for a domain's <launchSecurity>, or check an argv against it",
        description="Translate a domain's <launchSecurity> into the -machine property and -object argument\n"
        "libvirt passes to QEMU, byte for byte; or, with --check, read a QEMU argv back and compare it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # One positional list: argparse (3.11) cannot give a second positional list after options
    # (`--check X.xml --qmp S -- ARGV`), so the domain to check is --check's own value.
    parser.add_argument("items", nargs="*", metavar="DOMAIN.xml | QEMU ARGV",
                        help="the domain XML file (- for standard input); with --check: the QEMU argv, after --")
    parser.add_argument("--check", metavar="DOMAIN.xml",
                        help="compare a QEMU argv (after --, or --args-file) with this domain")
    parser.add_argument("--args-file", type=Path, metavar="FILE",
                        help="with --check: read the argv from a libvirt .args/log text or /proc/PID/cmdline")
    parser.add_argument("--qemu-version", metavar="X.Y",
                        help="QEMU to emit for (default: the newest forms; 'auto': ask the domain's <emulator>)")
    parser.add_argument("--syntax", choices=("json", "keyval"),
                        help="-object syntax (default: libvirt's choice for the QEMU version)")
    parser.add_argument("--libvirt4-compat", action="store_true",
                        help="reproduce libvirt 4.x: id sev0, memory-encryption, keyval, hex policy")
    parser.add_argument("--lib-dir", type=Path, metavar="DIR",
                        help="directory of dh_cert.base64/session.base64 (default "
                             "/var/lib/libvirt/qemu/domain-<id>-<name>)")
    parser.add_argument("--domain-id", type=int, metavar="N",
                        help="the running domain's id (`virsh domid NAME`) for the default lib dir (default: the "
                             "XML's id, else -1 as for an inactive domain)")
    parser.add_argument("--write-files", action="store_true",
                        help="write dhCert and session into the lib dir (0600, atomically)")
    host = parser.add_argument_group("host values for missing cbitpos/reducedPhysBits (give one source)")
    host.add_argument("--domcaps", type=Path, metavar="FILE", help="saved `virsh domcapabilities` XML")
    host.add_argument("--cbitpos", metavar="N", help="the host's C-bit position (with --reduced-phys-bits)")
    host.add_argument("--reduced-phys-bits", metavar="N",
                      help="the host's physical address bit reduction (with --cbitpos)")
    host.add_argument("--qmp", metavar="SOCKET", help="QMP socket of a QEMU on this host: query-sev-capabilities")
    host.add_argument("-c", "--connect", metavar="URI", help="libvirt URI: getSEVInfo (virsh nodesevinfo)")
    parser.add_argument("--passthrough", action="store_true", help="print a <qemu:commandline> block instead of lines")
    parser.add_argument("--json", action="store_true", help="print JSON (argv and files, or the check result)")
    parser.add_argument("--strict", action="store_true",
                        help="refuse problems libvirt lets through; --check: unreadable files are differences")
    parser.set_defaults(func=run)


def _platform_source(args: argparse.Namespace) -> PlatformSource | None:
    from sevhook.errors import UsageError
    from sevhook.qemu_cmdline import platform
    from sevhook.sev.policy import parse_number

    explicit = (args.cbitpos, args.reduced_phys_bits)
    if (explicit[0] is None) != (explicit[1] is None):
        raise UsageError("give --cbitpos and --reduced-phys-bits together")
    sources: list[PlatformSource] = []
    if explicit[0] is not None:
        values = [parse_number(text, name)
                  for text, name in zip(explicit, ("--cbitpos", "--reduced-phys-bits"), strict=True)]
        if any(value < 0 or value > 0xFFFF_FFFF for value in values):
            raise UsageError("--cbitpos and --reduced-phys-bits must be unsigned 32-bit numbers")
        sources.append(platform.ExplicitValues(values[0], values[1]))
    if args.domcaps is not None:
        sources.append(platform.DomainCapabilitiesFile(args.domcaps))
    if args.qmp is not None:
        sources.append(platform.QmpSocket(args.qmp))
    if args.connect is not None:
        sources.append(platform.LibvirtConnection(args.connect))
    if len(sources) > 1:
        raise UsageError("give one source of host values: --domcaps, --cbitpos/--reduced-phys-bits, --qmp or -c")
    if args.domcaps is not None:
        # read and check the file even when the XML needs none of its values: a missing or garbage
        # file is a mistake to report (exit 2 unreadable, 1 not SEV domain capabilities), not to skip
        sources[0].load()
    return sources[0] if sources else None


def _load(args: argparse.Namespace) -> CmdlineInput:
    from sevhook.qemu_cmdline.domain_input import load_for_cmdline
    from sevhook.xml.parsing import MAX_DOCUMENT_BYTES

    source: bytes | str = sys.stdin.buffer.read(MAX_DOCUMENT_BYTES + 1) if args.domain == "-" else args.domain
    loaded = load_for_cmdline(source, "-" if args.domain == "-" else None, strict=args.strict)
    for problem in loaded.warnings:
        suffix = " (libvirt lets this through; --strict refuses it)" if problem.level == "error" else ""
        print(f"{problem.file}:{problem.line}: warning: {problem.message}{suffix}", file=sys.stderr)
    return loaded


def _lib_dir(args: argparse.Namespace, loaded: CmdlineInput) -> Path | str | None:
    """--lib-dir, or libvirt's per-domain directory for --domain-id; None: the XML's id (or -1)."""
    from sevhook.errors import UsageError
    from sevhook.qemu_cmdline.libdir import INACTIVE_DOMAIN_ID, default_lib_dir

    if args.domain_id is None:
        return args.lib_dir
    if args.lib_dir is not None:
        raise UsageError("give --lib-dir DIR or --domain-id N, not both (--domain-id only names libvirt's directory)")
    if args.domain_id < 1 and args.domain_id != INACTIVE_DOMAIN_ID:
        raise UsageError(f"--domain-id {args.domain_id}: a running domain's id is 1 or more (`virsh domid NAME`); "
                         f"{INACTIVE_DOMAIN_ID} names an inactive domain")
    return default_lib_dir(dataclasses.replace(loaded.domain, id=args.domain_id))


def _options(args: argparse.Namespace, loaded: CmdlineInput) -> CmdlineOptions:
    from sevhook.qemu_cmdline.qemu_version import QemuVersion
    from sevhook.qemu_cmdline.translate import CmdlineOptions

    version = None
    if args.qemu_version == "auto":
        version = QemuVersion.of_binary(loaded.domain.emulator or "/usr/bin/qemu-system-x86_64")
    elif args.qemu_version:
        version = QemuVersion.parse(args.qemu_version)
    return CmdlineOptions(version, args.syntax, args.libvirt4_compat, _lib_dir(args, loaded))


def run(args: argparse.Namespace) -> int:
    from sevhook.errors import UsageError

    if args.check:
        args.domain, args.qemu_argv = args.check, args.items
        return _run_check(args)
    if args.args_file:
        raise UsageError("--args-file is only read with --check DOMAIN.xml")
    if len(args.items) != 1:
        raise UsageError(
            "give one DOMAIN.xml" if not args.items
            else f"give one DOMAIN.xml, not {len(args.items)} arguments "
                 "(a QEMU argv is only read with --check DOMAIN.xml -- ARGV)"
        )
    args.domain = args.items[0]
    return _run_translate(args)


def _run_translate(args: argparse.Namespace) -> int:
    from sevhook.errors import UsageError
    from sevhook.qemu_cmdline import libdir, passthrough
    from sevhook.qemu_cmdline.platform import fill_platform
    from sevhook.qemu_cmdline.translate import translate

    source = _platform_source(args)
    loaded = _load(args)
    model, info = fill_platform(loaded.launch_security, source)
    if info is not None:
        print(f"note: cbitpos {info.cbitpos}, reducedPhysBits {info.reduced_phys_bits} from {info.source}",
              file=sys.stderr)
    options = _options(args, loaded)
    translation = translate(loaded.domain, options, model)
    if translation.files and options.lib_dir is None and loaded.domain.id is None:
        print(f"note: lib dir {translation.lib_dir}: -1 is the id libvirt's tests use for an inactive domain; a "
              "running domain gets its real id at each start (`virsh domid NAME`): pass --domain-id N for it",
              file=sys.stderr)
    if args.write_files:
        for path in libdir.write_files(translation.files):
            print(f"note: wrote {path} (mode 0600)", file=sys.stderr)
    elif translation.files:
        print(f"note: QEMU will read {', '.join(translation.files)}: libvirt writes them at start (--write-files "
              "writes them now)", file=sys.stderr)
    if args.passthrough and translation.files and args.lib_dir is None:
        print(
            "warning: libvirt recreates domain-<id>-<name> with each start's id and writes no files for passthrough "
            "arguments: use --lib-dir DIR --write-files with a directory the QEMU user can read",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps({"argv": translation.argv, "files": list(translation.files)}, ensure_ascii=False))
    elif args.passthrough:
        sys.stdout.write(passthrough.commandline_xml(translation.argv))
    else:
        if any("\n" in element for element in translation.argv):
            raise UsageError("an argument contains a newline and cannot be printed one per line: use --json")
        print("\n".join(translation.argv))
    return 0


def _run_check(args: argparse.Namespace) -> int:
    from sevhook.errors import UsageError
    from sevhook.files import read_input_file
    from sevhook.qemu_cmdline.argv import DiskFiles, argv_from_text, read_launch_security
    from sevhook.qemu_cmdline.check import compare, fill_from_argv
    from sevhook.qemu_cmdline.platform import fill_platform, needs_platform
    from sevhook.qemu_cmdline.translate import translate

    if bool(args.qemu_argv) == bool(args.args_file):
        raise UsageError("--check needs the QEMU argv after -- or --args-file FILE (one of them)")
    if args.passthrough or args.write_files:
        raise UsageError("--passthrough and --write-files do not apply to --check")
    argv = args.qemu_argv
    if args.args_file:
        argv = argv_from_text(read_input_file(args.args_file, MAX_ARGS_FILE_BYTES, "--args-file")
                              .decode("utf-8", errors="replace"))
    source = _platform_source(args)
    loaded = _load(args)
    found = read_launch_security(argv, DiskFiles())
    model = loaded.launch_security
    notes: list[str] = []
    if needs_platform(model) and source is None:
        model, notes = fill_from_argv(model, found)
    model, _ = fill_platform(model, source)
    options = _options(args, loaded)
    result = compare(translate(loaded.domain, options, model), found, DiskFiles(), args.strict)
    notes += result.notes
    if args.json:
        print(json.dumps({"ok": result.ok, "differences": list(result.differences), "notes": notes},
                         ensure_ascii=False))
    else:
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        for difference in result.differences:
            print(f"difference: {difference}")
        if result.ok:
            print(f"{args.domain}: the command line carries exactly this domain's launch security")
    return 0 if result.ok else 1
