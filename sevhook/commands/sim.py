"""`sevhook sim ...`: create, export and inspect the software SEV platform, and show what its guests
received (so a test or a demo can prove a secret arrived intact)."""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from pathlib import Path

from sevhook.commands.arguments import number_type
from sevhook.encoding import decode_base64
from sevhook.files import write_private_file

PLATFORM_EPILOG = """examples:
  sevhook sim platform init --state-dir /tmp/sim --api-major 1 --api-minor 55 --build-id 21
  sevhook sim platform status --state-dir /tmp/sim
  sevhook sim platform export --state-dir /tmp/sim --out-dir /tmp/sim-export
  sevhook sim platform export --format full --out full_chain.bin
  sevhook owner verify-chain full_chain.bin --trust-anchor /tmp/sim-export/ark.cert"""

SECRETS_EPILOG = """examples:
  sevhook sim secrets --state-dir /tmp/sim
  sevhook sim secrets --domain web1 --json
  sevhook sim secrets --domain web1 --show-values"""

EXPORT_FILES = {"full": "full_chain.bin", "pdh": "pdh.cert", "chain": "cert_chain.cert", "chip-id": "chip_id.hex",
                "ca": "ask_ark.cert", "ark": "ark.cert"}

KDS_EPILOG = """examples:
  sevhook sim kds serve --state-dir /tmp/sim --listen 127.0.0.1:8099
  curl -o cek.cert http://127.0.0.1:8099/cek/id/$(cat /tmp/sim-export/chip_id.hex)
  sevhook broker serve --kds-url http://127.0.0.1:8099 ..."""


def _state_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", metavar="DIR", default=None,
                        help="platform state directory (default $SEVHOOK_SIM_DIR, else /var/lib/sevhook/sim)")


def _state(args: argparse.Namespace):  # noqa: ANN202
    from sevhook.sim.state import StateDir

    return StateDir(args.state_dir)


def _loaded_platform(args: argparse.Namespace):  # noqa: ANN202
    from sevhook.errors import SevhookError
    from sevhook.sim.platform import SoftwarePlatform, is_initialised

    state = _state(args)
    if not is_initialised(state):
        raise SevhookError(f"no simulated platform in {state.path}: run `sevhook sim platform init "
                           f"--state-dir {state.path}` first")
    state.ensure()
    return SoftwarePlatform(state)


