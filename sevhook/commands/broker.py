"""`sevhook broker ...`: run the guest owner's key broker and administer it (roots, hosts, guests,
audit). The admin commands work on the database directly, so they need no running server."""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sevhook.broker.settings import Limits
from sevhook.commands.arguments import config_defaults, number_type, read_input

EPILOG = """examples:
  sevhook broker init --tls --san kbs.example.org
  sevhook broker add-root milan --ca ask_ark_milan.cert
  sevhook broker add-host host1 --token-file host1.token
  sevhook broker list-hosts
  sevhook broker revoke-host host1
  sevhook broker rotate-host-token host1 --token-file host1.token.new
  sevhook broker add-guest web1 --firmware OVMF.amdsev.fd --kernel vmlinuz --initrd initrd.img \\
      --cmdline 'console=ttyS0' --policy 0x3 --disk-passphrase luks.pass
  sevhook broker update-guest web1 --add-firmware OVMF.new.fd --kernel vmlinuz --initrd initrd.img \\
      --cmdline 'console=ttyS0'
  sevhook broker serve --listen 0.0.0.0:8700
  sevhook broker audit --limit 20

Every command reads its data directory, database and serve options from the [broker] section of
/etc/sevhook/sevhook.toml ($SEVHOOK_CONFIG) when no flag gives them (`sevhook config show`)."""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="broker data directory: storage key, admin token, SQLite file (default: "
                             "[broker] data-dir in sevhook.toml, else /var/lib/sevhook/broker for root)")
    parser.add_argument("--db", metavar="URL", default=None,
                        help="database URL without a password (default sqlite:///DATA_DIR/broker.sqlite3; replicas "
                             "share postgresql+psycopg://USER@HOST:PORT/DB)")
    parser.add_argument("--db-password-file", type=Path, metavar="FILE", default=None,
                        help="a 0600 file whose first line is the database password (or set $SEVHOOK_DB_PASSWORD); "
                             "a password in --db is refused: the process list shows it to every user")
    config_defaults(parser, data_dir="broker.data-dir", db="broker.database-url",
                    db_password_file="broker.password-file")


