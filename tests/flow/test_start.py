"""`sevhook start` end to end: real libvirtd, the sim's QEMU stand-in in wrapping mode as the domain's
<emulator> (real QEMU 7.2 under it, SEV answered by the software processor), and a real
`sevhook broker serve` process on loopback. Success and each failure path; every failure must exit 1
with one line naming the step and leave the domain shut off (a domain that already runs is left
alone). libvirt's getSEVInfo looks at the host's default QEMU, which has no SEV here, so the platform
chain comes from `--platform` (the sim's export), except in the test of that refusal."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sevhook.flow.firmware import demo_firmware, tampered
from sevhook.sim.world import PASSPHRASE, SimWorld
from sevhook.xml.models import SEVHOOK_NS

libvirt = pytest.importorskip("libvirt")
pytestmark = pytest.mark.timeout(600)

SEVHOOK = [sys.executable, "-m", "sevhook.cli"]
SIM_QEMU = Path(sys.executable).with_name("sevhook-sim-qemu")

RUN = f"{os.getpid()}"


def sevhook(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SEVHOOK, *args], capture_output=True, text=True, timeout=timeout)


def must(*args: str) -> str:
    result = sevhook(*args)
    assert result.returncode == 0, f"sevhook {' '.join(args)}: {result.stderr}"
    return result.stdout


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class World:
    """sevhook.sim.world's SimWorld (platform, export, KDS, broker) with the test libvirtd."""

    sim: SimWorld
    uri: str
    connection: object
    domains: list[str] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return self.sim.root

    @property
    def broker_url(self) -> str:
        return self.sim.broker_url

    @property
    def export(self) -> Path:
        """The firmware's export (CEK unsigned, chip id) from the stand-in's query-sev-capabilities: the
        broker gets the signed CEK from the simulated KDS, as on a real host."""
        return self.sim.export

    def domain_xml(self, name: str, guest_id: str, *, broker_url: str | None = None, sev: bool = True,
                   resume: bool = True, firmware: Path | None = None, timeout: str = "60",
                   private_monitor: bool = False) -> str:
        security = "<launchSecurity type='sev'><policy>0x0001</policy></launchSecurity>" if sev else ""
        monitor = ("<qemu:commandline><qemu:arg value='-qmp'/>"
                   f"<qemu:arg value='unix:/run/sevhook/{name}.qmp,server=on,wait=off'/></qemu:commandline>"
                   if private_monitor else "")
        monitor_metadata = f"<sevhook:monitor socket='/run/sevhook/{name}.qmp'/>" if private_monitor else ""
        return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <metadata>
    <sevhook:attestation xmlns:sevhook='{SEVHOOK_NS}' timeout='{timeout}' resume='{"yes" if resume else "no"}'>
      <sevhook:broker url='{broker_url or self.broker_url}' token-file='{self.root / "host.token"}'/>
      <sevhook:guest id='{guest_id}'/>{monitor_metadata}
    </sevhook:attestation>
  </metadata>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='rom'>{firmware or self.sim.firmware}</loader></os>
  <features><acpi/></features>
  <devices><emulator>{self.root / "qemu-sim"}</emulator><memballoon model='none'/></devices>
  {security}
  {monitor}
</domain>
"""

    def define(self, label: str, guest_id: str, **options: object) -> str:
        name = f"sevhook-flow-{label}-{RUN}"
        self.domains.append(name)
        self.connection.defineXML(self.domain_xml(name, guest_id, **options))  # type: ignore[attr-defined]
        return name

    def destroy_running(self) -> None:
        """Stop every guest the tests started (real QEMU under the stand-in: do not let them pile up)."""
        for name in self.domains:
            try:
                domain = self.connection.lookupByName(name)  # type: ignore[attr-defined]
                if domain.isActive():
                    domain.destroy()
            except libvirt.libvirtError:
                continue

    def state(self, name: str) -> int:
        return self.connection.lookupByName(name).state()[0]  # type: ignore[attr-defined]

    def start(self, name: str, *extra: str, platform: bool = True) -> subprocess.CompletedProcess[str]:
        args = ["start", name, "-c", self.uri, *extra]
        if platform:
            args += ["--platform", str(self.export)]
        return sevhook(*args, timeout=180)

    def secrets(self, name: str) -> list[bytes]:
        """Secret-table values the software processor received for the domain's latest launch."""
        result = sevhook("sim", "secrets", "--state-dir", str(self.sim.sim_dir), "--domain", name, "--json",
                         "--show-values")
        if result.returncode != 0:
            return []
        return [base64.b64decode(entry["value_b64"]) for record in json.loads(result.stdout)
                for secret in record.get("secrets", []) for entry in secret.get("table") or []]


