"""`sevhook hook install|uninstall|run` (the libvirt hook) and `sevhook prepare-domain`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sevhook.commands.arguments import config_defaults
from sevhook.config import MODES
from sevhook.hook.install import (
    DEFAULT_HOOKS_DIR,
    DEFAULT_PREFIX,
    checkout_install,
    install,
    installed_python,
    uninstall,
)

HOOK_EPILOG = """examples:
  sevhook hook install                      # /etc/libvirt/hooks/qemu.d/50-sevhook, then restart libvirtd
  sevhook hook install --log /var/log/sevhook/hook.log
  sevhook hook uninstall
  sevhook hook run guest1 started begin - < guest1.xml   # what libvirtd runs

Start attested guests paused, so that the hook can attest them before their first instruction:
  virsh start --paused guest1
See docs/hook.md."""

PREPARE_EPILOG = """examples:
  sevhook prepare-domain guest1.xml --broker https://kbs.example.org:8700 --guest guest1 \\
      --token-file /etc/sevhook/host1.token --ca-file /etc/sevhook/kbs-ca.pem -o guest1.prepared.xml
  sevhook prepare-domain guest1.xml --guest guest1 -o guest1.prepared.xml   # the rest from [host] in sevhook.toml
  sevhook prepare-domain guest1.xml --broker http://127.0.0.1:8700 --guest guest1 \\
      --platform-export /var/lib/sevhook-sim/export -o guest1.prepared.xml
  virsh define guest1.prepared.xml && virsh start --paused guest1
  virsh dumpxml --inactive guest1 | sevhook prepare-domain - --broker URL --guest guest1 -o guest1.xml