def _sub(subparsers: argparse._SubParsersAction, name: str, help_text: str, epilog: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".",
                                   epilog=f"example:\n  {epilog}", formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(parser)
    return parser


def register(subparsers: argparse._SubParsersAction) -> None:  # noqa: PLR0915  (argparse: a statement per option)
    broker = subparsers.add_parser(
        "broker", help="the guest owner's key broker: serve it and administer it",
        description="The key broker releases a guest's secrets only to a launch whose measurement matches "
                    "one of the launch digests its owner registered. Secrets and launch keys are encrypted "
                    "at rest; every decision is audited.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = broker.add_subparsers(dest="broker_command", metavar="SUBCOMMAND")
    broker.set_defaults(func=lambda _args: (broker.print_help(sys.stderr), 2)[1])

    serve = _sub(sub, "serve", "serve the host API (/v1) and the admin API (/admin) over HTTP(S)",
                 "sevhook broker serve --listen 127.0.0.1:8700 --tls-cert broker.crt --tls-key broker.key")
    serve.add_argument("--listen", metavar="ADDR:PORT", help="default 127.0.0.1:8700")
    serve.add_argument("--tls-cert", type=Path, metavar="PEM", help="server certificate (chain) file (default "
                       "DATA_DIR/tls/server.crt when `broker init --tls` made it)")
    serve.add_argument("--tls-key", type=Path, metavar="PEM", help="server private key file")
    defaults = Limits()
    serve.add_argument("--max-body", type=int, default=defaults.max_body, metavar="BYTES",
                       help=f"largest request body accepted (default {defaults.max_body})")
    serve.add_argument("--max-header-bytes", type=int, default=defaults.max_header_bytes, metavar="BYTES",
                       help=f"largest request line plus headers; more gives 431 (default {defaults.max_header_bytes})")
    serve.add_argument("--header-timeout", type=float, default=defaults.header_timeout, metavar="SECONDS",
                       help="time from a connection's or request's first byte to its last header "
                            f"(default {defaults.header_timeout:g})")
    serve.add_argument("--body-timeout", type=float, default=defaults.body_timeout, metavar="SECONDS",
                       help=f"time from the last header to the last body byte (default {defaults.body_timeout:g})")
    serve.add_argument("--keepalive-timeout", type=float, default=defaults.keepalive_timeout, metavar="SECONDS",
                       help=f"idle time before a keep-alive connection closes (default {defaults.keepalive_timeout:g})")
    serve.add_argument("--max-connections", type=int, default=defaults.max_connections, metavar="N",
                       help=f"open connections; more get 503 and are closed (default {defaults.max_connections})")
    serve.add_argument("--rate-limit", type=float, default=defaults.rate, metavar="PER_SECOND",
                       help=f"requests per second per host token (default {defaults.rate:g}; 0 disables)")
    serve.add_argument("--burst", type=int, default=defaults.burst,
                       help=f"rate-limit burst per host token (default {defaults.burst})")
    serve.add_argument("--auth-failure-rate", type=float, default=defaults.auth_failure_rate, metavar="PER_SECOND",
                       help="requests per second per client address without a valid token "
                            f"(default {defaults.auth_failure_rate:g}; 0 disables)")
    serve.add_argument("--auth-failure-burst", type=int, default=defaults.auth_failure_burst, metavar="N",
                       help="burst of requests without a valid token per address "
                            f"(default {defaults.auth_failure_burst})")
    serve.add_argument("--launch-ttl", type=float, default=3600.0, metavar="SECONDS",
                       help="how long a launch may wait for its attestation (default 3600)")
    serve.add_argument("--access-log", action="store_true", help="log every request line (no bodies)")
    serve.add_argument("--init", action="store_true",
                       help="create the data directory, storage key, admin token and tables when missing (as "
                            "`sevhook broker init`); without it a data directory that was never initialised is refused")
    serve.add_argument("--kds-url", metavar="URL",
                       help="AMD's Key Distribution Service, for the signed CEK of hosts that send the "
                            "firmware's unsigned one (default https://kdsintf.amd.com; `none`: air-gapped, "
                            "imported CEKs only, see add-cek)")
    config_defaults(serve, listen="broker.listen", tls_cert="broker.tls-cert", tls_key="broker.tls-key",
                    kds_url="broker.kds-url")
    serve.set_defaults(func=run_serve)

    init = _sub(sub, "init", "create the data directory, storage key, admin token and tables",
                "sevhook broker init --tls --san kbs.example.org")
    init.add_argument("--tls", action="store_true",
                      help="also make a CA and a server certificate in DATA_DIR/tls (EC P-256); serve uses them")
    init.add_argument("--san", action="append", default=[], metavar="NAME",
                      help="a DNS name or IP address hosts use to reach the broker (repeatable; default: this "
                           "machine's names, localhost, 127.0.0.1 and ::1)")
    init.set_defaults(func=run_init)

    root = _sub(sub, "add-root", "trust a root (ARK) for platform chains, given as its ASK|ARK bundle",
                "sevhook broker add-root milan --ca ask_ark_milan.cert")
    root.add_argument("name", help="a name for the root, e.g. milan or sim-lab")
    root.add_argument("--ca", type=Path, required=True, help="ASK|ARK bundle (AMD's ask_ark_<gen>.cert format)")
    root.add_argument("--test", action="store_true",
                      help="trust a root that is not AMD's (a software or test platform); it is named as such")
    root.set_defaults(func=run_add_root)

    roots = _sub(sub, "list-roots", "list the trusted roots", "sevhook broker list-roots --json")
    roots.add_argument("--json", action="store_true")
    roots.set_defaults(func=run_list_roots)

    cek = _sub(sub, "add-cek", "import an ASK-signed CEK (from AMD's KDS) for an air-gapped broker",
               "sevhook broker add-cek cek.cert --chip-id $(cat /var/lib/sevhook/platform/chip_id.hex)")
    cek.add_argument("file", type=Path, metavar="FILE",
                     help="the signed CEK (2084 bytes, raw or base64, from https://kdsintf.amd.com/cek/id/<chip id>) "
                          "or a full chain holding it (sevctl export --full)")
    cek.add_argument("--chip-id", metavar="HEX", help="the chip id (GET_ID as hex) the CEK belongs to, for the record")
    cek.set_defaults(func=run_add_cek)

    host = _sub(sub, "add-host", "register a host and write its bearer token to a new 0600 file",
                "sevhook broker add-host host1 --token-file host1.token")
    host.add_argument("name")
    host.add_argument("--token-file", type=Path, required=True, help="where to write the host's token")
    host.set_defaults(func=run_add_host)

    hosts = _sub(sub, "list-hosts", "list registered hosts and whether they are revoked (never their tokens)",
                 "sevhook broker list-hosts --json")
    hosts.add_argument("--json", action="store_true")
    hosts.set_defaults(func=run_list_hosts)

    revoke_host = _sub(sub, "revoke-host", "revoke a host: its token is refused from now on (403 host-revoked)",
                       "sevhook broker revoke-host host1")
    revoke_host.add_argument("name")
    revoke_host.set_defaults(func=run_revoke_host)

    guest = _sub(sub, "add-guest", "register a guest: its launch digests, rules and secrets",
                 "sevhook broker add-guest web1 --digest 6faa...64ea --policy 0x3 --secret GUID:FILE")
    guest.add_argument("guest_id", metavar="ID")
    guest.add_argument("--digest", action="append", default=[], metavar="HEX",
                       help="an allowed launch digest, 64 hex digits (repeatable)")
    guest.add_argument("--firmware", type=Path, help="compute a digest from this OVMF image (with the inputs below)")
    guest.add_argument("--kernel", type=Path, help="direct-boot kernel measured with --firmware")
    guest.add_argument("--initrd", type=Path, help="direct-boot initrd measured with --firmware")
    guest.add_argument("--cmdline", help="direct-boot kernel command line measured with --firmware")
    guest.add_argument("--policy", action="append", default=[], metavar="N", type=number_type("--policy"),
                       help="an allowed SEV policy, decimal or 0x-hex (repeatable; the first is the default)")
    guest.add_argument("--min-api", default="0.0", metavar="X.Y", help="minimum platform SEV API version")
    guest.add_argument("--min-build", default=0, metavar="N", type=number_type("--min-build"),
                       help="minimum platform firmware build id")
    guest.add_argument("--secret", action="append", default=[], metavar="GUID:FILE",
                       help="release FILE's bytes under GUID in the guest's secret table (repeatable)")
    guest.add_argument("--disk-passphrase", type=Path, metavar="FILE",
                       help="release FILE's first line as the disk passphrase (grub/cryptsetup GUID, NUL-terminated)")
    guest.add_argument("--reusable", action="store_true",
                       help="a launch may be attested more than once (default: single use)")
    guest.set_defaults(func=run_add_guest)

    upd = _sub(sub, "update-guest", "roll a guest forward: add or remove launch digests, change its rules, "
               "rotate its secrets", "sevhook broker update-guest web1 --add-firmware OVMF.new.fd --kernel vmlinuz")
    upd.add_argument("guest_id", metavar="ID")
    upd.add_argument("--add-firmware", type=Path, action="append", default=[], metavar="FILE",
                     help="allow the digest of this OVMF image with --kernel/--initrd/--cmdline (repeatable)")
    upd.add_argument("--kernel", type=Path, help="direct-boot kernel measured with each --add-firmware")
    upd.add_argument("--initrd", type=Path, help="direct-boot initrd measured with each --add-firmware")
    upd.add_argument("--cmdline", help="direct-boot kernel command line measured with each --add-firmware")
    upd.add_argument("--add-digest", action="append", default=[], metavar="HEX",
                     help="allow this launch digest, 64 hex digits (repeatable)")
    upd.add_argument("--remove-digest", action="append", default=[], metavar="HEX",
                     help="stop allowing this launch digest (repeatable); the guest keeps at least one")
    upd.add_argument("--policy", action="append", default=[], metavar="N", type=number_type("--policy"),
                     help="replace the allowed policies (repeatable; the first is the default)")
    upd.add_argument("--min-api", metavar="X.Y", help="new minimum platform SEV API version")
    upd.add_argument("--min-build", metavar="N", type=number_type("--min-build"), help="new minimum firmware build")
    upd.add_argument("--secret", action="append", default=[], metavar="GUID:FILE",
                     help="set (or rotate) the secret under GUID to FILE's bytes (repeatable)")
    upd.add_argument("--disk-passphrase", type=Path, metavar="FILE", help="set (or rotate) the disk passphrase")
    upd.set_defaults(func=run_update_guest)

    rotate = _sub(sub, "rotate-host-token", "give a host a new token in a new 0600 file; the old one is refused",
                  "sevhook broker rotate-host-token host1 --token-file host1.token.new")
    rotate.add_argument("name")
    rotate.add_argument("--token-file", type=Path, required=True, help="where to write the host's new token")
    rotate.set_defaults(func=run_rotate_host_token)

    listing = _sub(sub, "list-guests", "list registered guests (never their secrets)",
                   "sevhook broker list-guests --json")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=run_list_guests)

    revoke = _sub(sub, "revoke-guest", "revoke a guest: no new launches, no more secrets",
                  "sevhook broker revoke-guest web1")
    revoke.add_argument("guest_id", metavar="ID")
    revoke.set_defaults(func=run_revoke_guest)

    audit = _sub(sub, "audit", "show the audit log of decisions", "sevhook broker audit --guest web1 --limit 50")
    audit.add_argument("--limit", type=int, default=50)
    audit.add_argument("--after", type=int, default=0, metavar="ID", help="only entries after this id")
    audit.add_argument("--guest", metavar="ID")
    audit.add_argument("--json", action="store_true")
    audit.add_argument("--hex", action="store_true",
                       help="show measurements in hex (default base64, as libvirt's domlaunchsecinfo prints them)")
    audit.set_defaults(func=run_audit)


def _db_url(args: argparse.Namespace) -> Any:
    from sevhook.broker.server import database_url

    return database_url(args.db, args.data_dir, args.db_password_file)


def _admin(args: argparse.Namespace) -> Any:
    """The admin service over the data directory and database (no server needed)."""
    from sevhook.broker.admin_ops import require_initialised
    from sevhook.broker.server import open_broker

    db_url = _db_url(args)  # a password on the command line is refused first, whatever else is wrong
    require_initialised(args.data_dir, getattr(args, "_config_sources", {}).get("data_dir", "default"))
    return open_broker(args.data_dir, db_url).admin


def run_serve(args: argparse.Namespace) -> int:
    from sevhook.broker.server import ServeOptions, serve
    from sevhook.errors import UsageError

    if args.launch_ttl <= 0:
        raise UsageError(f"--launch-ttl {args.launch_ttl}: must be more than 0 seconds")
    limits = Limits(max_body=args.max_body, max_header_bytes=args.max_header_bytes,
                    header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                    keepalive_timeout=args.keepalive_timeout, max_connections=args.max_connections,
                    rate=args.rate_limit, burst=args.burst, auth_failure_rate=args.auth_failure_rate,
                    auth_failure_burst=args.auth_failure_burst)
    if args.tls_cert is None and args.tls_key is None:
        from sevhook.broker.tls import tls_files

        made = tls_files(args.data_dir)  # `broker init --tls` made them: serve HTTPS by default
        if made.complete():
            args.tls_cert, args.tls_key = made.server_cert, made.server_key
    return serve(ServeOptions(
        data_dir=args.data_dir, db_url=_db_url(args), listen=args.listen, tls_cert=args.tls_cert,
        tls_key=args.tls_key, limits=limits, launch_ttl=args.launch_ttl, access_log=args.access_log,
        init=args.init, kds_url=None if args.kds_url == "none" else args.kds_url))


def run_init(args: argparse.Namespace) -> int:
    from sevhook.broker.server import open_broker
    from sevhook.broker.vault import ADMIN_TOKEN_FILE, init_keys
    from sevhook.errors import UsageError

    data_dir = args.data_dir
    if args.san and not args.tls:
        raise UsageError("--san names the TLS server certificate: give --tls with it")
    if args.tls:
        from sevhook.broker.tls import check_names, default_names

        names = args.san or default_names()
        check_names(names)  # before anything is created
    created = init_keys(data_dir)
    open_broker(data_dir, _db_url(args), create=True)
    token_path = data_dir / ADMIN_TOKEN_FILE
    state = "created" if created else "kept the existing"
    print(f"broker data directory {data_dir} (0700): {state} admin token in {token_path} (0600); tables ready")
    if args.tls:
        from sevhook.broker.tls import make_tls

        files, made = make_tls(data_dir, names)
        what = "made" if made else "kept the existing"
        print(f"TLS: {what} server certificate {files.server_cert} (key 0600), signed by the CA {files.ca_cert}")
        print(f"give {files.ca_cert} to every host (ca-file in [host] of its sevhook.toml); "
              "`sevhook broker serve` uses the server certificate by default")
    return 0


def run_add_root(args: argparse.Namespace) -> int:
    bundle = read_input(args.ca, "--ca")
    root = _admin(args).add_root(args.name, bundle, test=args.test)
    kind = "test root (trusted by name)" if root["test"] else "AMD root"
    print(f"root {root['name']}: {kind}, ARK key id {root['ark_key_id']}")
    return 0


def run_add_cek(args: argparse.Namespace) -> int:
    added = _admin(args).add_cek(read_input(args.file, "add-cek FILE"), args.chip_id)
    chip = f" for chip {added['chip_id'][:16]}..." if added["chip_id"] else ""
    print(f"signed CEK{chip} imported (key sha256 {added['key_sha256'][:16]}..., signed by ASK {added['ask_key_id']})")
    return 0


def run_list_roots(args: argparse.Namespace) -> int:
    roots = _admin(args).list_roots()
    if args.json:
        print(json.dumps(roots, indent=2))
    for root in [] if args.json else roots:
        print(f"{root['name']}\t{'test' if root['test'] else 'amd'}\t{root['ark_key_id']}")
    return 0


def _save_new_token(token_file: Path, register: Callable[[str], object]) -> None:
    """A fresh host token, saved (0600) before `register` takes it: a failed write then registers
    nothing, and a failed registration removes the file again, so no token is ever lost or orphaned."""
    from sevhook.broker.vault import new_token
    from sevhook.errors import UsageError
    from sevhook.files import write_private_file

    if token_file.exists():
        raise UsageError(f"--token-file {token_file} exists; choose a new file (tokens are shown once)")
    if not token_file.parent.is_dir():
        raise UsageError(f"--token-file {token_file}: directory {token_file.parent} does not exist")
    token = new_token()
    write_private_file(token_file, (token + "\n").encode())
    try:
        register(token)
    except BaseException:
        token_file.unlink(missing_ok=True)
        raise


def run_add_host(args: argparse.Namespace) -> int:
    _save_new_token(args.token_file, lambda token: _admin(args).add_host(args.name, token=token))
    print(f"host {args.name}: token written to {args.token_file} (0600); give it to the host's sevhook config")
    return 0


def run_list_hosts(args: argparse.Namespace) -> int:
    hosts = _admin(args).list_hosts()
    if args.json:
        print(json.dumps(hosts, indent=2))
        return 0
    for host in hosts:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(host["created_at"]))
        print(f"{host['name']}\t{'revoked' if host['revoked'] else 'active'}\tadded {when}Z")
    return 0