def cmd_init(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from sevhook.sim.platform import PlatformConfig, SoftwarePlatform, init_platform, is_initialised

    state = _state(args)
    changes = {key: value for key, value in (
        ("api_major", args.api_major), ("api_minor", args.api_minor), ("build_id", args.build_id),
        ("es", args.es), ("cbitpos", args.cbitpos), ("reduced_phys_bits", args.reduced_phys_bits),
    ) if value is not None}
    state.ensure()
    base = SoftwarePlatform(state).config if is_initialised(state) and not args.force else PlatformConfig()
    config = replace(base, **changes) if changes or args.force or not is_initialised(state) else None
    platform, created = init_platform(state, config, force=args.force, rsa_bits=args.rsa_bits)
    verb = "created" if created else ("updated" if config is not None else "already initialised, unchanged")
    print(f"simulated SEV platform in {state.path}: {verb}")
    _print_status(platform)
    return 0


def _status_dict(platform) -> dict:  # noqa: ANN001
    from sevhook.sev.certs import AmdCertificate

    status = platform.platform_status()
    ark = AmdCertificate.parse(platform.cert("ark"))
    ask = AmdCertificate.parse(platform.cert("ask"))
    config = platform.config
    return {
        "state_dir": str(platform.state.path),
        "api_major": config.api_major, "api_minor": config.api_minor, "build_id": config.build_id,
        "es": config.es, "cbitpos": config.cbitpos, "reduced_phys_bits": config.reduced_phys_bits,
        "platform_state": {0: "UNINIT", 1: "INIT", 2: "WORKING"}[status.state],
        "guest_count": status.guest_count,
        "ark_key_id": ark.key_id.hex(), "ask_key_id": ask.key_id.hex(), "rsa_bits": ark.modulus_size,
        "platform_id": platform.get_id().hex(),
    }


def _print_status(platform) -> None:  # noqa: ANN001
    info = _status_dict(platform)
    print(f"  firmware API {info['api_major']}.{info['api_minor']}, build {info['build_id']}, "
          f"SEV-ES {'on' if info['es'] else 'off'}, cbitpos {info['cbitpos']}, "
          f"reduced-phys-bits {info['reduced_phys_bits']}")
    print(f"  state {info['platform_state']}, live guests {info['guest_count']}")
    print(f"  ARK key id {info['ark_key_id']} (simulated root, RSA-{info['rsa_bits']}; trust it explicitly "
          f"with its ark.cert), ASK key id {info['ask_key_id']}")
    print(f"  platform id {info['platform_id'][:32]}...")


def cmd_status(args: argparse.Namespace) -> int:
    platform = _loaded_platform(args)
    if args.json:
        print(json.dumps(_status_dict(platform), indent=2))
    else:
        print(f"simulated SEV platform in {platform.state.path}")
        _print_status(platform)
    return 0


def _layouts(platform) -> dict[str, bytes]:  # noqa: ANN001
    export = platform.pdh_cert_export()
    return {
        "full": platform.full_chain(),
        "pdh": export.pdh,
        "chain": export.cert_chain,
        "chip-id": platform.chip_id_hex.encode() + b"\n",
        "ca": platform.cert("ask") + platform.cert("ark"),
        "ark": platform.cert("ark"),
    }


def cmd_export(args: argparse.Namespace) -> int:
    from sevhook.errors import UsageError

    platform = _loaded_platform(args)
    layouts = _layouts(platform)
    encode = (lambda data: base64.b64encode(data) + b"\n") if args.base64 else (lambda data: data)
    if args.out_dir:
        out_dir = Path(args.out_dir)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--out-dir {out_dir}: cannot create the directory ({exc.strerror or exc})") from exc
        for layout, name in EXPORT_FILES.items():
            path = out_dir / (name + (".b64" if args.base64 else ""))
            write_private_file(path, encode(layouts[layout]), mode=0o644)
            print(f"{path}: {layout}")
        return 0
    data = encode(layouts[args.format])
    if args.out and args.out != "-":
        write_private_file(args.out, data, mode=0o644)
        return 0
    if sys.stdout.isatty() and not args.base64:
        raise UsageError("refusing to write binary certificates to a terminal: use --out FILE, --out-dir DIR "
                         "or --base64")
    sys.stdout.buffer.write(data)
    sys.stdout.flush()
    return 0


def cmd_kds_serve(args: argparse.Namespace) -> int:
    import signal

    from sevhook.sim.kds import SimulatedKds, parse_listen

    platform = _loaded_platform(args)
    host, port = parse_listen(args.listen)
    kds = SimulatedKds([platform.state], host=host, port=port)
    if args.throttle:
        kds.throttle(args.throttle, args.retry_after)
    server = kds.bind()
    signal.signal(signal.SIGTERM, lambda *_: threading_shutdown(server))
    print(f"simulated AMD KDS for chip {platform.chip_id_hex[:16]}... on {kds.url}/cek/id/{{chip id}}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def threading_shutdown(server) -> None:  # noqa: ANN001
    """shutdown() blocks until serve_forever returns, so a signal handler must call it from another thread."""
    import threading

    threading.Thread(target=server.shutdown, daemon=True).start()


def cmd_secrets(args: argparse.Namespace) -> int:  # noqa: PLR0912  (the report: a branch per record field and output form)
    from sevhook.errors import SevhookError
    from sevhook.sim.guest import GuestRecorder

    state = _state(args)
    if not state.path.is_dir():
        raise SevhookError(f"no simulated platform in {state.path} (wrong --state-dir?)")
    records = GuestRecorder.all(state)
    if args.domain:
        records = [record for record in records if record.get("label") == args.domain]
        if not records:
            raise SevhookError(f"no guest named {args.domain!r} has been launched on the platform in {state.path}")
    if not args.show_values:
        for record in records:
            for secret in record.get("secrets", []):
                secret.pop("value_b64", None)
                for entry in secret.get("table") or []:
                    entry.pop("value_b64", None)
    if args.json:
        print(json.dumps(records, indent=2, sort_keys=True))
        return 0
    if not records:
        print(f"no guests have been launched on the platform in {state.path}")
    for record in records:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("started", 0)))
        alive = "running process" if record.get("alive") else "ended"
        print(f"{record.get('label')}: handle {record.get('handle')}, policy {record.get('policy', 0):#06x}, "
              f"state {record.get('state')}, launched {when} ({alive})")
        secrets = record.get("secrets", [])
        if not secrets:
            print("  no launch secret received")
        for index, secret in enumerate(secrets, 1):
            print(f"  secret {index}: {secret['length']} bytes at gpa {secret['gpa']:#x}")
            if secret.get("table") is None:
                print(f"    not an EFI secret table ({secret.get('table_error')})")
                if args.show_values:
                    print(f"    value (base64): {secret.get('value_b64')}")
                continue
            for entry in secret["table"]:
                line = f"    {entry['guid']}: {entry['length']} bytes"
                if args.show_values:
                    line += f", value {_printable(decode_base64(entry['value_b64']))}"
                print(line)
    return 0


