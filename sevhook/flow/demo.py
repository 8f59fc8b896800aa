"""`sevhook demo`: the whole attested launch on a simulated platform, with no SEV hardware, no
libvirt and no network (everything on loopback in one temporary directory):

  setup     a software SEV platform, a firmware image, the guest owner's key broker with the guest
            (its launch digest and a secret) registered, and the platform chain checked against the
            simulated ARK, trusted explicitly
  good      a fresh launch session, the domain XML written and validated, the QEMU arguments libvirt
            would pass, the QEMU stand-in started paused, the hook's attestation path over its private
            monitor, and the software processor's record that the secret arrived intact
  tampered  the same guest with one bit of its firmware changed: the broker refuses the measurement,
            no secret is injected, and the guest is destroyed

It passes only if the good launch got its secret intact AND the tampered one was refused. No secret
value is printed: only its length and a SHA-256 prefix."""

from __future__ import annotations

import base64
import hashlib
import secrets
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sevhook.console import Console
from sevhook.encoding import decode_base64
from sevhook.errors import SevhookError
from sevhook.flow.firmware import demo_firmware, tampered
from sevhook.flow.report import StepPrinter, format_seconds
from sevhook.hook.plan import launch_request, managed_guest
from sevhook.hook.prepare import PreparedLaunch, apply_launch, serialize
from sevhook.launch.checks import Deadline
from sevhook.launch.qmp_port import MonitorPort
from sevhook.launch.sequence import AttestedLaunch, create_launch
from sevhook.launch.steps import FAILED, StepFailed, StepResult, Steps
from sevhook.monitor.qmp import QmpMonitor
from sevhook.qemu_cmdline.libdir import write_files
from sevhook.qemu_cmdline.qemu_version import QemuVersion
from sevhook.qemu_cmdline.translate import CmdlineOptions, translate
from sevhook.sev.certs import AmdCertificate
from sevhook.sev.chain import CertificateChain, verify_chain
from sevhook.sev.launch_digest import sev_launch_digest
from sevhook.sev.ovmf import OvmfFooter
from sevhook.sev.roots import TrustAnchor
from sevhook.sim.platform import SoftwarePlatform
from sevhook.sim.world import LocalWorld, StandIn
from sevhook.xml import load_domain
from sevhook.xml.models import BrokerRef
from sevhook.xml.parsing import parse_document

if TYPE_CHECKING:
    from sevhook.broker.client import LaunchGrant
    from sevhook.xml.models import Domain

GUEST_ID = "demo-guest"
POLICY = 0x0003  # NODBG | NOKS: no debugging, no key sharing
DOMAIN_UUID = "5e7d3c2a-9b1f-4e6d-8a0c-2f4b6d8e0a1c"
ATTESTATION_TIMEOUT = 10.0
QEMU_VERSION = (7, 2)
MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class DemoResult:
    good_attested: bool
    tampered_refused: bool
    seconds: float

    @property
    def passed(self) -> bool:
        return self.good_attested and self.tampered_refused


@dataclass(frozen=True)
class LaunchResult:
    attested: bool
    refused_reason: str = ""


def fingerprint(data: bytes) -> str:
    """What the demo shows of a secret: a SHA-256 prefix, never the value."""
    return hashlib.sha256(data).hexdigest()[:16]


def secret_values(record: dict[str, Any]) -> list[bytes]:
    """The secret-table values the software processor received in the guest's (only) LAUNCH_SECRET."""
    received = record.get("secrets") or []
    if len(received) != 1 or not received[0].get("table"):
        raise SevhookError(f"the software processor received {len(received)} secret(s), expected one secret table")
    return [decode_base64(entry["value_b64"]) for entry in received[0]["table"]]


def work_directory() -> Path:
    """A private temporary directory short enough for UNIX socket paths inside it."""
    base = tempfile.gettempdir()
    if len(base) > MAX_SOCKET_PATH - 40:
        base = "/tmp"
    try:
        return Path(tempfile.mkdtemp(prefix="sevhook-demo-", dir=base))
    except OSError as exc:
        raise SevhookError(f"cannot create a temporary directory in {base}: {exc.strerror or exc}; "
                           "point TMPDIR at a writable directory") from exc