def run_revoke_host(args: argparse.Namespace) -> int:
    _admin(args).revoke_host(args.name)
    print(f"host {args.name}: revoked; its token is refused from now on (the name stays taken)")
    return 0


def _secrets(args: argparse.Namespace) -> list[tuple[uuid.UUID, bytes]]:
    from sevhook.errors import UsageError
    from sevhook.sev.secret import DISK_PASSPHRASE_GUID

    entries: list[tuple[uuid.UUID, bytes]] = []
    for item in args.secret:
        guid_text, sep, file_name = item.partition(":")
        try:
            guid = uuid.UUID(guid_text)
        except ValueError:
            guid = None
        if not sep or guid is None or not file_name:
            raise UsageError(f"--secret {item!r}: use GUID:FILE, e.g. 736869e5-84f0-4973-92ec-06879ce3da0b:pass.txt")
        entries.append((guid, read_input(Path(file_name), f"--secret {guid}")))
    if args.disk_passphrase:
        lines = read_input(args.disk_passphrase, "--disk-passphrase").splitlines()
        passphrase = lines[0] if lines else b""
        if not passphrase or b"\0" in passphrase:
            raise UsageError(f"--disk-passphrase {args.disk_passphrase}: the first line must hold the passphrase "
                             "(no NUL bytes)")
        entries.append((DISK_PASSPHRASE_GUID, passphrase + b"\0"))
    return entries


