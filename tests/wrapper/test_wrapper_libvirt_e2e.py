"""End to end through real libvirtd 9.0: emulator-mode domains whose <emulator> is sevhook-qemu, with
the software platform's stand-in as the real QEMU behind it (real QEMU 7.2 TCG behind that), and a
real key broker process on loopback. No hook is installed and nothing is re-defined between starts:
a plain `virsh start` attests, and every failure (tampered firmware, broker down, broker slower than
the deadline, revoked host token, stale PDH) leaves the domain shut off with sevhook-qemu's reason
in libvirt's error."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from lxml import etree

from sevhook.sev.certs import SevCertificate, Usage
from sevhook.sim.platform import CERT_FILES, KEY_FILES, SoftwarePlatform
from sevhook.sim.state import StateDir, default_state_dir
from sevhook.sim.world import PASSPHRASE, SIM_QEMU, EmulatorConf, SimWorld, free_port, sevhook
from sevhook.virt import libvirt_module, open_connection
from sevhook.wrapper.config import CONFIG_FILE

pytestmark = [pytest.mark.libvirt, pytest.mark.timeout(400)]
PREFIX = "shq-"
SECRET = PASSPHRASE.encode() + b"\0"
LIBVIRT_LOG_DIR = Path("/var/log/libvirt/qemu")
LAUNCH_LINE = re.compile(r"sevhook-qemu: (\S+): launch (\S+) from the key broker")


@pytest.fixture(scope="module")
def world(shared: Path, tmp_path_factory: pytest.TempPathFactory, libvirt_uri: str) -> Iterator[SimWorld]:
    created = SimWorld.create(tmp_path_factory.mktemp("qworld"), shared / "vectors/sevctl/OVMF.amdsev.trimmed.fd",
                              sim_dir=default_state_dir())
    conf = EmulatorConf(CONFIG_FILE, created.platform_cache(created.root / "platform"))
    conf.install()
    try:
        yield created
    finally:
        conf.remove()
        created.close()


@pytest.fixture(scope="module")
def conn(libvirt_uri: str, world: SimWorld) -> Iterator[object]:
    connection = open_connection(libvirt_uri)
    yield connection
    libvirt = libvirt_module()
    with contextlib.suppress(libvirt.libvirtError):
        connection.close()
    connection = open_connection(libvirt_uri)  # a fresh one: the autostart test restarts libvirtd
    for domain in connection.listAllDomains():
        if domain.name().startswith(PREFIX):
            if domain.isActive():
                domain.destroy()
            if domain.isPersistent():
                domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    connection.close()


def _secrets(world: SimWorld, name: str) -> list[bytes]:
    return [base64.b64decode(entry["value_b64"]) for secret in world.secrets(name)
            for entry in secret["table"]]  # type: ignore[union-attr]


def _handle(world: SimWorld, name: str) -> int:
    """The SEV handle of the guest's latest launch on the software platform."""
    records = json.loads(sevhook("sim", "secrets", "--state-dir", str(world.sim_dir), "--domain", name, "--json"))
    return int(records[-1]["handle"])


def _state(domain: object) -> int:
    return domain.state()[0]  # type: ignore[attr-defined]


def _becomes(domain: object, state: int, seconds: float = 15) -> bool:
    deadline = time.monotonic() + seconds
    while _state(domain) != state:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _start_error(start: object) -> str:
    libvirt = libvirt_module()
    try:
        start()  # type: ignore[operator]
    except libvirt.libvirtError as exc:
        return exc.get_error_message()
    return ""


def launch_ids(name: str) -> list[str]:
    """The launch ids the wrapper reported in libvirt's log of the domain, oldest first."""
    path = LIBVIRT_LOG_DIR / f"{name}.log"
    text = path.read_text(errors="replace") if path.exists() else ""
    return [match.group(2) for match in LAUNCH_LINE.finditer(text) if match.group(1) == name]


def _taints(name: str) -> list[str]:
    status = etree.parse(f"/run/libvirt/qemu/{name}.xml").getroot()
    return [taint.get("flag") for taint in status.iterfind("taint")]


