"""One simulated world for the demo, the tests and the benchmarks: everything an attested launch
talks to, with no SEV hardware, on loopback, under one directory.

SimWorld: the software SEV platform (`sevhook sim platform init`) and its exported chain, the guest
owner's key broker (a `sevhook broker serve` process trusting the simulated ARK, with a host token
and the guest GUEST_ID registered with its firmware's launch digest and a disk passphrase), and the
QEMU stand-in started with the arguments libvirt would give it for a prepared domain. The host's
platform export comes from the stand-in's query-sev-capabilities (`sevhook platform export
--emulator`), so its CEK is unsigned as real firmware's, and the broker fetches the signed CEK from a
simulated AMD KDS by the chip id prepare-domain sends.

Emulator mode (sevhook-qemu as libvirt's <emulator>) on top of a SimWorld: its platform export cache
(`SimWorld.platform_cache`), plain and emulator-mode domains (`plain_sev_domain`, `emulator_domain`),
and EmulatorConf, the host's emulator.conf naming the stand-in as the QEMU.

LocalWorld: the same world inside this process, for the demo, which runs without a network and
without child processes other than the stand-in: the platform, its KDS, and the broker as a LocalBroker.

StandIn: one stand-in QEMU process (`sevhook-sim-qemu --sim-standalone`), up once its monitor
socket exists, always stopped within a bound. LocalBroker: the real broker (SQLite, the FastAPI
app, uvicorn) served from a thread of this process, for the demo, which runs without a network."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import uvicorn
from lxml import etree

from sevhook.broker.app import create_app, wrap_limits
from sevhook.broker.rules import GuestSpec
from sevhook.broker.server import open_broker
from sevhook.broker.settings import Limits
from sevhook.broker.vault import admin_token_digest
from sevhook.errors import SevhookError
from sevhook.files import write_private_file
from sevhook.hook.prepare import prepare_domain_file
from sevhook.sev.launch_digest import sev_launch_digest
from sevhook.sev.secret import DISK_PASSPHRASE_GUID
from sevhook.sim.guest import GuestRecorder
from sevhook.sim.kds import SimulatedKds
from sevhook.sim.platform import PlatformConfig, SoftwarePlatform, init_platform
from sevhook.sim.state import StateDir
from sevhook.xml.models import SEVHOOK_NS

SEVHOOK = [sys.executable, "-m", "sevhook.cli"]
SIM_QEMU = str(Path(sys.executable).with_name("sevhook-sim-qemu"))  # the stand-in's console script
PASSPHRASE = "correct horse battery staple"
GUEST_ID = "vm"  # the one guest SimWorld registers at its broker; every domain is a launch of it
SIM_ROOT_NAME = "simulated-platform"  # the broker's name for the simulated ARK/ASK
HOST_NAME = "sim-host"
BROKER_START_TIMEOUT = 30.0
LOCAL_BROKER_START_TIMEOUT = 10.0
LOCAL_BROKER_STOP_TIMEOUT = 5.0
STANDIN_START_TIMEOUT = 15.0
STANDIN_STOP_TIMEOUT = 5.0
SYSTEM_QEMU = "/usr/bin/qemu-system-x86_64"


def standin_command() -> list[str]:
    """The stand-in beside this interpreter (the console script), else the module run by it."""
    script = Path(sys.executable).with_name("sevhook-sim-qemu")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "sevhook.sim.qemu_main"]


class StandIn:
    """One stand-in QEMU process."""

    def __init__(self, argv: Sequence[str], monitor: Path, log: Path, timeout: float = STANDIN_START_TIMEOUT) -> None:
        self.argv = [*standin_command(), *argv]
        self.monitor = monitor
        self.log = log
        with open(log, "wb") as stderr:
            self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=stderr, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not monitor.exists():
            if self.process.poll() is not None:
                raise SevhookError(f"the QEMU stand-in exited with status {self.process.returncode}: "
                                   f"{self.error_text() or 'no message'}")
            if time.monotonic() > deadline:
                self.stop()
                raise SevhookError(f"the QEMU stand-in did not open its monitor {monitor} within {timeout:g} s")
            time.sleep(0.005)

    @property
    def pid(self) -> int:
        return self.process.pid

    def error_text(self) -> str:
        try:
            return " ".join(self.log.read_text(errors="replace").split())[:500]
        except OSError:
            return ""

    def kill(self, timeout: float = STANDIN_STOP_TIMEOUT) -> int:
        """SIGKILL, as a crash would end it; returns the exit status."""
        if self.process.poll() is None:
            self.process.kill()
        return self.process.wait(timeout)

    def stop(self, timeout: float = STANDIN_STOP_TIMEOUT) -> int:
        """Terminate (QEMU's SIGTERM behaviour), then kill; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        return self.process.returncode


class LocalBroker:
    """`with LocalBroker(data_dir) as broker:` -> broker.url, broker.service (the Broker, for the
    owner's registrations, as `sevhook broker add-*` do)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.service = open_broker(data_dir, None, create=True)
        self._server = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.url = ""

    def start(self, timeout: float = LOCAL_BROKER_START_TIMEOUT) -> str:
        """Serve on 127.0.0.1 and a free port; returns the URL once the server accepts connections."""
        limits = Limits(rate=0)  # one local client: no rate limit
        app = wrap_limits(create_app(self.service, admin_token_digest(self.data_dir), limits), limits)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        port = self._socket.getsockname()[1]
        config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off",
                                server_header=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="sevhook-local-broker", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise SevhookError(f"the local key broker did not start within {timeout:g} s")
            time.sleep(0.005)
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    def stop(self, timeout: float = LOCAL_BROKER_STOP_TIMEOUT) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout)
            if self._thread.is_alive():  # open keep-alive connections: do not wait for them any longer
                self._server.force_exit = True
                self._thread.join(timeout)
        if self._socket is not None:
            self._socket.close()
        self.service.engine.dispose()
        self._server = self._thread = self._socket = None

    def __enter__(self) -> LocalBroker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def sevhook(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> str:
    """Run a sevhook command as its own process (as an administrator would); its stdout. `env` adds
    to this process's environment."""
    result = subprocess.run([*SEVHOOK, *args], capture_output=True, text=True, timeout=timeout, check=False,
                            env={**os.environ, **env} if env else None)
    if result.returncode != 0:
        raise SevhookError(f"sevhook {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], seconds: float = BROKER_START_TIMEOUT) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SevhookError(f"the key broker exited with status {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SevhookError(f"the key broker did not listen on 127.0.0.1:{port} within {seconds:g} s")


def sev_domain_xml(name: str, firmware: Path, vars_file: Path, emulator: str) -> str:
    """A plain TCG domain with <launchSecurity type='sev'>, before `sevhook prepare-domain`."""
    return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type><loader readonly='yes' type='pflash'>{firmware}</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>{vars_file}</nvram></os>
  <features><acpi/></features>
  <devices><emulator>{emulator}</emulator></devices>
  <launchSecurity type='sev'><cbitpos>47</cbitpos><reducedPhysBits>1</reducedPhysBits>
    <policy>0x0001</policy></launchSecurity>
</domain>
"""


@dataclass
class SimWorld:
    """Everything an attested launch talks to, under `root`."""

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

    @property
    def kds_url(self) -> str:
        return self.kds.url

    @classmethod
    def create(cls, root: Path, firmware_source: Path, sim_dir: Path | None = None) -> SimWorld:
        """`sim_dir`: the software platform's state (default: a new one under `root`; libvirt tests
        pass the stand-in's default, the platform libvirtd's capability probe reports)."""
        sim_dir = sim_dir or root / "sim"
        if not (sim_dir / "pdh.cert").exists():
            sevhook("sim", "platform", "init", "--state-dir", str(sim_dir), "--rsa-bits", "2048")
        (root / "export").mkdir()
        sevhook("sim", "platform", "export", "--state-dir", str(sim_dir), "--out-dir", str(root / "export"))
        sevhook("platform", "export", "--emulator", SIM_QEMU, "--out-dir", str(root / "platform"),
                env={"SEVHOOK_SIM_DIR": str(sim_dir)})
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
        with open(root / "broker.log", "wb") as log:
            broker = subprocess.Popen([*SEVHOOK, "broker", "serve", "--listen", f"127.0.0.1:{port}", "--rate-limit",
                                       "0", "--kds-url", kds.url, *data], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=log)
        wait_for_port(port, broker)
        return cls(root, sim_dir, firmware, token, f"http://127.0.0.1:{port}", broker, kds)

    def register(self, guest_id: str, firmware: Path, policy: str = "0x1") -> None:
        """Another guest at the broker, with `firmware`'s launch digest and the world's passphrase."""
        sevhook("broker", "add-guest", guest_id, "--firmware", str(firmware), "--policy", policy,
                "--disk-passphrase", str(self.root / "passphrase"), "--data-dir", str(self.root / "broker"))

    def emulator_script(self) -> Path:
        """The stand-in with this world's platform, as a domain's <emulator>: libvirt starts emulators with
        a clean environment, so the state directory goes on the command line."""
        script = self.root / "qemu-sim"
        if not script.exists():
            script.write_text(f"#!/bin/sh\nexec {SIM_QEMU} --sim-state-dir {self.sim_dir} \"$@\"\n")
            script.chmod(0o755)
        return script

    def close(self) -> None:
        self.kds.stop()
        if self.broker.poll() is None:
            self.broker.send_signal(signal.SIGTERM)
            try:
                self.broker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.broker.kill()
                self.broker.wait(timeout=10)

    def prepare(self, name: str, socket_path: Path, *, emulator: str | None = None, timeout: float = 10,
                resume: bool = True, firmware: Path | None = None, guest_id: str = GUEST_ID) -> Path:
        """A domain prepared by prepare-domain for a fresh launch of `guest_id` at the broker."""
        source = self.root / f"{name}.xml"
        source.write_text(sev_domain_xml(name, firmware or self.firmware, self.root / f"{name}_VARS.fd",
                                         emulator or SIM_QEMU))
        prepared = self.root / f"{name}.prepared.xml"
        prepare_domain_file(source, broker_url=self.broker_url, guest_id=guest_id, platform_export=self.export,
                            socket=str(socket_path), timeout=timeout, token_file=self.token, output=prepared)
        if not resume:
            text = prepared.read_text().replace("<sevhook:attestation ", "<sevhook:attestation resume='no' ", 1)
            prepared.write_text(text)
        return prepared

    def platform_cache(self, directory: Path) -> Path:
        """The cache `sevhook platform export` writes, in `directory` (root-only): the world's export of the
        stand-in's platform (the firmware's unsigned CEK and the chip id, which the broker resolves at its
        simulated KDS)."""
        if directory != self.export:
            shutil.copytree(self.export, directory)
        directory.chmod(0o700)
        return directory

    def plain_sev_domain(self, name: str, *, firmware: Path | None = None, emulator: str = SYSTEM_QEMU) -> str:
        """An SEV domain with the world's firmware and no sevhook metadata (nothing attests it)."""
        return sev_domain_xml(name, firmware or self.firmware, self.root / f"{name}_VARS.fd", emulator)

    def emulator_domain(self, name: str, *, firmware: Path | None = None, broker_url: str | None = None,
                        token: Path | None = None, timeout: float = 30, qemu: str = SIM_QEMU) -> str:
        """A plain SEV domain made emulator-mode by prepare-domain, with `qemu` (by default the stand-in)
        as the QEMU behind sevhook-qemu (no broker call: every start makes its own launch)."""
        source = self.root / f"{name}.xml"
        source.write_text(self.plain_sev_domain(name, firmware=firmware))
        prepared = self.root / f"{name}.emulator.xml"
        prepare_domain_file(source, broker_url=broker_url or self.broker_url, guest_id=GUEST_ID,
                            token_file=token or self.token, timeout=timeout, output=prepared, mode="emulator",
                            qemu=qemu)
        return prepared.read_text()

    def start_standalone(self, prepared: Path, *, paused: bool = True, firmware: Path | None = None,
                         monitor: bool = True) -> StandIn:
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
        socket_path = root.find(f"metadata/{{{SEVHOOK_NS}}}attestation/{{{SEVHOOK_NS}}}monitor").get("socket")
        # some monitor without the hook's, so that the process is reachable for clean-up
        listening = Path(socket_path if monitor else f"{socket_path}.other")
        args = ["--sim-standalone", "--sim-state-dir", str(self.sim_dir), "-name", f"guest={name}",
                "-machine", "q35,confidential-guest-support=lsec0", "-accel", "tcg", "-m", "128",
                "-drive", f"if=pflash,format=raw,unit=0,file={firmware or self.firmware},readonly=on",
                "-object", sev_object, "-nodefaults", "-display", "none",
                "-qmp", f"unix:{listening},server=on,wait=off"]
        if paused:
            args.append("-S")
        return StandIn(args, listening, self.root / f"{name}.sim.log", timeout=30)

    def secrets(self, name: str) -> list[dict[str, object]]:
        """What the software processor received through LAUNCH_SECRET for the guest's latest launch."""
        entries = json.loads(sevhook("sim", "secrets", "--state-dir", str(self.sim_dir), "--domain", name,
                                     "--json", "--show-values"))
        return [secret for entry in entries for secret in entry.get("secrets", [])]


class EmulatorConf:
    """The host's emulator.conf at `path` (sevhook-qemu reads /etc/sevhook/emulator.conf, since libvirtd
    clears the environment of the emulators it runs) naming the stand-in as the QEMU that answers
    libvirt's probes (so that libvirt sees SEV support) and `cache` as the platform export cache.
    `remove` puts back what was there before, or removes the file if it is still the one written here."""

    def __init__(self, path: Path, cache: Path) -> None:
        self.path = path
        self.text = f"# written by sevhook's simulated world\nqemu = {SIM_QEMU}\nplatform-cache = {cache}\n"
        self.previous = path.read_text() if path.exists() else None

    def install(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(self.text)

    def remove(self) -> None:
        if self.previous is not None:
            self.path.write_text(self.previous)
        elif self.path.exists() and self.path.read_text() == self.text:
            self.path.unlink()


def stop(standins: Sequence[StandIn]) -> None:
    """Kill the stand-ins, as after a crash (their monitor sockets stay behind)."""
    for standin in standins:
        standin.kill()


class LocalWorld:
    """The simulated world in this process, under `work`: `create_platform`, then `start_broker`;
    `close` stops the broker and the platform's simulated AMD KDS."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.sim_dir = work / "sim"
        self.token_file = work / "host.token"
        self.kds: SimulatedKds | None = None  # AMD's KDS for the simulated chip: the signed CEK's only source
        self.broker: LocalBroker | None = None
        self._platform: SoftwarePlatform | None = None

    @property
    def platform(self) -> SoftwarePlatform:
        if self._platform is None:
            raise SevhookError("the simulated platform is not set up yet: call create_platform() first")
        return self._platform

    def create_platform(self, rsa_bits: int = 2048) -> SoftwarePlatform:
        """A new software SEV platform with its own root of trust (RSA-2048 roots, as on Naples, are
        fast to make; `sevhook sim platform init` makes RSA-4096 ones by default)."""
        self._platform, _ = init_platform(StateDir(self.sim_dir), PlatformConfig(), rsa_bits=rsa_bits)
        self.kds = SimulatedKds([self.sim_dir]).start()
        return self._platform

    def start_broker(self, guest_id: str, firmware: Path, policy: int, secret: bytes) -> str:
        """The guest owner's broker on loopback, trusting the simulated ARK, with a host token in
        `token_file` and `guest_id` registered with the firmware's launch digest, `policy` and
        `secret` as its disk passphrase; returns its URL."""
        broker = LocalBroker(self.work / "broker")
        try:
            url = broker.start()
            if self.kds is not None:  # the firmware exports its CEK unsigned, as real SEV firmware does
                broker.service.store.ceks.configure(self.kds.url)
            service = broker.service.admin
            service.add_root(SIM_ROOT_NAME, self.platform.cert("ask") + self.platform.cert("ark"), test=True)
            write_private_file(self.token_file, (service.add_host(HOST_NAME) + "\n").encode())
            service.add_guest(GuestSpec(guest_id=guest_id, digests=(sev_launch_digest(firmware),), policies=(policy,),
                                        secrets=((DISK_PASSPHRASE_GUID, secret),),
                                        digest_labels=(f"computed from {firmware.name}",)))
        except BaseException:
            broker.stop()
            raise
        self.broker = broker
        return url

    def processor_record(self, name: str) -> dict[str, object]:
        """What the software processor recorded for guest `name` (its launch, state and secrets)."""
        records = [record for record in GuestRecorder.all(StateDir(self.sim_dir)) if record.get("label") == name]
        if not records:
            raise SevhookError(f"the software processor has no record of guest {name}")
        return records[0]

    def close(self) -> None:
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
        if self.kds is not None:
            self.kds.stop()
            self.kds = None