def _digests(args: argparse.Namespace) -> tuple[list[bytes], list[str]]:
    from sevhook.errors import UsageError

    digests: list[bytes] = []
    labels: list[str] = []
    for text in args.digest:
        try:
            digest = bytes.fromhex(text.strip())
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise UsageError(f"--digest {text!r}: give the SHA-256 launch digest as 64 hex digits")
        digests.append(digest)
        labels.append("given")
    if args.firmware:
        digest, label = _measure(args.firmware, args)
        digests.append(digest)
        labels.append(label)
    elif args.kernel or args.initrd or args.cmdline is not None:
        raise UsageError("--kernel, --initrd and --cmdline are measured together with --firmware; give it too")
    if not digests:
        raise UsageError("give --digest HEX or --firmware FILE (SEV-ES guests: compute the digest with "
                         "`sevhook owner measure` and pass it with --digest)")
    return digests, labels


def _measure(firmware: Path, args: argparse.Namespace) -> tuple[bytes, str]:
    """The launch digest of `firmware` with the direct-boot inputs in args, and its label."""
    from sevhook.sev.launch_digest import measure_sev

    measured = measure_sev(firmware, args.kernel, args.initrd, args.cmdline)
    for warning in measured.warnings:
        print(f"sevhook: warning: {warning}", file=sys.stderr)
    return measured.digest, f"computed from {firmware.name}" + (f" + {args.kernel.name}" if args.kernel else "")


