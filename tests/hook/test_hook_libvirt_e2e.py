"""End to end through real libvirtd: the hook installed as qemu.d/50-sevhook (daemon restarted),
the QEMU stand-in in wrapping mode as the domains' <emulator> (real QEMU behind it, the software
SEV processor in front), a real key broker process on loopback. Every failure must leave the
domain shut off with the hook's one line in libvirt's error."""

from __future__ import annotations

import base64
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sevhook.hook.install import install, uninstall
from sevhook.hook.runtime import start_marker_path
from sevhook.sim.state import default_state_dir
from sevhook.sim.world import GUEST_ID, PASSPHRASE, SIM_QEMU, SimWorld, free_port
from sevhook.virt import libvirt_module, open_connection
from tests.hook.domains import domain_xml

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.libvirt, pytest.mark.timeout(300)]
PREFIX = "shk-"
CROWD = [f"{PREFIX}crowd{index}" for index in range(10)]


def _restart_libvirtd() -> None:
    subprocess.run([str(ROOT / "scripts" / "services"), "restart-libvirtd"], check=True, timeout=60,
                   capture_output=True)


@pytest.fixture(scope="module")
def hook_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("libvirt-hook") / "hook.log"


@pytest.fixture(scope="module")
def installed(libvirt_uri: str, hook_log: Path) -> Iterator[None]:
    hooks = Path("/etc/libvirt/hooks")
    install(hooks, log_target=str(hook_log))
    try:
        _restart_libvirtd()
        yield
    finally:
        uninstall(hooks)
        _restart_libvirtd()


@pytest.fixture(scope="module")
def world(shared: Path, tmp_path_factory: pytest.TempPathFactory, installed: None) -> Iterator[SimWorld]:
    created = SimWorld.create(tmp_path_factory.mktemp("lvworld"), shared / "vectors/sevctl/OVMF.amdsev.trimmed.fd",
                              sim_dir=default_state_dir())
    yield created
    created.close()


@pytest.fixture(scope="module")
def conn(libvirt_uri: str, installed: None) -> Iterator[object]:
    connection = open_connection(libvirt_uri)
    yield connection
    libvirt = libvirt_module()
    for domain in connection.listAllDomains():
        if domain.name().startswith(PREFIX):
            try:
                domain.destroy()
            except libvirt.libvirtError:
                pass
    connection.close()


@pytest.fixture(scope="module")
def run_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="shl", dir="/tmp"))
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def _start_paused(conn: object, xml: str) -> tuple[object | None, str]:
    """createXML(..., START_PAUSED), as `virsh start --paused` on a transient domain: (domain, error)."""
    libvirt = libvirt_module()
    try:
        return conn.createXML(xml, libvirt.VIR_DOMAIN_START_PAUSED), ""  # type: ignore[attr-defined]
    except libvirt.libvirtError as exc:
        return None, exc.get_error_message()


def _is_gone_or_off(conn: object, name: str) -> bool:
    libvirt = libvirt_module()
    try:
        domain = conn.lookupByName(name)  # type: ignore[attr-defined]
    except libvirt.libvirtError:
        return True  # a transient domain that failed to start no longer exists
    return domain.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF


def _becomes_running(domain: object, seconds: float = 10) -> bool:
    """libvirt learns of the hook's `cont` from QEMU's RESUME event on its own monitor, handled a
    moment after the start call returned."""
    libvirt = libvirt_module()
    deadline = time.monotonic() + seconds
    while domain.state()[0] != libvirt.VIR_DOMAIN_RUNNING:  # type: ignore[attr-defined]
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _passphrases(world: SimWorld, name: str) -> list[bytes]:
    return [base64.b64decode(entry["value_b64"]) for secret in world.secrets(name)
            for entry in secret["table"]]  # type: ignore[union-attr]


def _hook_error(error: str, name: str) -> str:
    """The hook's own line inside libvirt's 'Hook script execution failed: ...' message."""
    assert "Hook script execution failed" in error, error
    return error[error.index(f"sevhook: {name}: "):].strip()


def test_attested_start_through_libvirtd(world, conn, run_dir, hook_log):
    name = f"{PREFIX}good"
    prepared = world.prepare(name, run_dir / f"{name}.qmp")
    domain, error = _start_paused(conn, prepared.read_text())
    assert domain is not None, error
    assert _becomes_running(domain)
    assert _passphrases(world, name) == [PASSPHRASE.encode() + b"\0"]
    steps = [line.split()[3:5] for line in hook_log.read_text().splitlines() if line.split()[2] == name]
    assert ["started", "inject"] in steps and ["started", "resume"] in steps
    domain.destroy()
    assert not (run_dir / f"{name}.qmp").exists()  # stopped/release removed the runtime files


