"""`sevhook platform export`: this host's SEV platform as its firmware exports it (PDH, PEK|OCA|CEK with
the CEK unsigned, chip id), from libvirt's getSEVInfo, an emulator binary probed over QMP as libvirt
probes it, or a running QEMU's monitor; with --full also the chain with AMD's signed CEK, like
`sevctl export --full`. The default output directory is the host's platform cache."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

EPILOG = """examples:
  sevhook platform export                                   libvirt's getSEVInfo -> /var/lib/sevhook/platform
  sevhook platform export --full --ca ask_ark_milan.cert    also full_chain.bin with AMD's signed CEK
  sevhook platform export --emulator /usr/bin/qemu-system-x86_64 --out-dir /tmp/platform
  sevhook platform export --qmp /run/vm1.qmp --out-dir /tmp/platform
files: pdh.cert, cert_chain.cert (PEK|OCA|CEK, CEK unsigned as the firmware exports it), chip_id.hex,
and with --full full_chain.bin (PDH|PEK|OCA|CEK|ASK|ARK with the KDS's ASK-signed CEK)."""

PROBE_TIMEOUT = 30.0


def _capabilities_from_libvirt(uri: str | None) -> Any:
    from sevhook.monitor.libvirt_monitor import host_capabilities
    from sevhook.virt import open_connection

    connection = open_connection(uri)  # virNodeGetSEVInfo is refused on a read-only connection
    try:
        return host_capabilities(connection)
    finally:
        connection.close()


def _capabilities_from_monitor(socket_path: str, timeout: float = PROBE_TIMEOUT) -> Any:
    from sevhook.monitor.qmp import QmpMonitor

    with QmpMonitor(socket_path, timeout) as monitor:
        return monitor.capabilities()


def _capabilities_from_emulator(emulator: str) -> Any:
    """The emulator binary's platform, asked as libvirt's capability probe asks it."""
    from sevhook.errors import SevhookError
    from sevhook.monitor.probe import probe_capabilities

    try:
        return probe_capabilities(Path(emulator))
    except SevhookError as exc:
        raise SevhookError(f"--emulator {emulator}: {exc.message}") from exc


def _signed_cek(chip_id_hex: str, kds_url: str) -> bytes:
    from sevhook.broker.kds import CekRefusal, KdsClient
    from sevhook.errors import SevhookError

    try:
        return KdsClient(kds_url).fetch(chip_id_hex)
    except CekRefusal as exc:
        raise SevhookError(f"--full: {exc.message}") from exc


def cmd_export(args: argparse.Namespace) -> int:
    from sevhook.commands.arguments import read_input
    from sevhook.errors import UsageError
    from sevhook.sev.platform_export import DEFAULT_PLATFORM_DIR, PlatformExport

    if args.full and not args.ca:
        raise UsageError("--full needs --ca FILE: AMD's ASK|ARK bundle for this CPU generation "
                         "(ask_ark_<generation>.cert), to complete PDH|PEK|OCA|CEK|ASK|ARK")
    if args.ca and not args.full:
        raise UsageError("--ca is only used with --full")
    if args.emulator:
        capabilities = _capabilities_from_emulator(args.emulator)
    elif args.qmp:
        capabilities = _capabilities_from_monitor(args.qmp)
    else:
        capabilities = _capabilities_from_libvirt(args.connect)
    export = PlatformExport.from_qmp({"pdh": capabilities.pdh_b64, "cert-chain": capabilities.cert_chain_b64,
                                      "cpu0-id": capabilities.cpu0_id_b64})
    if args.full:
        if export.chip_id_hex is None:
            raise UsageError("--full: the platform reported no chip id (cpu0-id; QEMU >= 8.0 reports it), so the "
                             "signed CEK cannot be looked up; download it from AMD's KDS by hand")
        export = export.with_signed_cek(_signed_cek(export.chip_id_hex, args.kds_url),
                                        read_input(args.ca, "--ca"))
    out_dir = Path(args.out_dir) if args.out_dir else DEFAULT_PLATFORM_DIR
    for path in export.write(out_dir):
        print(path)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    platform = subparsers.add_parser(
        "platform", help="this host's SEV platform: export its certificates and chip id",
        description="What the host's SEV firmware exports, in the files `sevctl export` writes.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = platform.add_subparsers(dest="platform_command", metavar="COMMAND")
    platform.set_defaults(func=lambda _args: (platform.print_help(sys.stderr), 2)[1])
    export = sub.add_parser(
        "export", help="write pdh.cert, cert_chain.cert, chip_id.hex [and full_chain.bin]",
        description="Export the platform's PDH, PEK|OCA|CEK (the CEK unsigned, as firmware exports it) and chip "
                    "id; with --full also PDH|PEK|OCA|CEK|ASK|ARK with the ASK-signed CEK from AMD's KDS. The "
                    "default directory, /var/lib/sevhook/platform, is the platform cache that prepare-domain "
                    "reads when given no other source.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = export.add_mutually_exclusive_group()
    source.add_argument("-c", "--connect", metavar="URI", help="libvirt URI for getSEVInfo (default: libvirt's)")
    source.add_argument("--emulator", metavar="PATH",
                        help="probe this QEMU binary over QMP (query-sev-capabilities) as libvirt does")
    source.add_argument("--qmp", metavar="SOCKET", help="ask a running QEMU's QMP monitor socket")
    export.add_argument("--out-dir", metavar="DIR", help="default /var/lib/sevhook/platform (created 0700)")
    export.add_argument("--full", action="store_true",
                        help="also fetch the signed CEK by chip id and write full_chain.bin (needs --ca)")
    export.add_argument("--kds-url", metavar="URL", default="https://kdsintf.amd.com",
                        help="AMD's Key Distribution Service (default https://kdsintf.amd.com)")
    export.add_argument("--ca", type=Path, metavar="FILE",
                        help="with --full: AMD's ask_ark_<generation>.cert (ASK|ARK) for the full chain")
    export.set_defaults(func=cmd_export)