The host's PDH and certificate chain come from libvirt (getSEVInfo, -c URI) or from a file or
directory written by `sevhook sim platform export`. The output validates with `sevhook validate`."""


def register(subparsers: argparse._SubParsersAction) -> None:
    hook = subparsers.add_parser(
        "hook",
        help="install, remove or run the libvirt hook that attests SEV guests",
        description="The libvirt hook (qemu.d/50-sevhook): for guests with <launchSecurity type='sev'> and "
        "sevhook metadata, started paused, it reads the launch measurement, asks the guest owner's key broker "
        "for the verdict, injects the secret and resumes the guest; any failure leaves it shut off.",
        epilog=HOOK_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = hook.add_subparsers(dest="hook_command", metavar="ACTION", required=True)
    install = actions.add_parser(
        "install", help="write <hooks-dir>/qemu.d/50-sevhook",
        description="Install the hook script. libvirtd reads hooks at start-up: restart it afterwards.",
        epilog="example:\n  sevhook hook install --hooks-dir /etc/libvirt/hooks",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    install.add_argument("--hooks-dir", type=Path, default=None, help="libvirt's hooks directory "
                         "(default /etc/libvirt/hooks)")
    install.add_argument("--python", type=Path, metavar="PATH",
                         help="the interpreter of the sevhook installation the hook runs (default: this one; from "
                              "a checkout, /opt/sevhook/bin/python when scripts/install made it)")
    install.add_argument("--log", metavar="FILE|syslog", help="where the hook logs its steps "
                         "(default /var/log/sevhook/hook.log, syslog if that cannot be opened)")
    install.set_defaults(func=_install)
    uninstall = actions.add_parser(
        "uninstall", help="remove <hooks-dir>/qemu.d/50-sevhook",
        description="Remove the hook script sevhook installed, then restart libvirtd.",
        epilog="example:\n  sevhook hook uninstall --hooks-dir /etc/libvirt/hooks",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    uninstall.add_argument("--hooks-dir", type=Path, default=None, help="libvirt's hooks directory")
    uninstall.set_defaults(func=_uninstall)
    run = actions.add_parser(
        "run", help="run the hook as libvirtd does (domain XML on stdin)",
        description="Run one hook call: NAME OP SUBOP EXTRA, the domain XML on standard input. Exit 0 when the "
        "operation may go on, 1 (with one line per reason on stderr) when it must not.",
        epilog="example:\n  virsh dumpxml guest1 | sevhook hook run guest1 prepare begin -",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # one positional each: argparse cannot show a tuple metavar for a positional with nargs=4
    run.add_argument("hook_name", metavar="NAME", help="the domain's name")
    run.add_argument("hook_op", metavar="OP", help="libvirt's operation, e.g. prepare, start, started, release")
    run.add_argument("hook_subop", metavar="SUBOP", help="libvirt's sub-operation, e.g. begin or end")
    run.add_argument("hook_extra", metavar="EXTRA", help="libvirt's extra argument, usually -")
    run.set_defaults(func=_run)

    prepare = subparsers.add_parser(
        "prepare-domain",
        help="get a launch from the key broker and make a domain attestable by the hook",
        description="Ask the key broker for a launch of GUEST on this host's SEV platform, write the GODH "
        "certificate and session into <launchSecurity>, add the sevhook metadata and the hook's private QMP "
        "monitor (<qemu:commandline>), and validate the result.",
        epilog=PREPARE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prepare.add_argument("domain_xml", metavar="DOMAIN.xml", help="the domain XML to prepare, or - for "
                         "standard input (e.g. from `virsh dumpxml --inactive`)")
    prepare.add_argument("--broker", metavar="URL", help="the guest owner's key broker (default: [host] broker-url)")
    prepare.add_argument("--guest", required=True, metavar="ID", help="the guest's id at the broker")
    source = prepare.add_mutually_exclusive_group()
    source.add_argument("-c", "--connect", metavar="URI", help="libvirt URI to read the host's SEV platform from "
                        "(default: libvirt's default URI)")
    source.add_argument("--platform-export", metavar="DIR|FILE", type=Path,
                        help="the platform's certificates and chip id from `sevhook platform export` (or "
                             "`sevhook sim platform export`) instead of the platform cache "
                             "/var/lib/sevhook/platform or libvirt")
    prepare.add_argument("--socket", metavar="PATH", help="the private QMP socket "
                         "(default /run/sevhook/NAME.qmp)")
    prepare.add_argument("--timeout", type=float, default=30.0, metavar="S",
                         help="seconds the hook may spend attesting the guest (default 30)")
    prepare.add_argument("--token-file", type=Path, metavar="F", help="the host's bearer token for the broker")
    prepare.add_argument("--ca-file", type=Path, metavar="F", help="CA certificate (PEM) of an https broker")
    prepare.add_argument("-o", "--output", type=Path, metavar="OUT", help="write here (default: standard output)")
    prepare.add_argument("--mode", choices=MODES,
                         help="who attests each start: the emulator wrapper sevhook-qemu (default: mode in "
                         "[host] of sevhook.toml, else emulator), the libvirt hook (virsh start --paused), or "
                         "`sevhook start` (docs/emulator.md)")
    prepare.add_argument("--qemu", metavar="PATH", help="emulator mode: the QEMU sevhook-qemu runs (default "
                         "/usr/bin/qemu-system-x86_64; sevhook-sim-qemu on hosts without SEV)")
    prepare.set_defaults(func=_prepare)
    config_defaults(prepare, required=("broker",), broker="host.broker-url", token_file="host.token-file",
                    ca_file="host.ca-file", platform_export="host.platform-export", mode="host.mode")


def _hooks_dir(args: argparse.Namespace) -> Path:
    return args.hooks_dir or DEFAULT_HOOKS_DIR


def _install(args: argparse.Namespace) -> int:
    checkout = checkout_install()
    python = args.python or (installed_python() if checkout is not None else None)
    path = install(_hooks_dir(args), log_target=args.log, python=str(python) if python else None)
    print(f"installed {path} (runs {python or sys.executable})")
    if checkout is not None and python is None:
        print(f"sevhook: warning: the hook runs sevhook from the checkout {checkout} (an editable install), so "
              "changing or moving the checkout changes the hook; for real use install sevhook with "
              f"scripts/install (it goes to {DEFAULT_PREFIX}, which the hook then uses)", file=sys.stderr)
    print("libvirtd reads hooks when it starts: restart it now (e.g. `systemctl restart libvirtd`), "
          "then start attested guests with `virsh start --paused NAME`")
    return 0


def _uninstall(args: argparse.Namespace) -> int:
    path = uninstall(_hooks_dir(args))
    if path is None:
        print("no sevhook hook is installed there; nothing to do")
    else:
        print(f"removed {path}; restart libvirtd so that it forgets the hook")
    return 0


def _run(args: argparse.Namespace) -> int:
    from sevhook.hook.fast import main  # the hook's hot path: nothing else loaded

    return main([args.hook_name, args.hook_op, args.hook_subop, args.hook_extra])


def _prepare(args: argparse.Namespace) -> int:
    from sevhook.hook.prepare import prepare_domain_file  # lxml, cryptography, the broker client

    warnings = prepare_domain_file(
        args.domain_xml, broker_url=args.broker, guest_id=args.guest, uri=args.connect,
        platform_export=args.platform_export, socket=args.socket, timeout=args.timeout,
        token_file=args.token_file, ca_file=args.ca_file, output=args.output, mode=args.mode, qemu=args.qemu,
    )
    for warning in warnings:
        print(f"sevhook: {warning}", file=sys.stderr)
    return 0
