"""`sevhook owner`: the guest owner's side of an SEV launch, run where the owner keeps its keys.

verify-chain checks a platform's certificates, session makes the LAUNCH_START files, verify-measurement
checks LAUNCH_MEASURE, and secret wraps the LAUNCH_SECRET packet."""

from __future__ import annotations

import argparse
import base64
import importlib
import json
import sys

from sevhook.commands.arguments import number_type, read_input
from sevhook.encoding import decode_base64
from sevhook.errors import FormatError, UsageError, VerificationError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing, a cost every command start would pay
if TYPE_CHECKING:
    import uuid

    from sevhook.sev.chain import CertificateChain
    from sevhook.sev.roots import TrustAnchor

DEFAULT_SESSION_NAME = "guest"


def _warn(message: str) -> None:
    print(f"sevhook: warning: {message}", file=sys.stderr)


def _ca_bytes(ark: str | None, ask: str | None) -> bytes | None:
    """ASK||ARK from --ask and --ark, or from --ark alone when it is AMD's ask_ark bundle."""
    if ask and not ark:
        raise UsageError("--ask needs --ark as well (or pass AMD's ask_ark_<gen>.cert bundle as --ark)")
    if not ark:
        return None
    ark_bytes = read_input(ark, "ARK file")
    return (read_input(ask, "ASK file") if ask else b"") + ark_bytes


def _trust_anchors(paths: list[str] | None) -> list[TrustAnchor]:
    from sevhook.sev.roots import TrustAnchor

    return [TrustAnchor.load(path) for path in paths or ()]


def _load_chain(chain_path: str, pdh_path: str | None, ark: str | None, ask: str | None) -> CertificateChain:
    from sevhook.sev.chain import CertificateChain, maybe_base64

    pdh = maybe_base64(read_input(pdh_path, "PDH file")) if pdh_path else None
    chain = maybe_base64(read_input(chain_path, "chain file"))
    return CertificateChain.from_parts(chain, ca=_ca_bytes(ark, ask), pdh=pdh, what=f"chain file {chain_path}")


def cmd_verify_chain(args: argparse.Namespace) -> int:
    from sevhook.sev.chain import verify_chain

    chain = _load_chain(args.chain, args.pdh, args.ark, args.ask)
    report = verify_chain(chain, _trust_anchors(args.trust_anchor))
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0 if report.ok else 1
    for link in report.links:
        print(f"{'ok' if link.ok else 'FAIL':<5} {link.name}: {link.why}")
    if report.ok:
        print(f"chain valid: PDH certified by {report.root}")
        return 0
    print(f"chain INVALID: {len(report.failures)} link(s) failed", file=sys.stderr)
    return 1


def cmd_session(args: argparse.Namespace) -> int:
    from sevhook.sev.certs import SevCertificate
    from sevhook.sev.chain import maybe_base64
    from sevhook.sev.policy import SevPolicy
    from sevhook.sev.session import create_session

    policy = SevPolicy(args.policy)
    pdh_bytes = maybe_base64(read_input(args.pdh, "PDH file"))
    pdh = SevCertificate.parse(pdh_bytes, f"PDH file {args.pdh}")
    root: str | None = None  # the chain's root, when verified
    if args.chain:
        chain = _load_chain(args.chain, args.pdh, args.ark, args.ask)
        root = chain.verify(_trust_anchors(args.trust_anchor)).root
        if not args.json:
            print(f"chain valid: PDH certified by {root}")
    elif args.insecure_skip_chain:
        _warn("the PDH's certificate chain was NOT verified (--insecure-skip-chain): a host could have "
              "substituted its own key and will be able to read the TEK/TIK")
    else:
        raise UsageError(
            "refusing to make a session for an unverified PDH: pass --chain FILE (with --ark/--ask for "
            "PEK|OCA|CEK chains) or, for tests only, --insecure-skip-chain"
        )
    session = create_session(pdh, policy.value)
    paths = session.write_files(args.out_dir, args.name)
    if args.json:
        print(json.dumps({"policy": policy.value, "policy_description": policy.describe(), "chain_root": root,
                          "files": {kind: str(path) for kind, path in paths.items()}}, indent=2))
        return 0
    print(f"policy {policy.describe()}")
    for path in paths.values():
        print(f"wrote {path}")
    return 0