class Demo:
    """One demo run in `work` (which it leaves behind only when `keep` is set)."""

    def __init__(self, console: Console, work: Path) -> None:
        self.console = console
        self.work = work
        self.steps = Steps(StepPrinter(console))
        self.world = LocalWorld(work)
        self.secret_value = secrets.token_urlsafe(24).encode() + b"\0"  # a disk passphrase, NUL-terminated

    @property
    def platform(self) -> SoftwarePlatform:
        return self.world.platform

    @property
    def sim_dir(self) -> Path:
        return self.world.sim_dir

    # -- the whole demo ------------------------------------------------------------------------
    def run(self) -> DemoResult:
        good = bad = LaunchResult(False)
        self.console.line("sevhook demo: an attested SEV launch on a simulated platform "
                          "(no SEV hardware, no libvirt, no network)", "step")
        try:
            self._section("1. the guest owner and the host")
            firmware = self._setup_platform_and_firmware()
            with self.steps.step("broker") as note:
                url = self.world.start_broker(GUEST_ID, firmware, POLICY, self.secret_value)
                note.detail = (f"key broker on {url} (SQLite); guest {GUEST_ID} registered with the firmware's "
                               f"launch digest, policy {POLICY:#06x} and a {len(self.secret_value)}-byte disk "
                               f"passphrase (sha256 {fingerprint(self.secret_value)})")
            self._verify_chain()
            self._section("2. attested launch of the guest")
            good = self._launch("good", firmware, url, show_cmdline=True)
            self._section("3. the same guest with tampered firmware")
            changed = self._tamper(firmware)
            bad = self._launch("tampered", changed, url, show_cmdline=False, expect_refusal=True)
        except StepFailed:
            pass  # the step's line already says what failed; the summary says what it means
        except Exception as exc:  # noqa: BLE001  a bug or a broken installation: one line, no traceback
            self.steps.record(StepResult(self.steps.current or "demo", FAILED, 0.0,
                                         f"internal error ({exc.__class__.__name__}: {exc})"))
        finally:
            self.world.close()
        result = DemoResult(good.attested, not bad.attested and bool(bad.refused_reason), self.steps.elapsed)
        self._summary(result)
        return result

    def _section(self, title: str) -> None:
        self.console.line(title, "step")

    def _summary(self, result: DemoResult) -> None:
        total = format_seconds(result.seconds)
        if result.passed:
            self.console.line(f"PASS: the attested guest received its secret intact; the tampered guest was refused "
                              f"and destroyed. Total time {total}.", "ok")
        else:
            what = []
            if not result.good_attested:
                what.append("the good launch was not attested")
            if not result.tampered_refused:
                what.append("the tampered launch was not refused")
            self.console.line(f"FAIL: {'; '.join(what)}. Total time {total}.", "fail")

    # -- setup ----------------------------------------------------------------------------------
    def _setup_platform_and_firmware(self) -> Path:
        with self.steps.step("platform") as note:
            self.world.create_platform()
            config = self.platform.config
            ark = AmdCertificate.parse(self.platform.cert("ark"))
            note.detail = (f"software SEV firmware {config.api_major}.{config.api_minor} build {config.build_id} "
                           f"with its own root of trust (ARK {ark.key_id.hex()[:8]}, not AMD's)")
        with self.steps.step("firmware") as note:
            firmware = self.work / "OVMF.demo.fd"
            firmware.write_bytes(demo_firmware())
            area = OvmfFooter.read(firmware).secret_area
            assert area is not None
            note.detail = (f"{firmware.stat().st_size // 1024} KiB image with an OVMF footer table, secret area "
                           f"{area.base:#x}; launch digest {sev_launch_digest(firmware).hex()[:16]}")
        return firmware

    def _verify_chain(self) -> None:
        platform = self.platform
        with self.steps.step("chain") as note:
            chain = CertificateChain.from_full(platform.full_chain())
            untrusted = verify_chain(chain)
            if untrusted.ok:
                raise SevhookError("the simulated chain verified without a trust anchor: it must never pass for AMD's")
            anchor = TrustAnchor("simulated ARK", AmdCertificate.parse(platform.cert("ark")))
            report = chain.verify((anchor,))
            note.detail = (f"PDH <- PEK <- OCA, CEK <- ASK <- ARK: {len(report.links)} links valid to the "
                           f"{report.root}; without that explicit anchor: refused")

    def _tamper(self, firmware: Path) -> Path:
        with self.steps.step("firmware") as note:
            changed = self.work / "OVMF.tampered.fd"
            changed.write_bytes(tampered(firmware.read_bytes()))
            note.detail = (f"one bit flipped at offset 0x100; launch digest now "
                           f"{sev_launch_digest(changed).hex()[:16]} (registered: "
                           f"{sev_launch_digest(firmware).hex()[:16]})")
        return changed

    # -- one launch -----------------------------------------------------------------------------
    def _launch(self, label: str, firmware: Path, broker_url: str, show_cmdline: bool,
                expect_refusal: bool = False) -> LaunchResult:
        name = GUEST_ID
        socket_path = self.work / f"{label}.qmp"
        grant = self._new_launch(broker_url)
        with self.steps.step("domain XML") as note:
            domain_file, domain = self._write_domain(label, grant, firmware, broker_url, socket_path)
            note.detail = f"{domain_file.name} written and validated with sevhook's schemas: valid"
        with self.steps.step("cmdline") as note:
            argv = self._qemu_argv(domain, label, firmware, socket_path, show_cmdline)
            note.detail = "the -machine and -object arguments libvirt passes for this <launchSecurity>"
        with self.steps.step("launch") as note:
            standin = StandIn(argv, socket_path, self.work / f"{label}.qemu.log")
            note.detail = (f"QEMU stand-in (pid {standin.pid}) started paused (-S): the software processor "
                           f"measured the launch; private QMP monitor {socket_path.name}")
        try:
            refusal = self._attest(domain, socket_path, expect_refusal)
            if not expect_refusal:
                with self.steps.step("secret") as note:
                    note.detail = self._check_secret(self.world.processor_record(name))
                return LaunchResult(True)
            with self.steps.step("refused") as note:
                record = self.world.processor_record(name)
                if refusal is None:
                    raise SevhookError("the tampered launch was attested: the broker accepted a wrong measurement")
                if record.get("secrets"):
                    raise SevhookError("the software processor received a secret for the refused launch")
                status = standin.stop()
                note.detail = (f"the broker refused the measurement; guest destroyed (QEMU exit status {status}), "
                               "the software processor received no secret")
            return LaunchResult(False, refusal)
        finally:
            standin.stop()

    def _new_launch(self, broker_url: str) -> LaunchGrant:
        """The `session` step of sevhook.launch, as `sevhook start` and prepare-domain take it."""
        export = self.platform.pdh_cert_export()
        broker = BrokerRef(broker_url, token_file=str(self.world.token_file))
        return create_launch(self.steps, broker, GUEST_ID, base64.b64encode(export.pdh).decode(),
                             base64.b64encode(export.cert_chain).decode(), Deadline(ATTESTATION_TIMEOUT),
                             cpu0_id_b64=base64.b64encode(self.platform.get_id()).decode())

    def _write_domain(self, label: str, grant: LaunchGrant, firmware: Path, broker_url: str,
                      socket_path: Path) -> tuple[Path, Domain]:
        """What `sevhook prepare-domain` makes of a plain SEV domain, checked with sevhook's validator."""
        config = self.platform.config
        base = f"""<domain type='kvm'>
  <name>{GUEST_ID}</name>
  <uuid>{DOMAIN_UUID}</uuid>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>{firmware}</loader>
  </os>
  <features><acpi/></features>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
  <launchSecurity type='sev'>
    <cbitpos>{config.cbitpos}</cbitpos>
    <reducedPhysBits>{config.reduced_phys_bits}</reducedPhysBits>
    <policy>{POLICY:#06x}</policy>
  </launchSecurity>
</domain>
"""
        path = self.work / f"{label}.xml"
        root = parse_document(base.encode(), str(path)).getroot()
        launch = PreparedLaunch(broker_url=broker_url, guest_id=GUEST_ID, launch_id=grant.launch_id,
                                godh_b64=grant.godh_b64, session_b64=grant.session_b64, policy=grant.policy,
                                socket=str(socket_path), timeout=ATTESTATION_TIMEOUT,
                                token_file=str(self.world.token_file))
        apply_launch(root, launch, str(path))
        path.write_bytes(serialize(root))
        return path, load_domain(path).require_valid()

    def _qemu_argv(self, domain: Domain, label: str, firmware: Path, socket_path: Path, show: bool) -> list[str]:
        lib_dir = self.work / f"lib-{label}"
        options = CmdlineOptions(qemu_version=QemuVersion(*QEMU_VERSION), lib_dir=str(lib_dir))
        translation = translate(domain, options)
        write_files(translation.files)  # dh_cert.base64 and session.base64, 0600, as libvirt writes them
        if show:
            self.steps.info("qemu", f"-machine {translation.machine_text}")
            self.steps.info("qemu", f"-object {translation.object_text}")
        return ["--sim-standalone", "--sim-state-dir", str(self.sim_dir), "-name", f"guest={GUEST_ID}",
                "-machine", "q35,accel=tcg", *translation.argv, "-m", "128", "-smp", "1",
                "-drive", f"if=pflash,format=raw,unit=0,file={firmware},readonly=on", "-nodefaults",
                "-display", "none", "-qmp", f"unix:{socket_path},server=on,wait=off", "-S"]

    def _attest(self, domain: Domain, socket_path: Path, expect_refusal: bool) -> str | None:
        """The hook's `started` sequence (sevhook.launch over the private QMP monitor), its steps shown
        as "hook ..." lines. Returns None, or the broker's refusal of the measurement when one is
        expected; any other failure is a StepFailed."""
        guest = managed_guest(domain)
        assert guest is not None
        request = launch_request(guest)
        deadline = Deadline(request.timeout)
        hook_steps = Steps(lambda result: self.steps.record(replace(result, name=f"hook {result.name}")))
        with self.steps.step("hook monitor") as note:
            monitor = QmpMonitor(socket_path, timeout=deadline.remaining("monitor"))
            note.detail = "connected to the private QMP monitor, as the libvirt hook does"
        try:
            AttestedLaunch(request, MonitorPort(monitor), hook_steps, deadline).run()
        except StepFailed as failure:
            if expect_refusal and failure.step == "attest" and "measurement-mismatch" in failure.reason:
                return failure.message
            raise StepFailed(f"hook {failure.step}", failure.reason) from failure
        finally:
            monitor.close()
        return None

    def _check_secret(self, record: dict[str, object]) -> str:
        """`sevhook sim secrets`, compared with what the owner registered."""
        values = secret_values(record)
        packet = record["secrets"][0]  # type: ignore[index]
        if values != [self.secret_value]:
            raise SevhookError("the secret the software processor received differs from the one registered")
        return (f"the software processor decrypted {packet['length']} bytes into the secret area "
                f"{packet['gpa']:#x}: the {len(values[0])}-byte passphrase (sha256 {fingerprint(values[0])}) "
                "is intact; guest state " + str(record.get("state")))


def run_demo(console: Console, keep: bool = False) -> DemoResult:
    """Run the demo in a fresh temporary directory, removed afterwards unless `keep`."""
    work = work_directory()
    try:
        result = Demo(console, work).run()
    finally:
        if keep:
            console.line(f"files kept in {work}", "info")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return result