def _hex_digest(text: str, flag: str) -> bytes:
    from sevhook.errors import UsageError

    try:
        digest = bytes.fromhex(text.strip())
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise UsageError(f"{flag} {text!r}: give the SHA-256 launch digest as 64 hex digits")
    return digest


def _version(text: str, what: str) -> tuple[int, int]:
    from sevhook.errors import UsageError

    major, sep, minor = text.partition(".")
    if not sep or not major.isdigit() or not minor.isdigit():
        raise UsageError(f"{what} {text!r}: use MAJOR.MINOR, e.g. 0.17")
    return int(major), int(minor)


def _policy_text(policy: int) -> str:
    """A policy and its flags, without the policy's API field: the guest's own minimum is printed beside it."""
    from sevhook.sev.policy import SevPolicy

    return f"{policy:#06x} ({'|'.join(SevPolicy(policy).flag_names()) or 'no flags'})"


def run_add_guest(args: argparse.Namespace) -> int:
    from sevhook.broker.rules import GuestSpec

    policies = args.policy or [0x1]
    if args.firmware and not args.digest:
        from sevhook.sev.digest_rules import require_vmsa_source

        # --firmware computes a plain SEV digest (no VMSAs): it can only serve a non-ES policy
        require_vmsa_source(min(policies, key=lambda policy: policy & 0x4), has_vmsas=False,
                            what="broker add-guest --firmware",
                            advice="compute the SEV-ES digest with `sevhook owner measure --mode seves --vcpus N "
                                   "--vcpu-type NAME` and register it with --digest HEX")
    digests, labels = _digests(args)
    spec = GuestSpec(
        guest_id=args.guest_id,
        digests=tuple(digests),
        policies=tuple(policies),
        min_api=_version(args.min_api, "--min-api"),
        min_build=args.min_build,
        secrets=tuple(_secrets(args)),
        reusable=args.reusable,
        digest_labels=tuple(labels),
    )
    if spec.secrets:
        _require_secret_areas([args.firmware] if args.firmware else [], spec.secrets)
    _print_guest(_admin(args).add_guest(spec), "registered")
    return 0