def _launch_digest_from_args(args: argparse.Namespace) -> bytes:
    from pathlib import Path

    if args.launch_digest:
        text = args.launch_digest.strip()
        try:
            digest = bytes.fromhex(text) if len(text) == 64 else decode_base64(text)
        except (ValueError, FormatError):
            digest = b""
        if len(digest) != 32:
            raise UsageError("--launch-digest: give the 32-byte SHA-256 launch digest as 64 hex digits (or base64)")
        return digest
    if not args.firmware:
        raise UsageError("give --launch-digest HEX, or --firmware FILE (with --kernel/--initrd/--cmdline/--vmsa)")
    try:
        from sevhook.sev.launch_digest import sev_launch_digest
    except ImportError as exc:
        if exc.name and exc.name.startswith("sevhook.sev"):
            raise UsageError("computing the launch digest from its inputs is not available in this build; "
                             "pass --launch-digest HEX") from exc
        raise
    from sevhook.sev.digest_rules import require_vmsa_source, vmsas_for_policy

    vmsas = list(args.vmsa or ())
    if getattr(args, "policy", None) is not None:
        require_vmsa_source(args.policy, bool(vmsas), "--policy",
                            "add --vmsa FILE for each vCPU (the VMSA pages QEMU measured; `sevhook owner measure "
                            "--mode seves --vcpus N --vcpu-type NAME` computes the digest from the CPU type, "
                            "then pass it with --launch-digest)")
        measured, warning = vmsas_for_policy(args.policy, len(vmsas))
        if warning:
            print(f"sevhook: warning: {warning}", file=sys.stderr)
        vmsas = vmsas if measured else []
    for option, paths in (("firmware", [args.firmware]), ("kernel", [args.kernel]), ("initrd", [args.initrd]),
                          ("vmsa", vmsas)):
        for path in paths:  # devices, pipes and directories are refused when the file is opened
            if path and not Path(path).exists():
                raise UsageError(f"--{option} {path}: no such file")
    return sev_launch_digest(
        Path(args.firmware),
        kernel=Path(args.kernel) if args.kernel else None,
        initrd=Path(args.initrd) if args.initrd else None,
        cmdline=args.cmdline,
        vmsas=tuple(Path(path) for path in vmsas),
    )


MISMATCH_ADVICE = (
    "check that the TIK is this launch's, that api/build/policy are the platform's (query-sev) and the guest's, "
    "and that firmware, kernel, initrd, cmdline and VMSAs are exactly what QEMU loaded "
    "(`sevhook owner diagnose-mismatch` helps)"
)


def _expected_measurement(args: argparse.Namespace, tik: bytes, mnonce: bytes) -> tuple[bytes, bytes]:
    """(launch digest, measurement the platform should report) from the options describing the launch."""
    from sevhook.sev.measurement import compute_measurement

    digest = _launch_digest_from_args(args)
    return digest, compute_measurement(tik, args.api_major, args.api_minor, args.build_id, args.policy, digest, mnonce)


def cmd_verify_measurement(args: argparse.Namespace) -> int:
    import hmac

    from sevhook.sev.measurement import LaunchMeasurement
    from sevhook.sev.session import read_key_file

    reported = LaunchMeasurement.parse(args.measurement, "--measurement")
    tik = read_key_file(args.tik, "TIK")
    digest, expected = _expected_measurement(args, tik, reported.mnonce)
    match = hmac.compare_digest(expected, reported.measurement)
    # measurements as libvirt prints them (base64 of measurement || mnonce), hex only with --hex
    if args.hex:
        expected_text, actual_text = expected.hex(), reported.measurement.hex()
    else:
        expected_text = base64.b64encode(expected + reported.mnonce).decode()
        actual_text = base64.b64encode(reported.measurement + reported.mnonce).decode()
    if args.json:
        print(json.dumps({"launch_digest": digest.hex(), "expected": expected_text,
                          "actual": actual_text, "match": match}, indent=2))
    else:
        print(f"launch digest:        {digest.hex()}")
        print(f"expected measurement: {expected_text}")
        print(f"reported measurement: {actual_text}")
    if match:
        if not args.json:
            print("measurement matches")
        return 0
    print(f"measurement MISMATCH: {MISMATCH_ADVICE}", file=sys.stderr)
    return 1