def test_plain_start_attests_and_a_restart_is_a_fresh_launch(world, conn):
    libvirt = libvirt_module()
    name = f"{PREFIX}plain"
    domain = conn.defineXML(world.emulator_domain(name))
    for attempt in range(2):  # virsh start; virsh destroy; virsh start: no prepare, no define in between
        domain.create()
        assert _becomes(domain, libvirt.VIR_DOMAIN_RUNNING), attempt
        assert _secrets(world, name) == [SECRET], attempt
        assert "custom-argv" not in _taints(name)
        assert "qemu:commandline" not in domain.XMLDesc(0)
        if attempt == 0:
            first_handle = _handle(world, name)
        domain.destroy()
    ids = launch_ids(name)
    assert len(ids) >= 2 and ids[-1] != ids[-2]  # each start its own launch at the broker
    assert _handle(world, name) != first_handle


def test_start_paused_attests_at_resume(world, conn):
    libvirt = libvirt_module()
    name = f"{PREFIX}paused"
    domain = conn.defineXML(world.emulator_domain(name))
    domain.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
    time.sleep(0.5)
    assert _state(domain) == libvirt.VIR_DOMAIN_PAUSED
    assert _secrets(world, name) == []  # nothing is attested before libvirt's cont
    domain.resume()
    assert _becomes(domain, libvirt.VIR_DOMAIN_RUNNING)
    assert _secrets(world, name) == [SECRET]
    domain.destroy()


def test_transient_create_attests(world, conn):
    libvirt = libvirt_module()
    name = f"{PREFIX}transient"
    domain = conn.createXML(world.emulator_domain(name), 0)
    assert _becomes(domain, libvirt.VIR_DOMAIN_RUNNING)
    assert _secrets(world, name) == [SECRET]
    domain.destroy()


def _shut_off_or_gone(conn: object, name: str) -> bool:
    libvirt = libvirt_module()
    try:
        domain = conn.lookupByName(name)  # type: ignore[attr-defined]
    except libvirt.libvirtError:
        return True
    return _state(domain) == libvirt.VIR_DOMAIN_SHUTOFF


@pytest.mark.parametrize("case", ["fw", "down", "revoked"])
def test_failures_leave_the_domain_shut_off_with_the_wrappers_reason(world, conn, case):
    name = f"{PREFIX}{case}"
    firmware, broker_url, token = None, None, None
    if case == "fw":  # the firmware changed after the owner registered it
        firmware = world.root / "OVMF.patched.fd"
        image = bytearray(world.firmware.read_bytes())
        image[0] ^= 0xFF
        firmware.write_bytes(bytes(image))
    elif case == "down":
        broker_url = f"http://127.0.0.1:{free_port()}"
    elif case == "revoked":  # a host of its own, so the other tests' host keeps its token
        token = world.root / "revoked.token"
        data = ["--data-dir", str(world.root / "broker")]
        sevhook("broker", "add-host", "host-revoked", "--token-file", str(token), *data)
        sevhook("broker", "revoke-host", "host-revoked", *data)
    domain = conn.defineXML(world.emulator_domain(name, firmware=firmware, broker_url=broker_url, token=token))
    error = _start_error(domain.create)
    expected = {"fw": "attest: the key broker refused", "down": "launch: ", "revoked": "launch: the key broker refused"}
    assert f"sevhook-qemu: {name}: {expected[case]}" in error, error
    if case == "down":
        assert "cannot connect" in error or "unavailable" in error, error
    if case == "revoked":
        assert "revoked" in error, error
    assert _shut_off_or_gone(conn, name)
    if case == "fw":  # launched, measured, refused: no secret reached the guest
        assert _secrets(world, name) == []


def test_a_broker_slower_than_the_deadline_leaves_the_domain_shut_off(world, conn, slow_broker):
    """The broker makes the launch at once but takes 20 s to attest; the guest's deadline is 3 s."""
    name = f"{PREFIX}slow"
    domain = conn.defineXML(world.emulator_domain(name, broker_url=slow_broker, timeout=3))
    begin = time.monotonic()
    error = _start_error(domain.create)
    elapsed = time.monotonic() - begin
    assert f"sevhook-qemu: {name}: attest: " in error, error
    assert "3 s budget ran out" in error or "no verdict within" in error, error
    assert elapsed < 15, elapsed  # the deadline ended the start, not the broker's answer
    assert _shut_off_or_gone(conn, name)
    assert _secrets(world, name) == []


