"""`sevhook demo` through real libvirtd: an emulator-mode guest (its <emulator> is sevhook-qemu, in
front of the software platform's QEMU stand-in) started with a plain `virsh start`, attested at
every start with a fresh launch, and a guest with tampered firmware refused with sevhook-qemu's
reason in libvirt's error. Everything else is as in the libvirt-free demo (sevhook.flow.demo): the
software SEV platform, its simulated AMD KDS and the guest owner's broker, on loopback, in a
temporary directory; libvirtd is the host's (`scripts/run demo` starts it as the test command does).

No hook is installed and no global file is written: the domains' <emulator> is a small script in
the work directory that points sevhook-qemu at the demo's own emulator.conf (libvirtd starts
emulators with an empty environment, so the setting travels in the script)."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lxml import etree

from sevhook.console import Console
from sevhook.errors import SevhookError
from sevhook.flow.demo import GUEST_ID, POLICY, fingerprint, secret_values, work_directory
from sevhook.flow.firmware import demo_firmware, tampered
from sevhook.flow.report import StepPrinter, format_seconds
from sevhook.hook.prepare import prepare_domain_file, wrapper_path
from sevhook.launch.steps import FAILED, StepFailed, StepResult, Steps
from sevhook.sim.guest import GuestRecorder
from sevhook.sim.state import StateDir
from sevhook.sim.world import LocalWorld, standin_command
from sevhook.virt import libvirt_module, open_connection
from sevhook.wrapper.config import CONFIG_ENV

RUNNING_TIMEOUT = 60.0
DOMAIN_PREFIX = "sevhook-demo-"


@dataclass(frozen=True)
class LibvirtDemoResult:
    restarted_attested: bool  # two plain starts, each attested with its own launch
    tampered_refused: bool
    seconds: float

    @property
    def passed(self) -> bool:
        return self.restarted_attested and self.tampered_refused


class LibvirtDemo:
    """One run in `work` against the libvirt at `uri`; its domains are removed afterwards."""

    def __init__(self, console: Console, work: Path, uri: str) -> None:
        self.console = console
        self.work = work
        self.uri = uri
        self.steps = Steps(StepPrinter(console))
        self.world = LocalWorld(work)
        self.secret_value = secrets.token_urlsafe(24).encode() + b"\0"
        self.run_id = uuid.uuid4().hex[:6]
        self.connection: Any = None
        self.names: list[str] = []

    def run(self) -> LibvirtDemoResult:
        attested = refused = False
        self.console.line("sevhook demo: plain `virsh start` of an attested SEV guest through real libvirtd "
                          "(software SEV platform, no SEV hardware)", "step")
        try:
            self.console.line("1. the guest owner, the host and the domain", "step")
            firmware, emulator = self._setup()
            name = self._define("web", firmware, emulator)
            self.console.line("2. virsh start, twice: every start a fresh attested launch, no re-define", "step")
            first = self._start_attested(name, "start")
            self._destroy(name)
            second = self._start_attested(name, "restart")
            attested = first != second
            self._destroy(name)
            self.console.line("3. the same guest with tampered firmware", "step")
            bad = self._define("tampered", self._tamper(firmware), emulator)
            refused = self._start_refused(bad)
        except StepFailed:
            pass  # the step's line says what failed
        except Exception as exc:  # noqa: BLE001  a bug or a broken installation: one line, no traceback
            self.steps.record(StepResult(self.steps.current or "demo", FAILED, 0.0,
                                         f"internal error ({exc.__class__.__name__}: {exc})"))
        finally:
            self._clean_up()
        result = LibvirtDemoResult(attested, refused, self.steps.elapsed)
        total = format_seconds(result.seconds)
        if result.passed:
            self.console.line(f"PASS: both plain starts were attested with their own launch and got the secret; "
                              f"the tampered guest was refused by sevhook-qemu. Total time {total}.", "ok")
        else:
            self.console.line(f"FAIL: see the failed step above. Total time {total}.", "fail")
        return result

    # -- setup ------------------------------------------------------------------------------------
    def _setup(self) -> tuple[Path, Path]:
        with self.steps.step("platform") as note:
            self.world.create_platform()
            standin = self.work / "qemu-sim"  # libvirtd clears the environment: the state dir goes in argv
            standin.write_text(f"#!/bin/sh\nexec {' '.join(standin_command())} --sim-state-dir "
                               f"{self.world.sim_dir} \"$@\"\n")
            standin.chmod(0o755)
            note.detail = f"software SEV platform in {self.world.sim_dir}, its QEMU stand-in {standin.name}"
        with self.steps.step("firmware") as note:
            firmware = self.work / "OVMF.fd"
            firmware.write_bytes(demo_firmware())
            firmware.chmod(0o644)
            note.detail = "a firmware image with an SEV secret area (it halts at once: nothing to boot)"
        with self.steps.step("broker") as note:
            url = self.world.start_broker(GUEST_ID, firmware, POLICY, self.secret_value)
            note.detail = (f"key broker on {url}, its KDS serving the chip's signed CEK; guest {GUEST_ID} registered "
                           f"with a {len(self.secret_value)}-byte passphrase (sha256 {fingerprint(self.secret_value)})")
        with self.steps.step("platform export") as note:
            cache = self.work / "platform"
            done = subprocess.run([sys.executable, "-m", "sevhook.cli", "platform", "export", "--emulator",
                                   str(standin), "--out-dir", str(cache)], capture_output=True, text=True,
                                  timeout=120, check=False)
            if done.returncode != 0:
                raise SevhookError(done.stderr.strip() or "sevhook platform export failed")
            note.detail = (f"`sevhook platform export --emulator`: PDH, chain (CEK unsigned) and chip id in "
                           f"{cache.name}/")
        with self.steps.step("emulator") as note:
            conf = self.work / "emulator.conf"
            conf.write_text(f"qemu = {standin}\nplatform-cache = {cache}\n")
            emulator = self.work / "sevhook-qemu"
            emulator.write_text(f"#!/bin/sh\n{CONFIG_ENV}={conf} exec {wrapper_path()} \"$@\"\n")
            emulator.chmod(0o755)
            note.detail = f"sevhook-qemu in front of the stand-in (settings in {conf.name})"
        with self.steps.step("libvirt") as note:
            self.connection = open_connection(self.uri)
            note.detail = f"connected to {self.uri} (libvirt {_version(self.connection.getLibVersion())})"
        return firmware, emulator

    def _define(self, label: str, firmware: Path, emulator: Path) -> str:
        name = f"{DOMAIN_PREFIX}{label}-{self.run_id}"
        with self.steps.step(f"define {label}") as note:
            source = self.work / f"{label}.xml"
            source.write_text(_domain_xml(name, firmware))
            prepared = self.work / f"{label}.prepared.xml"
            prepare_domain_file(source, broker_url=self.world.broker.url, guest_id=GUEST_ID,  # type: ignore[union-attr]
                                token_file=self.world.token_file, output=prepared, mode="emulator",
                                qemu=str(self.work / "qemu-sim"))
            root = etree.fromstring(prepared.read_bytes())
            root.find("devices/emulator").text = str(emulator)  # the demo's settings, no global file
            self.connection.defineXML(etree.tostring(root, encoding="unicode"))
            self.names.append(name)
            note.detail = f"`sevhook prepare-domain --mode emulator`, then `virsh define`: domain {name}"
        return name

    def _tamper(self, firmware: Path) -> Path:
        with self.steps.step("firmware") as note:
            changed = self.work / "OVMF.tampered.fd"
            changed.write_bytes(tampered(firmware.read_bytes()))
            changed.chmod(0o644)
            note.detail = "one bit flipped: another launch digest than the owner registered"
        return changed

    # -- starts -----------------------------------------------------------------------------------
    def _start_attested(self, name: str, label: str) -> int:
        """`virsh start NAME`; the launch handle of the attested start."""
        libvirt = libvirt_module()
        with self.steps.step(f"virsh {label}") as note:
            domain = self.connection.lookupByName(name)
            domain.create()
            deadline = time.monotonic() + RUNNING_TIMEOUT
            while domain.state()[0] != libvirt.VIR_DOMAIN_RUNNING:
                if time.monotonic() > deadline:
                    raise SevhookError(f"domain {name} is not running {RUNNING_TIMEOUT:g} s after its start")
                time.sleep(0.05)
            record = self._record(name)
            values = secret_values(record)
            if values != [self.secret_value]:
                raise SevhookError("the secret the software processor received differs from the one registered")
            note.detail = (f"running; sevhook-qemu held libvirt's `cont` until the broker approved launch handle "
                           f"{record['handle']}; the {len(values[0])}-byte passphrase (sha256 "
                           f"{fingerprint(values[0])}) is in the guest's secret area")
        return int(record["handle"])

    def _start_refused(self, name: str) -> bool:
        libvirt = libvirt_module()
        with self.steps.step("virsh start") as note:
            domain = self.connection.lookupByName(name)
            try:
                domain.create()
            except libvirt.libvirtError as exc:
                error = " ".join((exc.get_error_message() or str(exc)).split())
            else:
                raise SevhookError(f"libvirt started {name} although its firmware was tampered with")
            if domain.isActive() or self._record(name, required=False).get("secrets"):
                raise SevhookError(f"{name} is running or received a secret after a refused start")
            reason = error[error.find("sevhook-qemu:"):] if "sevhook-qemu:" in error else error
            note.detail = f"refused, shut off, no secret; virsh says: {reason[:300]}"
        return True

    def _destroy(self, name: str) -> None:
        with self.steps.step("virsh destroy") as note:
            self.connection.lookupByName(name).destroy()
            note.detail = name

    def _record(self, name: str, required: bool = True) -> dict[str, Any]:
        records = [r for r in GuestRecorder.all(StateDir(self.world.sim_dir)) if r.get("label") == name]
        if not records and required:
            raise SevhookError(f"the software processor has no record of {name}")
        return records[0] if records else {}

    def _clean_up(self) -> None:
        libvirt = libvirt_module()
        if self.connection is not None:
            for name in self.names:
                try:
                    domain = self.connection.lookupByName(name)
                    if domain.isActive():
                        domain.destroy()
                    domain.undefine()
                except libvirt.libvirtError:
                    continue
            self.connection.close()
        self.world.close()


def _version(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


def _domain_xml(name: str, firmware: Path) -> str:
    """A plain TCG SEV domain (the stand-in runs it under QEMU's TCG); prepare-domain adds the rest."""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type><loader readonly='yes' type='rom'>{firmware}</loader></os>
  <features><acpi/></features>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator><memballoon model='none'/></devices>
  <launchSecurity type='sev'><policy>{POLICY:#06x}</policy></launchSecurity>
</domain>
"""


def run_libvirt_demo(console: Console, uri: str, keep: bool = False) -> LibvirtDemoResult:
    """Run it in a fresh temporary directory, removed afterwards unless `keep`."""
    work = work_directory()
    work.chmod(0o755)  # QEMU, started by libvirtd, reads the firmware and scripts in it
    try:
        return LibvirtDemo(console, work, uri).run()
    finally:
        if keep:
            console.line(f"files kept in {work}", "info")
        else:
            shutil.rmtree(work, ignore_errors=True)