CHECK_OPTIONS = ("launch_digest", "firmware", "kernel", "initrd", "cmdline", "vmsa", "build_id", "policy")


def _check_measurement_for_secret(args: argparse.Namespace, measurement: bytes, tik: bytes) -> None:
    """Refuse to wrap secrets for a launch whose measurement is not the expected one, when the launch is
    described; otherwise say plainly that nothing was checked (the caller then vouches for the measurement)."""
    import hmac

    from sevhook.sev.measurement import LAUNCH_MEASUREMENT_SIZE, MEASUREMENT_SIZE

    if all(getattr(args, name) is None for name in CHECK_OPTIONS):
        _warn("the measurement was NOT checked: pass --launch-digest HEX (or --firmware FILE ...) with "
              "--api-major/--api-minor/--build-id/--policy to refuse a launch that is not the expected one, "
              "or run `sevhook owner verify-measurement` first")
        return
    missing = [option for option, value in (("--api-major", args.api_major), ("--api-minor", args.api_minor),
                                            ("--build-id", args.build_id), ("--policy", args.policy))
               if value is None]
    if not (args.launch_digest or args.firmware):
        missing.append("--launch-digest or --firmware")
    if missing:
        raise UsageError(f"checking the measurement before wrapping also needs {', '.join(missing)}")
    if len(measurement) != LAUNCH_MEASUREMENT_SIZE:
        raise UsageError(f"--measurement: checking it needs all {LAUNCH_MEASUREMENT_SIZE} bytes "
                         "(measurement and mnonce), as QEMU/libvirt report them")
    _, expected = _expected_measurement(args, tik, measurement[MEASUREMENT_SIZE:])
    if not hmac.compare_digest(expected, measurement[:MEASUREMENT_SIZE]):
        raise VerificationError("measurement MISMATCH, so no secret was wrapped and nothing written: "
                                f"{MISMATCH_ADVICE}")
    print("measurement matches the expected launch", file=sys.stderr)


def _parse_secret_option(text: str) -> tuple[str, str]:
    guid, sep, path = text.partition(":")
    if not sep or not path:
        raise UsageError(f"--secret {text!r}: use GUID:FILE, e.g. 736869e5-84f0-4973-92ec-06879ce3da0b:pass.txt")
    return guid, path


def _secret_entries(args: argparse.Namespace) -> list[tuple[uuid.UUID, bytes]]:
    import uuid

    from sevhook.sev.secret import DISK_PASSPHRASE_GUID

    entries: list[tuple[uuid.UUID, bytes]] = []
    for option in args.secret or ():
        guid_text, path = _parse_secret_option(option)
        try:
            guid = uuid.UUID(guid_text)
        except ValueError as exc:
            raise UsageError(f"--secret {option!r}: {guid_text!r} is not a GUID") from exc
        data = read_input(path, "secret file")
        if guid == DISK_PASSPHRASE_GUID and not data.endswith(b"\0"):
            _warn(f"disk-passphrase entry from {path} is not NUL-terminated; grub will reject it "
                  "('password is not zero terminated'): use --disk-passphrase FILE, which adds the NUL")
        entries.append((guid, data))
    if args.disk_passphrase:
        data = read_input(args.disk_passphrase, "disk-passphrase file")
        if data.endswith(b"\n"):
            data = data[:-1]
            _warn(f"dropped the trailing newline of {args.disk_passphrase} from the disk passphrase")
        if not data.endswith(b"\0"):
            data += b"\0"
        entries.append((DISK_PASSPHRASE_GUID, data))
    if not entries:
        raise UsageError("nothing to send: give --secret GUID:FILE and/or --disk-passphrase FILE")
    seen = set()
    for guid, _ in entries:
        if guid in seen:
            raise UsageError(f"GUID {guid} is given more than once")
        seen.add(guid)
    return entries


