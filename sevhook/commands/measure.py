"""`sevhook owner measure` and `sevhook owner diagnose-mismatch`: expected launch digests from firmware and
boot inputs, and which input differs when a real launch disagrees. Registered under `owner` by owner.py."""

from __future__ import annotations

import argparse
import sys

from sevhook.commands.arguments import number_type
from sevhook.errors import UsageError
from sevhook.sev.cpu_types import CPU_TYPES, CpuModel, cpu_model  # a small table without dependencies

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing, a cost every command start would pay
if TYPE_CHECKING:
    from sevhook.sev.launch_digest import LaunchDigest

MEASURE_EPILOG = """examples:
  sevhook owner measure --firmware OVMF.amdsev.fd
  sevhook owner measure --firmware OVMF.amdsev.fd --kernel vmlinuz --initrd initrd.img --cmdline 'console=ttyS0'
  sevhook owner measure --mode seves --firmware OVMF.amdsev.fd --vcpus 4 --vcpu-type EPYC-Milan --explain
  sevhook owner measure --mode seves --firmware OVMF.fd --vcpus 2 --vcpu-family 25 --vcpu-model 1 \\
      --vcpu-stepping 1 --host-kernel old
  sevhook owner measure --mode sev --firmware OVMF.fd --vmsa vmsa0.bin --vmsa vmsa1.bin
  sevhook owner measure --mode snp --firmware OVMF.amdsev.fd --vcpus 4 --vcpu-type EPYC-Genoa --output-format base64
  sevhook owner measure --firmware OVMF.amdsev.fd --json --explain
The digest is printed alone on the last line (SHA-256 for sev/seves, SHA-384 for snp); --explain first prints the
hash of each measured component (firmware, kernel-hashes table, each VMSA) so two runs can be compared line by line.
--json prints one object instead: digest, algorithm, mode, warnings (and with --explain, firmware and components).
A firmware without an OVMF footer table is measured (as QEMU would) with a warning on stderr.
exit status: 0 digest printed, 1 the inputs cannot be measured, 2 usage error"""

DIAGNOSE_EPILOG = """examples:
  sevhook owner diagnose-mismatch --measurement "$(virsh domlaunchsecinfo guest | awk '/measurement/{print $3}')" \\
      --tik guest_tik.bin --api-major 1 --api-minor 55 --build-id 21 --policy 0x7 \\
      --firmware /usr/share/OVMF/OVMF.amdsev.fd --kernel vmlinuz --initrd initrd.img --cmdline 'console=ttyS0'
  sevhook owner diagnose-mismatch --measurement B64 --tik tik.bin --api-major 0 --api-minor 24 --build-id 15 \\
      --policy 0x3 --firmware OVMF.fd
Tries vCPU counts 1..--max-vcpus, every known EPYC CPU identity (plus --vcpu-type/--vcpu-family... if given),
kernel hashes on and off, host kernel old and 6.10, guest features 0 and 0x20 and both measurement forms.
--json prints {"match", "tried", "searched", "matches": [...], "warnings"} instead of the text report.
exit status: 0 when a combination reproduces the measurement, 1 when none does, 2 usage error."""


