"""Why does a launch measurement not match? Try the usual suspects and say which combination matches.

The measurement a host reports is HMAC(TIK, version ‖ policy ‖ LD ‖ mnonce), so every input of the launch
digest can be varied and checked against it: the vCPU count (1-64 by default), the CPU model (its CPUID
signature lands in every VMSA), kernel hashes on or off, the host kernel's VMSA variant (MXCSR/FCW from 6.10),
the SEV features KVM set (DebugSwap on 6.5-6.8 hosts) and the pre-0.17 measurement form. The firmware and
the kernel-hashes table are hashed once; each candidate copies that SHA-256 state and adds only its VMSAs, and
each vCPU count extends the previous one by one page, so thousands of candidates cost a few milliseconds."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from sevhook.errors import UsageError
from sevhook.sev.cpu_types import CpuModel, distinct_models
from sevhook.sev.inputs import BinaryInput
from sevhook.sev.launch_digest import check_boot_inputs, hash_launch_inputs
from sevhook.sev.measurement import LaunchMeasurement, compute_measurement, uses_versioned_form
from sevhook.sev.ovmf import OvmfFooter
from sevhook.sev.policy import SevPolicy
from sevhook.sev.vmsa import BSP_EIP, DEBUG_SWAP, MAX_VCPUS, HostKernel, Vmsa

DEFAULT_MAX_VCPUS = 64
DEFAULT_SEV_FEATURES = (0, DEBUG_SWAP)
_PRE_017 = (0, 16)  # any API below 0.17 selects the short message


@dataclass(frozen=True)
class Candidate:
    """One combination of launch inputs; the SEV-ES fields are None for a plain SEV launch."""

    kernel_hashes: bool
    pre_017_form: bool
    vcpus: int | None = None
    cpu: CpuModel | None = None
    cpu_names: tuple[str, ...] = ()
    host_kernel: HostKernel | None = None
    sev_features: int | None = None

    def to_json(self) -> dict[str, object]:
        """The combination's fields as JSON-ready data (None for the SEV-ES fields of a plain SEV launch)."""
        return {
            "kernel_hashes": self.kernel_hashes,
            "pre_017_form": self.pre_017_form,
            "vcpus": self.vcpus,
            "cpu": None if self.cpu is None else {"family": self.cpu.family, "model": self.cpu.model,
                                                  "stepping": self.cpu.stepping, "signature": self.cpu.signature},
            "cpu_names": list(self.cpu_names),
            "host_kernel": None if self.host_kernel is None else self.host_kernel.value,
            "sev_features": self.sev_features,
        }

    def describe(self) -> str:
        parts = ["kernel hashes " + ("on" if self.kernel_hashes else "off")]
        if self.vcpus is not None and self.cpu is not None and self.host_kernel is not None:
            names = f" ({', '.join(self.cpu_names)})" if self.cpu_names else ""
            parts += [
                f"{self.vcpus} vCPU{'s' if self.vcpus != 1 else ''}",
                f"CPU {self.cpu.describe()}{names}",
                f"host kernel {self.host_kernel.value}" + (" or later" if self.host_kernel is HostKernel.V6_10 else ""),
                f"guest features {self.sev_features:#x}",
            ]
        parts.append("measurement form " + ("pre-0.17 (policy ‖ LD ‖ mnonce)" if self.pre_017_form else "API >= 0.17"))
        return ", ".join(parts)


@dataclass(frozen=True)
class Diagnosis:
    """The candidates that reproduce the measurement (normally one) and what was tried."""

    matches: tuple[tuple[Candidate, bytes], ...]
    tried: int
    searched: tuple[str, ...]
    warnings: tuple[str, ...] = ()
    """Doubts about the inputs (e.g. a firmware without an OVMF footer), printed on stderr by the CLI."""

    def to_json(self) -> dict[str, object]:
        """The matches and a summary of the search, for `owner diagnose-mismatch --json`."""
        return {
            "match": bool(self.matches),
            "tried": self.tried,
            "searched": list(self.searched),
            "matches": [
                {"description": candidate.describe(), "launch_digest": digest.hex(), **candidate.to_json()}
                for candidate, digest in self.matches
            ],
            "warnings": list(self.warnings),
        }

    def report(self) -> list[str]:
        lines = [f"tried {self.tried} combinations: " + "; ".join(self.searched)]
        if not self.matches:
            lines += [
                "no combination reproduces the measurement. Check, in this order:",
                "  - the TIK is the one of this launch's session (NAME_tik.bin written with the session blob);",
                "  - api major/minor and build id are the platform's (virsh domlaunchsecinfo / query-sev), the policy "
                "the guest's exact 32-bit value;",
                "  - the firmware file is the one QEMU loaded (libvirt <loader>), byte for byte;",
                "  - the kernel, initrd and command line are exactly what QEMU got (-kernel/-initrd/-append);",
                "  - with host-passthrough, pass the host's --vcpu-family/--vcpu-model/--vcpu-stepping;",
                "  - more than the searched vCPUs: raise --max-vcpus.",
            ]
            return lines
        for candidate, launch_digest in self.matches:
            lines.append(f"MATCH: {candidate.describe()}")
            lines.append(f"  launch digest {launch_digest.hex()}")
        return lines