def _require_secret_areas(firmwares: list[Path], secrets: Any) -> None:
    """Each firmware the guest may launch must have an SEV secret area that holds its secret table
    (else QEMU would write the secret at guest address 0); `secrets`: (GUID, value) pairs."""
    from sevhook.sev.secret import SecretTable
    from sevhook.sev.secret_area import require_secret_area

    needed = len(SecretTable(tuple(secrets)).build()) if secrets else 1
    for firmware in firmwares:
        require_secret_area(firmware, needed)


def _print_guest(guest: dict[str, Any], what: str) -> None:
    # the guest's minimum API is its own rule, not the policy's API field (which describe() would show)
    print(f"guest {guest['id']}: {what}; {len(guest['digests'])} digest(s), policies "
          f"{', '.join(_policy_text(p) for p in guest['policies'])}, "
          f"minimum API {guest['min_api']} build {guest['min_build']}, "
          f"{len(guest['secret_guids'])} secret(s), {'reusable' if guest['reusable'] else 'single-use'} launches")
    for digest in guest["digests"]:
        print(f"  digest {digest['digest']}  {digest['label']}")


def run_update_guest(args: argparse.Namespace) -> int:
    from sevhook.broker.admin_ops import GuestUpdate, update_guest
    from sevhook.errors import UsageError

    if not args.add_firmware and (args.kernel or args.initrd or args.cmdline is not None):
        raise UsageError("--kernel, --initrd and --cmdline are measured together with --add-firmware; give it too")
    added = [(_hex_digest(text, "--add-digest"), "given") for text in args.add_digest]
    added += [_measure(firmware, args) for firmware in args.add_firmware]
    change = GuestUpdate(
        guest_id=args.guest_id,
        add_digests=tuple(digest for digest, _ in added),
        digest_labels=tuple(label for _, label in added),
        remove_digests=tuple(_hex_digest(text, "--remove-digest") for text in args.remove_digest),
        policies=tuple(args.policy),
        min_api=_version(args.min_api, "--min-api") if args.min_api is not None else None,
        min_build=args.min_build,
        secrets=tuple(_secrets(args)),
    )
    admin = _admin(args)
    if args.add_firmware and (change.secrets or admin.guest(args.guest_id)["secret_guids"]):
        _require_secret_areas(list(args.add_firmware), change.secrets)
    _print_guest(update_guest(admin, change), "updated")
    return 0