def _regenerate_pdh(state_dir: Path) -> None:
    """What the firmware's PDH_GEN does: a new PDH key pair, its certificate signed by the platform's PEK."""
    state = StateDir(state_dir)
    platform = SoftwarePlatform(state)
    key = ec.generate_private_key(ec.SECP384R1())
    certificate = (SevCertificate.generate(Usage.PDH, key.public_key(), platform.config.api_major,
                                           platform.config.api_minor)
                   .sign(Usage.PEK, platform.pek_private_key))
    state.write_private(KEY_FILES["pdh"], key.private_bytes(serialization.Encoding.PEM,
                                                            serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
    state.write_private(CERT_FILES["pdh"], certificate.to_bytes())


def test_a_stale_pdh_leaves_the_domain_shut_off_naming_the_fix(world, conn):
    """The platform's PDH is regenerated after `sevhook platform export` wrote the cache: the broker makes
    the launch for the cached PDH, and the firmware's LAUNCH_START refuses it. The platform is a copy of
    the world's (same chip, chain and roots; the shared one stays as libvirt's probe and the other tests
    see it), run by the domain's own QEMU with its state directory on the command line."""
    name = f"{PREFIX}stalepdh"
    platform = world.root / "sim-pdh-regenerated"
    shutil.copytree(world.sim_dir, platform, ignore=shutil.ignore_patterns("guests"))
    _regenerate_pdh(platform)
    qemu = world.root / "qemu-sim-pdh-regenerated"
    qemu.write_text(f"#!/bin/sh\nexec {SIM_QEMU} --sim-state-dir {platform} \"$@\"\n")
    qemu.chmod(0o755)
    domain = conn.defineXML(world.emulator_domain(name, qemu=str(qemu)))
    error = _start_error(domain.create)
    assert f"sevhook-qemu: {name}: launch: the platform's PDH changed: run `sevhook platform export`" in error, error
    assert _shut_off_or_gone(conn, name)


def test_ten_plain_starts_at_once_all_attest(world, conn):
    libvirt = libvirt_module()
    names = [f"{PREFIX}crowd{index}" for index in range(10)]
    domains = {name: conn.defineXML(world.emulator_domain(name, timeout=120)) for name in names}
    errors: dict[str, str] = {}

    def start(name: str) -> None:
        errors[name] = _start_error(domains[name].create)

    threads = [threading.Thread(target=start, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert {name: error for name, error in errors.items() if error} == {}
    for name in names:
        assert _becomes(domains[name], libvirt.VIR_DOMAIN_RUNNING)
        assert _secrets(world, name) == [SECRET]
        domains[name].destroy()


def _restart_libvirtd() -> None:
    """Through scripts/services, by the pidfile the test command's libvirtd wrote (never by name)."""
    root = Path(__file__).resolve().parents[2]
    subprocess.run([str(root / "scripts" / "services"), "restart-libvirtd"], check=True, timeout=60,
                   capture_output=True)


def test_autostart_comes_up_attested_when_libvirtd_starts(world, conn, libvirt_uri):
    """libvirt resumes an autostart guest itself, with no management tool in between: the wrapper
    attests it. libvirt 9.0 autostarts once per boot (it skips autostart while its state directory
    holds `autostarted`), so the file is removed before the daemon restarts, as after a reboot."""
    libvirt = libvirt_module()
    name = f"{PREFIX}autostart"
    conn.defineXML(world.emulator_domain(name)).setAutostart(1)
    Path("/run/libvirt/qemu/autostarted").unlink(missing_ok=True)
    _restart_libvirtd()
    fresh = open_connection(libvirt_uri)
    try:
        domain = fresh.lookupByName(name)
        assert _becomes(domain, libvirt.VIR_DOMAIN_RUNNING, seconds=60), _state(domain)
        assert _secrets(world, name) == [SECRET]
        assert "custom-argv" not in _taints(name)
        domain.setAutostart(0)
        domain.destroy()
    finally:
        fresh.close()