@pytest.fixture(scope="module")
def world(libvirt_uri: str) -> Iterator[World]:
    root = Path(tempfile.mkdtemp(prefix="sevhook-flow-", dir="/tmp"))
    source = root / "demo.fd"
    source.write_bytes(demo_firmware())
    sim = SimWorld.create(root / "world", source)
    for guest in ("good", "json", "paused", "running", "nosev", "broken", "nohost"):
        sim.register(guest, sim.firmware)
    other = sim.root / "other.fd"
    other.write_bytes(tampered(demo_firmware()))
    sim.register("mismatch", other)
    sim.emulator_script()  # root/qemu-sim, every domain's <emulator>
    created = World(sim, libvirt_uri, libvirt.open(libvirt_uri))
    try:
        yield created
    finally:
        _tear_down(created, root)


def _tear_down(world: World, root: Path) -> None:
    """Guests destroyed and undefined (on a fresh connection: libvirtd may have been restarted by
    another test module), the broker stopped, the files removed."""
    try:
        world.connection = _reconnect(world.uri)
        world.destroy_running()
        for name in world.domains:
            try:
                world.connection.lookupByName(name).undefine()  # type: ignore[attr-defined]
            except libvirt.libvirtError:
                continue
        world.connection.close()  # type: ignore[attr-defined]
    finally:
        world.sim.close()
        shutil.rmtree(root, ignore_errors=True)


def _reconnect(uri: str, seconds: float = 30) -> object:
    deadline = time.monotonic() + seconds
    while True:
        try:
            return libvirt.open(uri)
        except libvirt.libvirtError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture(autouse=True)
def stop_guests(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "world" in request.fixturenames:
        request.getfixturevalue("world").destroy_running()


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_attested_start_injects_the_secret_and_runs(world: World) -> None:
    name = world.define("good", "good")
    result = world.start(name)
    assert result.returncode == 0, result.stdout + result.stderr
    steps = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("  ok ")]
    assert steps == ["connect", "metadata", "platform", "session", "define", "start", "measure", "attest",
                     "inject", "resume"]
    assert f"{name}: attested, secret injected, running" in result.stdout
    assert world.state(name) == libvirt.VIR_DOMAIN_RUNNING
    assert world.secrets(name) == [PASSPHRASE.encode() + b"\0"]
    xml = world.connection.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)  # type: ignore[attr-defined]
    assert "<dhCert>" in xml and "<session>" in xml and "launch=" in xml
    assert PASSPHRASE not in result.stdout + result.stderr
    log = Path(f"/var/log/libvirt/qemu/{name}.log")
    if log.exists():  # libvirt's own APIs only: no custom-argv or custom-monitor taint
        assert "custom-argv" not in log.read_text() and "custom-monitor" not in log.read_text()


def test_json_output_is_one_object(world: World) -> None:
    name = world.define("json", "json")
    result = world.start(name, "--json")
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["ok"] is True and outcome["domain"] == name and outcome["failed_step"] is None
    assert outcome["launch_id"]
    assert [step["name"] for step in outcome["steps"]][-1] == "resume"
    assert all(step["status"] == "ok" and step["seconds"] >= 0 for step in outcome["steps"])


def test_resume_no_leaves_the_guest_paused_with_its_secret(world: World) -> None:
    name = world.define("paused", "paused", resume=False)
    result = world.start(name)
    assert result.returncode == 0, result.stderr
    assert world.state(name) == libvirt.VIR_DOMAIN_PAUSED
    assert world.secrets(name) == [PASSPHRASE.encode() + b"\0"]


def test_a_running_domain_is_refused_and_left_running(world: World) -> None:
    name = world.define("running", "running")
    assert world.start(name).returncode == 0
    again = world.start(name)
    assert again.returncode == 1
    assert f"start {name}: metadata: domain {name} is running" in error_line(again)
    assert world.state(name) == libvirt.VIR_DOMAIN_RUNNING


def test_measurement_mismatch_destroys_the_guest_without_a_secret(world: World) -> None:
    name = world.define("mismatch", "mismatch")
    result = world.start(name)
    assert result.returncode == 1
    line = error_line(result)
    assert f"start {name}: attest: the key broker refused" in line and "measurement-mismatch" in line
    assert line.endswith("the guest was destroyed")
    assert "FAILED attest" in result.stdout and "ok     destroy" in result.stdout
    assert world.state(name) == libvirt.VIR_DOMAIN_SHUTOFF
    assert world.secrets(name) == []