def _forms(api_major: int, api_minor: int) -> list[tuple[bool, int, int]]:
    """(pre-0.17?, api major, api minor) pairs: the form the platform's API implies first, then the other."""
    given_pre = not uses_versioned_form(api_major, api_minor)
    forms = [(given_pre, api_major, api_minor)]
    forms.append((False, api_major, api_minor) if given_pre else (True, *_PRE_017))
    return forms


def diagnose_mismatch(  # noqa: PLR0912  (a branch per launch-input variation searched)
    measurement: LaunchMeasurement,
    tik: bytes,
    api_major: int,
    api_minor: int,
    build_id: int,
    policy: int,
    firmware: BinaryInput,
    kernel: BinaryInput | None = None,
    initrd: BinaryInput | None = None,
    cmdline: str | bytes | None = None,
    max_vcpus: int = DEFAULT_MAX_VCPUS,
    extra_cpus: Sequence[CpuModel] = (),
    sev_features: Iterable[int] = DEFAULT_SEV_FEATURES,
) -> Diagnosis:
    """Search the usual launch-input variations for the one that reproduces `measurement`. The policy's ES bit
    decides whether VMSAs were measured (the firmware measures them exactly when the policy asks for SEV-ES)."""
    check_boot_inputs(kernel, initrd, cmdline)
    if not 1 <= max_vcpus <= MAX_VCPUS:
        raise UsageError(f"the largest vCPU count to try must be 1..{MAX_VCPUS}, not {max_vcpus}")
    footer = OvmfFooter.read(firmware)
    es = SevPolicy(policy).es
    reset_eip = footer.require_reset_eip() if es else 0
    searched: list[str] = []
    if kernel is None:
        searched.append("kernel hashes off (no --kernel given)")
    elif footer.hash_table is None:
        searched.append("kernel hashes off only (the firmware has no kernel-hashes area)")
        kernel = initrd = cmdline = None
    else:
        searched.append("kernel hashes on and off")
    firmware_state, hashes = hash_launch_inputs(firmware, footer, kernel, initrd, cmdline)
    prefixes: list[tuple[bool, hashlib._Hash]] = [(False, firmware_state)]
    if hashes is not None:
        with_table = firmware_state.copy()
        with_table.update(hashes.to_bytes())
        prefixes.append((True, with_table))
    forms = _forms(api_major, api_minor)
    searched.append("both measurement forms (API >= 0.17 and pre-0.17)")

    matches: list[tuple[Candidate, bytes]] = []
    tried = 0

    def check(launch_digest: bytes, candidate: Candidate) -> None:
        nonlocal tried
        for pre_017, major, minor in forms:
            tried += 1
            expected = compute_measurement(tik, major, minor, build_id, policy, launch_digest, measurement.mnonce)
            if hmac.compare_digest(expected, measurement.measurement):
                matches.append((replace(candidate, pre_017_form=pre_017), launch_digest))

    if not es:
        searched.append("SEV without VMSAs (the policy has no ES bit)")
        for table, state in prefixes:
            check(state.digest(), Candidate(kernel_hashes=table, pre_017_form=False))
        return Diagnosis(tuple(matches), tried, tuple(searched), tuple(footer.warnings()))

    models = distinct_models()
    for extra in extra_cpus:
        models.setdefault(extra, [])
    feature_values = tuple(dict.fromkeys(sev_features))
    searched.append(
        f"1-{max_vcpus} vCPUs; {len(models)} CPU identities; host kernel old and 6.10; guest features "
        + ", ".join(f"{value:#x}" for value in feature_values)
    )
    for table, state in prefixes:
        for cpu, names in models.items():
            for host_kernel in HostKernel:
                for features in feature_values:
                    running = state.copy()
                    running.update(Vmsa(BSP_EIP, cpu.signature, features, host_kernel).to_bytes())
                    ap_page = Vmsa(reset_eip, cpu.signature, features, host_kernel).to_bytes()
                    for vcpus in range(1, max_vcpus + 1):
                        if vcpus > 1:
                            running.update(ap_page)
                        check(running.copy().digest(), Candidate(
                            kernel_hashes=table, pre_017_form=False, vcpus=vcpus, cpu=cpu, cpu_names=tuple(names),
                            host_kernel=host_kernel, sev_features=features))
    return Diagnosis(tuple(matches), tried, tuple(searched), tuple(footer.warnings()))