def _printable(data: bytes) -> str:
    text = data.rstrip(b"\0")
    if text and all(32 <= byte < 127 for byte in text):
        return repr(text.decode()) + (" (NUL-terminated)" if text != data else "")
    return "base64 " + base64.b64encode(data).decode()


def cmd_prune(args: argparse.Namespace) -> int:
    from sevhook.sim.guest import GuestRecorder

    removed = GuestRecorder.prune(_state(args), keep=args.keep, older_than=args.older_than)
    print(f"removed {len(removed)} finished guest record(s)" + (f": {', '.join(removed)}" if removed else ""))
    return 0


def cmd_firmware(args: argparse.Namespace) -> int:
    """A firmware image whose OVMF footer table has the secret area (no AmdSev OVMF on most machines)."""
    from sevhook.flow.firmware import demo_firmware

    path = write_private_file(args.out, demo_firmware(), mode=0o644)
    print(f"wrote {path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    sim = subparsers.add_parser(
        "sim", help="the software SEV platform: create, export, inspect",
        description="A software AMD SEV secure processor with its own root of trust, for rehearsing "
                    "attestation without SEV hardware. `sevhook-sim-qemu` uses it as its firmware.",
        epilog=PLATFORM_EPILOG + "\n" + SECRETS_EPILOG.replace("examples:\n", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sim_sub = sim.add_subparsers(dest="sim_command", metavar="COMMAND")
    sim.set_defaults(func=lambda args: (sim.print_help(sys.stderr), 2)[1])

    platform = sim_sub.add_parser(
        "platform", help="create, export or show the simulated platform",
        description="Create the simulated platform once (keys and certificates in the state directory, mode 0700), "
                    "export its certificate chain in the layouts the owner tools read, or show its state.",
        epilog=PLATFORM_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    platform_sub = platform.add_subparsers(dest="platform_command", metavar="COMMAND")
    platform.set_defaults(func=lambda args: (platform.print_help(sys.stderr), 2)[1])

    init = platform_sub.add_parser(
        "init", help="create the platform (or change its firmware version/configuration)",
        description="Generate the root of trust (ARK, ASK, CEK, OCA, PEK, PDH) and a platform id once; "
                    "later runs keep the keys and only change the options given.",
        epilog="examples:\n  sevhook sim platform init --state-dir /tmp/sim\n"
               "  sevhook sim platform init --state-dir /tmp/sim --api-major 0 --api-minor 16 --no-es",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _state_dir_option(init)
    init.add_argument("--api-major", type=number_type("--api-major"), help="firmware API major (default 1)")
    init.add_argument("--api-minor", type=number_type("--api-minor"), help="firmware API minor (default 55)")
    init.add_argument("--build-id", type=number_type("--build-id"), help="firmware build id (default 21)")
    init.add_argument("--es", action=argparse.BooleanOptionalAction, default=None,
                      help="SEV-ES support (default on)")
    init.add_argument("--cbitpos", type=number_type("--cbitpos"), help="C-bit position reported to QEMU (default 51)")
    init.add_argument("--reduced-phys-bits", type=number_type("--reduced-phys-bits"), help="default 1")
    init.add_argument("--rsa-bits", type=int, choices=(2048, 4096), default=4096,
                      help="ARK/ASK key size for a new platform (4096 as Rome and later; 2048 as Naples)")
    init.add_argument("--force", action="store_true", help="discard the existing keys and make a new platform")
    init.set_defaults(func=cmd_init)

    status = platform_sub.add_parser(
        "status", help="show the platform's firmware version, configuration, key ids and guests",
        description="PLATFORM_STATUS plus what the state directory holds.",
        epilog="example:\n  sevhook sim platform status --state-dir /tmp/sim --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _state_dir_option(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)

    export = platform_sub.add_parser(
        "export", help="export the PDH, the certificate chain and the simulated ARK/ASK",
        description="Layouts: full = PDH|PEK|OCA|CEK|ASK|ARK with the KDS's signed CEK (`sevctl export --full`); "
                    "pdh = the PDH certificate; chain = PEK|OCA|CEK as the firmware exports it (QMP cert-chain, "
                    "CEK unsigned); chip-id = GET_ID as upper-case hex (the KDS's key); ca = ASK|ARK (AMD's "
                    "ask_ark_<gen>.cert layout); "
                    "ark = the simulated ARK alone, to pass as an explicit trust anchor.",
        epilog="examples:\n  sevhook sim platform export --out-dir /tmp/sim-export\n"
               "  sevhook sim platform export --format pdh --base64 --out pdh.b64",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _state_dir_option(export)
    export.add_argument("--format", choices=tuple(EXPORT_FILES), default="full", help="layout (default full)")
    export.add_argument("--out", metavar="FILE", help="write here instead of standard output")
    export.add_argument("--out-dir", metavar="DIR",
                        help="write every layout into DIR: " + ", ".join(EXPORT_FILES.values()))
    export.add_argument("--base64", action="store_true", help="base64 text instead of raw bytes")
    export.set_defaults(func=cmd_export)

    kds = sim_sub.add_parser(
        "kds", help="a simulated AMD Key Distribution Service serving the platform's signed CEK",
        description="Real firmware exports its CEK unsigned; AMD's KDS serves the ASK-signed CEK by chip id. "
                    "This serves the simulated platform's: GET /cek/id/{chip id hex} -> 2084 bytes.",
        epilog=KDS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    kds_sub = kds.add_subparsers(dest="kds_command", metavar="COMMAND")
    kds.set_defaults(func=lambda args: (kds.print_help(sys.stderr), 2)[1])
    serve = kds_sub.add_parser("serve", help="serve GET /cek/id/{chip id} until stopped",
                               epilog=KDS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _state_dir_option(serve)
    serve.add_argument("--listen", metavar="HOST:PORT", required=True, help="address to listen on")
    serve.add_argument("--throttle", type=int, default=0, metavar="N",
                       help="answer the first N requests 429 Too Many Requests (to rehearse back-off)")
    serve.add_argument("--retry-after", type=int, default=1, metavar="SECONDS",
                       help="the Retry-After of throttled answers (default 1)")
    serve.set_defaults(func=cmd_kds_serve)

    secrets = sim_sub.add_parser(
        "secrets", help="show what the simulated firmware received through LAUNCH_SECRET",
        description="Per guest (the latest launch of each name): state, and each injected secret with its "
                    "address, length and EFI secret-table GUIDs and lengths. Values only with --show-values.",
        epilog=SECRETS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _state_dir_option(secrets)
    secrets.add_argument("--domain", metavar="NAME", help="only this guest (QEMU -name / libvirt domain name)")
    secrets.add_argument("--show-values", action="store_true", help="also print the secret values")
    secrets.add_argument("--json", action="store_true", help="machine-readable output")
    secrets.set_defaults(func=cmd_secrets)

    prune = sim_sub.add_parser(
        "prune", help="remove the records of guests that no longer run",
        description="Remove guest records (what `sim secrets` shows) of launches that ended or whose QEMU is gone. "
                    "Records are also bounded: beyond 256, a new guest removes the oldest finished ones.",
        epilog="examples:\n  sevhook sim prune --state-dir /tmp/sim\n  sevhook sim prune --keep 10 --older-than 3600",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _state_dir_option(prune)
    prune.add_argument("--keep", type=number_type("--keep"), default=0, metavar="N",
                       help="keep the N most recent records (running guests always stay)")
    prune.add_argument("--older-than", type=number_type("--older-than"), metavar="SECONDS",
                       help="only records not updated for this long")
    prune.set_defaults(func=cmd_prune)
    _register_firmware(sim_sub)


def _register_firmware(sim_sub: argparse._SubParsersAction) -> None:
    firmware = sim_sub.add_parser(
        "firmware", help="write a firmware image with an SEV secret area, for a domain's <loader>",
        description="Write the firmware image `sevhook demo` boots: not a working OVMF, but with the footer table of "
                    "an AmdSev build (secret area, kernel-hashes area, SEV-ES reset block), so that a launch on "
                    "the software platform can be measured and given its secret where no AmdSev OVMF is installed.",
        epilog="example:\n  sevhook sim firmware --out /var/lib/sevhook/OVMF.sim.fd",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    firmware.add_argument("--out", type=Path, required=True, metavar="FILE", help="the image to write (mode 0644)")
    firmware.set_defaults(func=cmd_firmware)
