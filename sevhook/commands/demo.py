"""`sevhook demo`: the attested launch end to end on a simulated SEV platform, in a few seconds."""

from __future__ import annotations

import argparse

from sevhook.console import Console

EPILOG = """examples:
  sevhook demo                 through libvirtd (qemu:///system): plain virsh starts of an emulator-mode guest
  sevhook demo --no-libvirt    the same attestation with no libvirt: the hook's path on the QEMU stand-in
  sevhook demo --keep          keep the temporary directory (domain XML, firmware, logs) for a look
  sevhook demo | cat           plain lines instead of colour

With libvirt (the default; libvirtd must run, as `scripts/run demo` arranges): a software SEV platform,
its simulated AMD KDS and a local key broker; the platform export cache (`sevhook platform export
--emulator`); a domain made emulator-mode by `sevhook prepare-domain` and defined; a plain
`virsh start`, attested by sevhook-qemu before the guest runs, with the secret delivered; `virsh
destroy` and `virsh start` again, a fresh launch with no re-define; then a domain with tampered
firmware, whose start libvirt refuses with sevhook-qemu's reason. No hook, no global file.

--no-libvirt, with no SEV hardware, no libvirt and no network (all on loopback, in a temporary
directory): creates a software SEV platform, starts a local key broker (SQLite), registers a guest
(launch digest of a generated firmware image, a secret), verifies the platform chain against the
simulated ARK, gets a launch session from the broker, writes and validates the domain XML, shows the
QEMU arguments, starts the QEMU stand-in paused, runs the libvirt hook's attestation path over a
private QMP monitor, and shows from the software processor's side that the secret arrived intact.
Then it launches the same guest with one bit of its firmware changed and shows it refused and
destroyed. Secret values are never printed (length and SHA-256 prefix only).
exit status: 0 when the good launch was attested AND the tampered one refused; 1 otherwise."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run an attested launch and a refused tampered launch on a simulated SEV platform",
        description="The whole attested launch on a software SEV platform: broker, session, domain XML, "
                    "QEMU arguments, paused start, the hook's attestation, secret injection; then a tampered "
                    "launch that is refused.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory and print where it is")
    parser.add_argument("--no-libvirt", action="store_true",
                        help="run without libvirt: the QEMU stand-in started directly, the hook's attestation path")
    parser.add_argument("-c", "--connect", metavar="URI", default="qemu:///system",
                        help="the libvirt to run the guests on (default qemu:///system; it starts them as root)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.no_libvirt:
        from sevhook.flow.demo import run_demo  # the broker, uvicorn, cryptography

        return 0 if run_demo(Console(), keep=args.keep).passed else 1
    from sevhook.flow.libvirt_demo import run_libvirt_demo  # libvirt, the broker, uvicorn, cryptography

    return 0 if run_libvirt_demo(Console(), args.connect, keep=args.keep).passed else 1