def cmd_secret(args: argparse.Namespace) -> int:
    import base64
    from pathlib import Path

    from sevhook.files import write_private_file
    from sevhook.sev.measurement import LAUNCH_MEASUREMENT_SIZE, MEASUREMENT_SIZE
    from sevhook.sev.secret import SECRET_AREA_SIZE, SecretTable, wrap_secret
    from sevhook.sev.session import read_key_file

    if (args.api_major is None) != (args.api_minor is None):
        raise UsageError("give both --api-major and --api-minor, or neither (API >= 0.17 form)")
    try:
        measurement = decode_base64(args.measurement)
    except FormatError as exc:
        raise UsageError(f"--measurement: not valid base64: {exc.message}") from exc
    if len(measurement) not in (MEASUREMENT_SIZE, LAUNCH_MEASUREMENT_SIZE):
        raise UsageError(f"--measurement: {len(measurement)} bytes; give the 48-byte launch measurement "
                         "(or its 32-byte measurement part) as base64")
    iv = None
    if args.iv:
        try:
            iv = decode_base64(args.iv)
        except FormatError as exc:
            raise UsageError(f"--iv: not valid base64: {exc.message}") from exc
        if len(iv) != 16:
            raise UsageError(f"--iv: {len(iv)} bytes, expected 16")
    tek = read_key_file(args.tek, "TEK")
    tik = read_key_file(args.tik, "TIK")
    _check_measurement_for_secret(args, measurement, tik)
    table = SecretTable(tuple(_secret_entries(args))).build()
    if len(table) > SECRET_AREA_SIZE:
        raise FormatError(f"secret table is {len(table)} bytes; OVMF's secret area holds {SECRET_AREA_SIZE}")
    header, ciphertext = wrap_secret(tek, tik, measurement[:MEASUREMENT_SIZE], table, iv=iv,
                                     api_major=args.api_major, api_minor=args.api_minor)
    result = {"header": base64.b64encode(header.to_bytes()).decode(), "secret": base64.b64encode(ciphertext).decode()}
    if args.out_dir:
        out = Path(args.out_dir)
        if not out.is_dir():
            raise UsageError(f"--out-dir {out}: no such directory")
        files = {
            "secret_header.bin": header.to_bytes(),
            "secret_payload.bin": ciphertext,
            "secret_header.b64": result["header"].encode(),
            "secret_payload.b64": result["secret"].encode(),
        }
        for name, data in files.items():
            write_private_file(out / name, data)
        print(f"wrote {', '.join(str(out / name) for name in files)}", file=sys.stderr)
    print(json.dumps(result))
    return 0


def cmd_owner_help(args: argparse.Namespace) -> int:
    args.owner_parser.print_help(sys.stderr)
    return 2


