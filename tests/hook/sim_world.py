"""A whole attested-launch world on loopback for the hook's end-to-end tests: the software SEV
platform, its simulated AMD KDS, a real `sevhook broker serve` process trusting it, registered guests,
and launching the QEMU stand-in with the arguments libvirt would give it for a prepared domain.

The realistic path: the host's platform export comes from the stand-in's query-sev-capabilities
(`sevhook platform export --emulator`), so its CEK is unsigned as real firmware's, and the broker
fetches the signed CEK from the KDS by the chip id prepare-domain sends."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from sevhook.hook.prepare import prepare_domain_file
from sevhook.sim.kds import SimulatedKds
from tests.hook.domains import domain_xml

SEVHOOK = [sys.executable, "-m", "sevhook.cli"]
SIM_QEMU = str(Path(sys.executable).with_name("sevhook-sim-qemu"))
PASSPHRASE = "correct horse battery staple"
GUEST_ID = "vm"  # the one guest registered at the broker; every domain is a launch of it


def sevhook(*args: str, timeout: float = 120) -> str:
    result = subprocess.run([*SEVHOOK, *args], capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"sevhook {' '.join(args)} failed: {result.stderr}")
    return result.stdout


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the broker exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"the broker did not listen on {port} within {seconds} s")


@dataclass
class SimWorld:
    """Everything the hook talks to, under one directory."""

    root: Path
    sim_dir: Path
    firmware: Path
    token: Path
    broker_url: str
    broker: subprocess.Popen[bytes]
    kds: SimulatedKds

    @property
    def export(self) -> Path:
        """What the firmware exports (PDH, PEK|OCA|CEK with the CEK unsigned, chip id): no full chain."""
        return self.root / "platform"

    @classmethod
    def create(cls, root: Path, firmware_source: Path, sim_dir: Path | None = None) -> SimWorld:
        """`sim_dir`: the software platform's state (default: a new one under `root`; libvirt tests
        pass the stand-in's default, the platform libvirtd's capability probe reports)."""
        sim_dir = sim_dir or root / "sim"
        if not (sim_dir / "pdh.cert").exists():
            sevhook("sim", "platform", "init", "--state-dir", str(sim_dir), "--rsa-bits", "2048")
        (root / "export").mkdir()
        sevhook("sim", "platform", "export", "--state-dir", str(sim_dir), "--out-dir", str(root / "export"))
        probe = subprocess.run([*SEVHOOK, "platform", "export", "--emulator", SIM_QEMU, "--out-dir",
                                str(root / "platform")], capture_output=True, text=True, timeout=120,
                               env={**os.environ, "SEVHOOK_SIM_DIR": str(sim_dir)})
        assert probe.returncode == 0, probe.stderr
        kds = SimulatedKds([sim_dir]).start()
        data = ["--data-dir", str(root / "broker")]
        sevhook("broker", "init", *data)
        sevhook("broker", "add-root", "sim", "--ca", str(root / "export" / "ask_ark.cert"), "--test", *data)
        token = root / "host.token"
        sevhook("broker", "add-host", "host1", "--token-file", str(token), *data)
        firmware = root / "OVMF.amdsev.fd"
        firmware.write_bytes(firmware_source.read_bytes())
        passphrase = root / "passphrase"
        passphrase.write_text(PASSPHRASE + "\n")
        sevhook("broker", "add-guest", GUEST_ID, "--firmware", str(firmware), "--policy", "0x1",
                "--disk-passphrase", str(passphrase), *data)
        port = free_port()
        broker = subprocess.Popen([*SEVHOOK, "broker", "serve", "--listen", f"127.0.0.1:{port}", "--rate-limit", "0",
                                   "--kds-url", kds.url, *data], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=open(root / "broker.log", "wb"))
        wait_for_port(port, broker)
        return cls(root, sim_dir, firmware, token, f"http://127.0.0.1:{port}", broker, kds)

    def close(self) -> None:
        self.kds.stop()
        if self.broker.poll() is None:
            self.broker.send_signal(signal.SIGTERM)
            try:
                self.broker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.broker.kill()
                self.broker.wait(timeout=10)

    def prepare(self, name: str, socket_path: Path, *, emulator: str = SIM_QEMU, timeout: float = 10,
                resume: bool = True, firmware: Path | None = None, guest_id: str = GUEST_ID) -> Path:
        """A domain prepared by prepare-domain for a fresh launch of `name` at the broker."""
        source = self.root / f"{name}.xml"
        loader = (f"<loader readonly='yes' type='pflash'>{firmware or self.firmware}</loader>"
                  f"<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>{self.root / name}_VARS.fd</nvram>")
        xml = domain_xml(name, socket=str(socket_path), metadata=False, declare_monitor=False, emulator=emulator)
        xml = xml.replace("<os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type></os>",
                          f"<os><type arch='x86_64' machine='q35'>hvm</type>{loader}</os>")
        source.write_text(xml)
        prepared = self.root / f"{name}.prepared.xml"
        prepare_domain_file(source, broker_url=self.broker_url, guest_id=guest_id, platform_export=self.export,
                            socket=str(socket_path), timeout=timeout, token_file=self.token, output=prepared)
        if not resume:
            text = prepared.read_text().replace("<sevhook:attestation ", "<sevhook:attestation resume='no' ", 1)
            prepared.write_text(text)
        return prepared

    def start_standalone(self, prepared: Path, *, paused: bool = True, firmware: Path | None = None,
                         monitor: bool = True) -> subprocess.Popen[bytes]:
        """The stand-in QEMU as libvirt would run it for the prepared domain (files written 0600)."""
        root = etree.parse(str(prepared)).getroot()
        name = root.findtext("name")
        security = root.find("launchSecurity")
        files = self.root / f"{name}-lib"
        files.mkdir(mode=0o700, exist_ok=True)
        for tag, filename in (("dhCert", "dh_cert.base64"), ("session", "session.base64")):
            path = files / filename
            path.write_text(security.findtext(tag))
            path.chmod(0o600)
        sev_object = json.dumps({"qom-type": "sev-guest", "id": "lsec0", "cbitpos": 51, "reduced-phys-bits": 1,
                                 "policy": int(security.findtext("policy"), 16),
                                 "dh-cert-file": str(files / "dh_cert.base64"),
                                 "session-file": str(files / "session.base64")}, separators=(",", ":"))
        socket_path = root.find("metadata/{http://sevhook.org/xmlns/libvirt/1.0}attestation/"
                                "{http://sevhook.org/xmlns/libvirt/1.0}monitor").get("socket")
        args = [SIM_QEMU, "--sim-standalone", "--sim-state-dir", str(self.sim_dir), "-name", f"guest={name}",
                "-machine", "q35,confidential-guest-support=lsec0", "-accel", "tcg", "-m", "128",
                "-drive", f"if=pflash,format=raw,unit=0,file={firmware or self.firmware},readonly=on",
                "-object", sev_object, "-nodefaults", "-display", "none"]
        if monitor:
            args += ["-qmp", f"unix:{socket_path},server=on,wait=off"]
        else:  # some monitor, so that the process is reachable for clean-up, but not the hook's
            args += ["-qmp", f"unix:{socket_path}.other,server=on,wait=off"]
        if paused:
            args.append("-S")
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=open(self.root / f"{name}.sim.log", "wb"))
        expected = Path(socket_path if monitor else f"{socket_path}.other")
        deadline = time.monotonic() + 30
        while not expected.exists():
            if process.poll() is not None:
                raise AssertionError(f"the stand-in exited: {(self.root / f'{name}.sim.log').read_text()}")
            if time.monotonic() > deadline:
                process.kill()
                raise AssertionError("the stand-in did not open its monitor within 30 s")
            time.sleep(0.01)
        return process

    def secrets(self, name: str) -> list[dict[str, object]]:
        """What the software processor received through LAUNCH_SECRET for the guest's latest launch."""
        entries = json.loads(sevhook("sim", "secrets", "--state-dir", str(self.sim_dir), "--domain", name,
                                     "--json", "--show-values"))
        return [secret for entry in entries for secret in entry.get("secrets", [])]


def stop(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)

