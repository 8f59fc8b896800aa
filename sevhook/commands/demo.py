"""`sevhook demo`: the attested launch end to end on a simulated SEV platform, in a few seconds."""

from __future__ import annotations

import argparse

from sevhook.console import Console

EPILOG = """examples:
  sevhook demo
  sevhook demo --keep          keep the temporary directory (domain XML, firmware, logs) for a look
  sevhook demo | cat           plain lines instead of colour

What it does, with no SEV hardware, no libvirt and no network (all on loopback, in a temporary
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
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sevhook.flow.demo import run_demo  # the broker, uvicorn, cryptography

    return 0 if run_demo(Console(), keep=args.keep).passed else 1