def register_owner_subcommands(owner_subparsers: argparse._SubParsersAction) -> None:
    """Add `measure` and `diagnose-mismatch` to the `sevhook owner` family."""
    measure = owner_subparsers.add_parser(
        "measure", help="compute the expected SEV, SEV-ES or SNP launch digest",
        description="Compute the launch digest the AMD secure processor will report for this firmware and these "
                    "boot inputs, streaming every file (constant memory whatever the initrd size).",
        epilog=MEASURE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    measure.add_argument("--mode", choices=("sev", "seves", "snp"), default="sev",
                         help="guest type (default sev; sev with --vmsa measures given VMSA pages)")
    _add_boot_inputs(measure)
    _add_cpu_options(measure)
    measure.add_argument("--vcpus", metavar="N", type=number_type("--vcpus"), help="number of vCPUs (seves, snp)")
    measure.add_argument("--guest-features", metavar="N", type=number_type("--guest-features"),
                         help="SEV features in each VMSA (default 0 for seves, 0x1 for snp)")
    measure.add_argument("--host-kernel", choices=("old", "6.10"), default="6.10",
                         help="host kernel VMSA variant: 6.10 and later set MXCSR/FCW (default), 'old' leaves them 0")
    measure.add_argument("--vmsa", metavar="FILE", action="append", default=[],
                         help="a VMSA page to measure as given, in vCPU order (repeatable; sev/seves)")
    measure.add_argument("--output-format", choices=("hex", "base64"), default="hex",
                         help="digest format (default hex)")
    measure.add_argument("--explain", action="store_true", help="print each measured component's hash first")
    measure.add_argument("--json", action="store_true",
                         help="print one JSON object (digest, algorithm, mode, warnings; components with --explain)")
    measure.set_defaults(func=run_measure)

    diagnose = owner_subparsers.add_parser(
        "diagnose-mismatch", help="find which launch input explains a measurement",
        description="Given the measurement a host reported and the session's TIK, try the usual causes of a "
                    "mismatch and report the combination of inputs that reproduces it, or that none does.",
        epilog=DIAGNOSE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    diagnose.add_argument("--measurement", metavar="B64", required=True,
                          help="base64 of measurement(32) and mnonce(16), as QEMU/libvirt report it")
    diagnose.add_argument("--tik", metavar="FILE", required=True, help="the session's 16-byte TIK file")
    for name, what in (("--api-major", "platform API major"), ("--api-minor", "platform API minor"),
                       ("--build-id", "platform firmware build id"), ("--policy", "the guest's SEV policy")):
        diagnose.add_argument(name, metavar="N", required=True, type=number_type(name),
                              help=f"{what} (decimal or 0x-hex)")
    _add_boot_inputs(diagnose)
    _add_cpu_options(diagnose)
    diagnose.add_argument("--max-vcpus", metavar="N", type=number_type("--max-vcpus"), default=64,
                          help="largest vCPU count to try (default 64)")
    diagnose.add_argument("--json", action="store_true", help="print the matches and the search summary as JSON")
    diagnose.set_defaults(func=run_diagnose)


def _add_boot_inputs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--firmware", metavar="OVMF", required=True, help="the OVMF flash image")
    parser.add_argument("--kernel", metavar="FILE", help="kernel for measured direct boot (-kernel)")
    parser.add_argument("--initrd", metavar="FILE", help="initrd (-initrd; needs --kernel)")
    parser.add_argument("--cmdline", metavar="TEXT", help="kernel command line (-append; needs --kernel)")


def _add_cpu_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vcpu-type", metavar="NAME", help=f"QEMU CPU model, one of: {', '.join(CPU_TYPES)}")
    parser.add_argument("--vcpu-family", metavar="F", type=number_type("--vcpu-family"),
                        help="CPU family (with --vcpu-model/--vcpu-stepping)")
    parser.add_argument("--vcpu-model", metavar="M", type=number_type("--vcpu-model"), help="CPU model number")
    parser.add_argument("--vcpu-stepping", metavar="S", type=number_type("--vcpu-stepping"), help="CPU stepping")


def _warn(messages: tuple[str, ...]) -> None:
    for message in messages:
        print(f"sevhook: warning: {message}", file=sys.stderr)


def _cpu_from_args(args: argparse.Namespace) -> CpuModel | None:
    explicit = (args.vcpu_family, args.vcpu_model, args.vcpu_stepping)
    if args.vcpu_type is not None:
        if any(value is not None for value in explicit):
            raise UsageError("give either --vcpu-type or --vcpu-family/--vcpu-model/--vcpu-stepping, not both")
        return cpu_model(args.vcpu_type)
    if all(value is None for value in explicit):
        return None
    if any(value is None for value in explicit):
        raise UsageError("--vcpu-family, --vcpu-model and --vcpu-stepping go together: give all three")
    return CpuModel(*explicit)


def run_measure(args: argparse.Namespace) -> int:
    from sevhook.sev.launch_digest import measure_sev, measure_seves
    from sevhook.sev.vmsa import SNP_ACTIVE, HostKernel

    cpu = _cpu_from_args(args)
    vcpus, guest_features = args.vcpus, args.guest_features
    builds_vmsas = args.mode == "snp" or (args.mode == "seves" and not args.vmsa)
    if args.vmsa and args.mode == "snp":
        raise UsageError("--vmsa is for sev/seves; SNP VMSAs are built from --vcpus and the CPU type")
    if builds_vmsas:
        if vcpus is None or cpu is None:
            raise UsageError(f"--mode {args.mode} builds one VMSA per vCPU: give --vcpus N and --vcpu-type NAME "
                             "(or --vcpu-family/--vcpu-model/--vcpu-stepping)")
    elif vcpus is not None or cpu is not None or guest_features is not None:
        raise UsageError("--vcpus, the vCPU type and --guest-features only apply when VMSAs are built "
                         "(--mode seves or snp without --vmsa)")
    host_kernel = HostKernel.parse(args.host_kernel)
    kernel_args = (args.kernel, args.initrd, args.cmdline)
    if args.mode == "snp":
        from sevhook.sev.snp import measure_snp

        features = SNP_ACTIVE if guest_features is None else guest_features
        result = measure_snp(args.firmware, vcpus, cpu.signature, *kernel_args, features, host_kernel)
    elif builds_vmsas:
        features = 0 if guest_features is None else guest_features
        result = measure_seves(args.firmware, vcpus, cpu.signature, *kernel_args, features, host_kernel)
    else:
        result = measure_sev(args.firmware, *kernel_args, vmsas=args.vmsa)
    _warn(result.warnings)
    if args.json:
        import json

        print(json.dumps(_measure_json(args, result), indent=2))
        return 0
    if args.explain:
        from sevhook.sev.ovmf import OvmfFooter

        print("\n".join(OvmfFooter.read(args.firmware).describe() + result.explain()))
    if args.output_format == "hex":
        print(result.digest.hex())
    else:
        import base64

        print(base64.b64encode(result.digest).decode())
    return 0


def _measure_json(args: argparse.Namespace, result: LaunchDigest) -> dict[str, object]:
    """`measure --json`: the digest in the chosen format, the mode, and with --explain what was measured."""
    import base64

    data = result.to_json()
    components = data.pop("components")
    data["mode"] = args.mode
    if args.output_format == "base64":
        data["digest"] = base64.b64encode(result.digest).decode()
    data["format"] = args.output_format
    if args.explain:
        from sevhook.sev.ovmf import OvmfFooter

        data["firmware"] = OvmfFooter.read(args.firmware).describe()
        data["components"] = components
    return data


def run_diagnose(args: argparse.Namespace) -> int:
    from sevhook.sev.diagnose import diagnose_mismatch
    from sevhook.sev.measurement import LaunchMeasurement
    from sevhook.sev.session import read_key_file

    measurement = LaunchMeasurement.parse(args.measurement, "--measurement")
    tik = read_key_file(args.tik, "TIK")
    cpu = _cpu_from_args(args)
    diagnosis = diagnose_mismatch(
        measurement, tik,
        args.api_major, args.api_minor, args.build_id, args.policy,
        args.firmware, args.kernel, args.initrd, args.cmdline,
        max_vcpus=args.max_vcpus,
        extra_cpus=(cpu,) if cpu is not None else (),
    )
    _warn(diagnosis.warnings)
    if args.json:
        import json

        print(json.dumps(diagnosis.to_json(), indent=2))
    else:
        print("\n".join(diagnosis.report()))
    return 0 if diagnosis.matches else 1