@pytest.mark.parametrize("case", ["fw", "down", "slow", "nomon", "unpaused"])
def test_failures_leave_the_domain_shut_off_with_the_hooks_message(world, conn, run_dir, case):
    name = f"{PREFIX}{case}"
    patched = None
    if case == "fw":  # the firmware changed after the owner registered it
        patched = world.root / "OVMF.patched.fd"
        image = bytearray(world.firmware.read_bytes())
        image[0] ^= 0xFF
        patched.write_bytes(bytes(image))
    prepared = world.prepare(name, run_dir / f"{name}.qmp", firmware=patched, timeout=3 if case == "slow" else 10)
    xml = prepared.read_text()
    tarpit = socket.socket()
    if case == "down":
        xml = xml.replace(world.broker_url, f"http://127.0.0.1:{free_port()}")
    elif case == "slow":
        tarpit.bind(("127.0.0.1", 0))
        tarpit.listen()
        xml = xml.replace(world.broker_url, f"http://127.0.0.1:{tarpit.getsockname()[1]}")
    elif case == "nomon":
        xml = xml[:xml.index("<qemu:commandline>")] + xml[xml.index("</qemu:commandline>") + 19:]
    begin = time.monotonic()
    with tarpit:
        if case == "unpaused":
            libvirt = libvirt_module()
            try:
                conn.createXML(xml, 0)
                error = ""
            except libvirt.libvirtError as exc:
                error = exc.get_error_message()
        else:
            domain, error = _start_paused(conn, xml)
            assert domain is None
    elapsed = time.monotonic() - begin
    line = _hook_error(error, name)
    expected = {"fw": "attest: the key broker refused", "down": "attest: ", "slow": "attest: ",
                "nomon": "monitor: cannot connect", "unpaused": "paused-check: the guest was started running"}
    assert line.startswith(f"sevhook: {name}: {expected[case]}"), line
    details = {"down": "cannot connect", "slow": "3 s budget ran out"}
    if case in details:
        assert details[case] in line, line
    assert _is_gone_or_off(conn, name)
    assert world.secrets(name) == []
    if case == "slow":
        assert elapsed < 15


def test_ten_guests_started_at_once_all_attest(world, conn, run_dir):
    prepared = {name: world.prepare(name, run_dir / f"{name}.qmp", timeout=120).read_text() for name in CROWD}
    results: dict[str, tuple[object | None, str]] = {}

    def start(name: str) -> None:
        results[name] = _start_paused(conn, prepared[name])

    threads = [threading.Thread(target=start, args=(name,)) for name in CROWD]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    assert not [thread for thread in threads if thread.is_alive()]
    failed = {name: error for name, (domain, error) in results.items() if domain is None}
    assert failed == {}
    for name in CROWD:
        domain = results[name][0]
        assert _becomes_running(domain)
        assert _passphrases(world, name) == [PASSPHRASE.encode() + b"\0"]
        domain.destroy()  # type: ignore[union-attr]


def _start_mode_domain(world: SimWorld, name: str) -> str:
    """A domain for `sevhook start`: metadata without <sevhook:monitor>, no session, no -qmp."""
    xml = domain_xml(name, socket=None, declare_monitor=False, launch_id=None, broker_url=world.broker_url,
                     emulator=SIM_QEMU, timeout=60)
    loader = (f"<loader readonly='yes' type='pflash'>{world.firmware}</loader>"
              f"<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>{world.root / name}_VARS.fd</nvram>")
    return (xml.replace("<os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type></os>",
                        f"<os><type arch='x86_64' machine='q35'>hvm</type>{loader}</os>")
            .replace(f"<sevhook:guest id='{name}'", f"<sevhook:guest id='{GUEST_ID}'")
            .replace(f"<sevhook:broker url='{world.broker_url}'",
                     f"<sevhook:broker url='{world.broker_url}' token-file='{world.token}'"))


def test_sevhook_start_and_the_installed_hook_share_the_host(world, conn, libvirt_uri, hook_log):
    """Hook installed: `sevhook start` attests a start-mode domain; starting the same domain any other
    way is refused by the hook at prepare and leaves it shut off (hook-mode domains: the tests above)."""
    libvirt = libvirt_module()
    name = f"{PREFIX}startmode"
    domain = conn.defineXML(_start_mode_domain(world, name))
    try:
        result = subprocess.run([sys.executable, "-m", "sevhook.cli", "start", name, "-c", libvirt_uri,
                                 "--platform", str(world.export)], capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stdout + result.stderr
        assert domain.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        assert _passphrases(world, name) == [PASSPHRASE.encode() + b"\0"]
        assert not start_marker_path(name).exists()  # held only while libvirt started the domain
        owned = [line.split()[3:6] for line in hook_log.read_text().splitlines() if line.split()[2] == name]
        assert ["prepare", "owner", "ok"] in owned and ["started", "owner", "ok"] in owned
        domain.destroy()

        refusal = (f"sevhook: {name}: metadata: this guest is attested by `sevhook start` (its metadata declares "
                   f"no <sevhook:monitor>): start it with `sevhook start {name}`, or run `sevhook prepare-domain` "
                   "so the hook can attest it")
        inactive = domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        for attempt in ("virsh start", "virsh start --paused", "createXML"):
            try:
                if attempt == "createXML":
                    conn.createXML(inactive, libvirt.VIR_DOMAIN_START_PAUSED)
                else:
                    domain.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED if attempt.endswith("paused") else 0)
                error = ""
            except libvirt.libvirtError as exc:
                error = exc.get_error_message()
            assert _hook_error(error, name) == refusal, attempt
            assert domain.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF, attempt
        assert _passphrases(world, name) == [PASSPHRASE.encode() + b"\0"]  # still the attested launch's: refused
        # at prepare, before QEMU ran, none of these made a launch of its own
    finally:
        if domain.isActive():
            domain.destroy()
        domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