def run_rotate_host_token(args: argparse.Namespace) -> int:
    from sevhook.broker.admin_ops import rotate_host_token

    _save_new_token(args.token_file, lambda token: rotate_host_token(_admin(args), args.name, token))
    print(f"host {args.name}: new token written to {args.token_file} (0600); the old token is refused from now on: "
          "install the new file on the host")
    return 0


def run_list_guests(args: argparse.Namespace) -> int:
    guests = _admin(args).list_guests()
    if args.json:
        print(json.dumps(guests, indent=2))
        return 0
    for guest in guests:
        state = "revoked" if guest["revoked"] else "active"
        print(f"{guest['id']}\t{state}\tpolicies {','.join(hex(p) for p in guest['policies'])}\t"
              f"min API {guest['min_api']} build {guest['min_build']}\t{len(guest['digests'])} digest(s)\t"
              f"{len(guest['secret_guids'])} secret(s)\t{'reusable' if guest['reusable'] else 'single-use'}")
    return 0


def run_revoke_guest(args: argparse.Namespace) -> int:
    _admin(args).revoke_guest(args.guest_id)
    print(f"guest {args.guest_id}: revoked")
    return 0


def _base64_of_hex(text: str) -> str:
    """A measurement stored as hex, shown in base64 as libvirt shows it; text that is not hex stays as is."""
    import base64

    try:
        return base64.b64encode(bytes.fromhex(text)).decode()
    except ValueError:
        return text


def run_audit(args: argparse.Namespace) -> int:
    entries = _admin(args).audit_log(limit=max(1, args.limit), after_id=args.after, guest_id=args.guest)
    if not args.hex:
        for entry in entries:
            entry["measurement"] = entry["measurement"] and _base64_of_hex(entry["measurement"])
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    for entry in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(entry["at"]))
        print(f"{entry['id']}\t{when}Z\t{entry['actor']}\t{entry['action']}\t{entry['decision']}\t{entry['reason']}\t"
              f"guest={entry['guest_id'] or '-'}\tlaunch={entry['launch_id'] or '-'}\t"
              f"measurement={entry['measurement'] or '-'}\t{entry['detail']}")
    return 0