def test_broker_down_fails_before_starting(world: World) -> None:
    name = world.define("brokerdown", "good", broker_url=f"http://127.0.0.1:{free_port()}")
    result = world.start(name, "--json")
    assert result.returncode == 1
    outcome = json.loads(result.stdout)
    assert outcome["ok"] is False and outcome["failed_step"] == "session"
    assert "cannot connect" in outcome["error"]
    assert f"start {name}: session:" in error_line(result)
    assert world.state(name) == libvirt.VIR_DOMAIN_SHUTOFF


def test_unknown_guest_at_the_broker_is_refused(world: World) -> None:
    name = world.define("unknown", "not-registered")
    result = world.start(name)
    assert result.returncode == 1
    assert "session: the key broker refused" in error_line(result)
    assert world.state(name) == libvirt.VIR_DOMAIN_SHUTOFF


def test_domain_without_launch_security_is_refused(world: World) -> None:
    name = world.define("nosev", "nosev", sev=False)
    result = world.start(name)
    assert result.returncode == 1
    assert "metadata: domain" in error_line(result) and "type='sev'" in error_line(result)
    assert world.state(name) == libvirt.VIR_DOMAIN_SHUTOFF


def test_domain_prepared_for_the_hook_is_left_to_the_hook(world: World) -> None:
    name = world.define("forhook", "good", private_monitor=True)
    result = world.start(name)
    assert result.returncode == 1
    assert "metadata: domain" in error_line(result) and "virsh start --paused" in error_line(result)
    assert world.state(name) == libvirt.VIR_DOMAIN_SHUTOFF


def test_domain_not_defined_is_refused(world: World) -> None:
    result = world.start(f"sevhook-flow-nosuch-{RUN}")
    assert result.returncode == 1
    assert "connect: domain" in error_line(result) and "is not defined" in error_line(result)


def test_libvirt_refusing_to_start_leaves_it_shut_off(world: World) -> None:
    name = world.define("broken", "broken", firmware=world.root / "missing.fd")
    result = world.start(name)
    assert result.returncode == 1
    assert f"start {name}: start: libvirt refused to start the domain" in error_line(result)
    assert world.state(name) == libvirt.VIR_DOMAIN_SHUTOFF


def test_host_without_sev_in_libvirt_is_refused_at_the_platform_step(world: World) -> None:
    name = world.define("nohost", "nohost")
    result = world.start(name, platform=False)
    assert result.returncode == 1
    assert "platform: libvirt cannot report the host's SEV platform" in error_line(result)
    assert world.state(name) == libvirt.VIR_DOMAIN_SHUTOFF


def test_the_attestation_budget_bounds_the_start(world: World) -> None:
    name = world.define("budget", "good", timeout="0.001")
    result = world.start(name)
    assert result.returncode == 1
    assert f"start {name}: session: timed out: the attestation took longer than its 0.001 s budget" \
        in error_line(result)
    assert world.state(name) == libvirt.VIR_DOMAIN_SHUTOFF


def test_with_launch_writes_the_session_policy_and_launch_id(shared: Path) -> None:
    from sevhook.broker.client import LaunchGrant
    from sevhook.flow.start import read_domain, with_launch
    from sevhook.sev.certs import SevCertificate
    from sevhook.sev.session import create_session

    offline = SimWorld(Path("/srv"), Path("/srv/sim"), Path("/srv/OVMF.fd"), Path("/srv/host.token"),
                       "http://127.0.0.1:1", None, None)  # type: ignore[arg-type]  (no broker, no KDS: XML only)
    xml = World(offline, "", None).domain_xml("d", "g")
    made = create_session(SevCertificate.parse((shared / "vectors/chains/naples/pdh.cert").read_bytes()), 0x5)
    godh, session = made.godh_b64, made.session_b64
    updated = with_launch(xml, LaunchGrant("L-1", godh, session, 0x5), "domain d")
    managed = read_domain("d", updated)
    assert managed.launch_security.policy.value == 0x5
    assert (managed.launch_security.dh_cert, managed.launch_security.session) == (godh, session)
    assert managed.attestation.launch_id == "L-1"
    again = read_domain("d", with_launch(updated, LaunchGrant("L-2", godh, session, 0x1), "domain d"))
    assert again.attestation.launch_id == "L-2" and updated.count("<dhCert>") == 1