def _parser(subparsers: argparse._SubParsersAction, name: str, help_text: str, epilog: str) -> argparse.ArgumentParser:
    return subparsers.add_parser(
        name, help=help_text, description=help_text, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def _add_chain_sources(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ark", metavar="FILE", help="AMD ARK, or AMD's ask_ark_<gen>.cert (ASK then ARK)")
    parser.add_argument("--ask", metavar="FILE", help="AMD ASK, when --ark holds the ARK alone")
    parser.add_argument("--trust-anchor", metavar="FILE", action="append",
                        help="trust this non-AMD ARK (file name = its name); repeatable")


def _add_json(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--json", action="store_true", help=help_text)


def _add_launch_inputs(parser: argparse.ArgumentParser, required: bool) -> None:
    """What the expected launch digest comes from: the digest itself, or the firmware and boot inputs."""
    source = parser.add_mutually_exclusive_group(required=required)
    source.add_argument("--launch-digest", metavar="HEX", help="expected SHA-256 launch digest")
    source.add_argument("--firmware", metavar="FILE", help="OVMF image to compute the launch digest from")
    parser.add_argument("--kernel", metavar="FILE", help="kernel for measured direct boot")
    parser.add_argument("--initrd", metavar="FILE", help="initrd for measured direct boot")
    parser.add_argument("--cmdline", metavar="S", help="kernel command line for measured direct boot")
    parser.add_argument("--vmsa", metavar="FILE", action="append",
                        help="SEV-ES VMSA page (4096 bytes); repeat per vCPU")


def register(subparsers: argparse._SubParsersAction) -> None:  # noqa: PLR0915  (argparse: a statement per option)
    owner = subparsers.add_parser(
        "owner",
        help="guest-owner cryptography: chains, sessions, measurements, secrets",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  sevhook owner verify-chain full_chain.bin\n"
               "  sevhook owner session --pdh pdh.cert --chain full_chain.bin --policy 0x3 --out-dir keys\n",
    )
    owner.set_defaults(func=cmd_owner_help, owner_parser=owner)
    owner_subparsers = owner.add_subparsers(dest="owner_command", metavar="SUBCOMMAND", parser_class=type(owner))

    p = _parser(owner_subparsers, "verify-chain", "verify a platform's certificate chain up to an AMD root",
                "examples:\n  sevhook owner verify-chain full_chain.bin            # sevctl export --full\n"
                "  sevhook owner verify-chain cert_chain.b64 --pdh pdh.b64 --ark ask_ark_milan.cert\n"
                "  sevhook owner verify-chain sim_chain.bin --trust-anchor sim_ark.cert\n"
                "  sevhook owner verify-chain full_chain.bin --json   "
                "# {\"ok\", \"root\", \"links\": [{name, ok, why}]}\n"
                "exit status: 0 valid, 1 invalid, 2 usage error")
    p.add_argument("chain", metavar="CHAIN",
                   help="PDH|PEK|OCA|CEK[|ASK|ARK] or PEK|OCA|CEK (raw or base64)")
    p.add_argument("--pdh", metavar="FILE", help="PDH certificate (raw or base64), for PEK|OCA|CEK chains")
    _add_chain_sources(p)
    _add_json(p, "print {ok, root, links: [{name, ok, why}]} instead of text")
    p.set_defaults(func=cmd_verify_chain)

    p = _parser(owner_subparsers, "session", "make LAUNCH_START files (GODH, session blob, TEK, TIK) for a platform",
                "examples:\n"
                "  sevhook owner session --pdh pdh.cert --chain full_chain.bin --policy 0x3 --out-dir keys --name vm1\n"
                "  sevhook owner session --pdh pdh.b64 --chain cert_chain.b64 --ark ask_ark_milan.cert \\\n"
                "      --policy 0x05 --out-dir keys\n"
                "writes NAME_godh.b64 and NAME_session.b64 (for QEMU dh-cert-file/session-file or libvirt\n"
                "<dhCert>/<session>) and NAME_tek.bin, NAME_tik.bin (keep them secret), all mode 0600;\n"
                "--json prints {policy, policy_description, chain_root, files: {kind: path}} (never the keys)")
    p.add_argument("--pdh", metavar="FILE", required=True, help="the platform's PDH certificate (raw or base64)")
    p.add_argument("--policy", type=number_type("--policy"), metavar="N", required=True,
                   help="guest policy, decimal or 0x-hex")
    p.add_argument("--out-dir", metavar="DIR", required=True, help="existing directory for the four files")
    p.add_argument("--name", default=DEFAULT_SESSION_NAME, help=f"file-name prefix (default {DEFAULT_SESSION_NAME})")
    p.add_argument("--chain", metavar="FILE", help="certificate chain proving the PDH (as for verify-chain)")
    _add_chain_sources(p)
    p.add_argument("--insecure-skip-chain", action="store_true",
                   help="make a session without verifying the PDH (tests only)")
    _add_json(p, "print the policy and the files written as JSON")
    p.set_defaults(func=cmd_session)

    p = _parser(owner_subparsers, "verify-measurement", "check a LAUNCH_MEASURE result against expected inputs",
                "examples:\n"
                "  sevhook owner verify-measurement --measurement \"$(virsh domlaunchsecinfo vm1 | ...)\" \\\n"
                "      --tik keys/vm1_tik.bin --api-major 1 --api-minor 40 --build-id 40 --policy 0x3 \\\n"
                "      --firmware /usr/share/OVMF/OVMF.amdsev.fd --kernel vmlinuz --initrd initrd.img \\\n"
                "      --cmdline 'console=ttyS0'\n"
                "  sevhook owner verify-measurement --measurement B64 --tik tik.bin --api-major 0 --api-minor 24 \\\n"
                "      --build-id 15 --policy 0 --launch-digest e3b0c442...\n"
                "--json prints {launch_digest, expected, actual, match} instead of text; measurements in base64\n"
                "as libvirt prints them (measurement || mnonce), in hex with --hex\n"
                "exit status: 0 match, 1 mismatch, 2 usage error")
    p.add_argument("--measurement", metavar="B64", required=True, help="base64 of measurement||mnonce (48 bytes)")
    p.add_argument("--tik", metavar="FILE", required=True, help="the session's 16-byte TIK file")
    p.add_argument("--api-major", type=number_type("--api-major"), metavar="N", required=True,
                   help="platform API major")
    p.add_argument("--api-minor", type=number_type("--api-minor"), metavar="N", required=True,
                   help="platform API minor")
    p.add_argument("--build-id", type=number_type("--build-id"), metavar="N", required=True, help="platform build id")
    p.add_argument("--policy", type=number_type("--policy"), metavar="N", required=True, help="guest policy")
    _add_launch_inputs(p, required=True)
    _add_json(p, "print {launch_digest, expected, actual, match} instead of text")
    p.add_argument("--hex", action="store_true", help="print the measurements in hex (default base64, as libvirt)")
    p.set_defaults(func=cmd_verify_measurement)

    p = _parser(owner_subparsers, "secret",
                "wrap secrets for LAUNCH_SECRET, checking the measurement first when the expected launch is given",
                "examples:\n  sevhook owner secret --tek keys/vm1_tek.bin --tik keys/vm1_tik.bin --measurement B64 \\\n"
                "      --api-major 1 --api-minor 40 --build-id 40 --policy 0x3 --firmware OVMF.amdsev.fd \\\n"
                "      --disk-passphrase luks.txt --out-dir keys\n"
                "  sevhook owner secret --tek tek.bin --tik tik.bin --measurement B64 \\\n"
                "      --secret 736869e5-84f0-4973-92ec-06879ce3da0b:pass_with_nul.bin\n"
                "prints {\"header\": base64, \"secret\": base64} for QMP sev-inject-launch-secret or\n"
                "virDomainSetLaunchSecurityState; --out-dir also writes secret_header/secret_payload .bin and .b64.\n"
                "With --launch-digest or --firmware (and --api-major/--api-minor/--build-id/--policy) the measurement\n"
                "is checked as verify-measurement does, and a mismatch exits 1 with nothing printed or written.\n"
                "Without them the measurement is NOT checked (a warning says so): verify it first.\n"
                "exit status: 0 wrapped, 1 measurement mismatch or bad input, 2 usage error")
    p.add_argument("--tik", metavar="FILE", required=True, help="the session's 16-byte TIK file")
    p.add_argument("--tek", metavar="FILE", required=True, help="the session's 16-byte TEK file")
    p.add_argument("--measurement", metavar="B64", required=True,
                   help="the launch measurement (base64; all 48 bytes when it is to be checked)")
    p.add_argument("--secret", metavar="GUID:FILE", action="append", help="an entry: the file's bytes as they are")
    p.add_argument("--disk-passphrase", metavar="FILE",
                   help="grub/LUKS passphrase (GUID 736869e5-...): one trailing newline dropped, NUL added")
    p.add_argument("--iv", metavar="B64", help="16-byte IV (default: random)")
    p.add_argument("--api-major", type=number_type("--api-major"), metavar="N",
                   help="platform API major (with --api-minor; < 0.17 "
                   "selects the older MAC)")
    p.add_argument("--api-minor", type=number_type("--api-minor"), metavar="N", help="platform API minor")
    p.add_argument("--build-id", type=number_type("--build-id"), metavar="N",
                   help="platform build id (to check the measurement)")
    p.add_argument("--policy", type=number_type("--policy"), metavar="N",
                   help="guest policy (to check the measurement)")
    _add_launch_inputs(p, required=False)
    p.add_argument("--out-dir", metavar="DIR", help="also write header and payload files here (0600)")
    p.set_defaults(func=cmd_secret)

    try:
        measure = importlib.import_module("sevhook.commands.measure")
    except ImportError as exc:
        if exc.name != "sevhook.commands.measure":
            raise
    else:  # `owner measure` and `owner diagnose-mismatch` live with the launch-digest code
        measure.register_owner_subcommands(owner_subparsers)
