"""sevhook-qemu driven as libvirtd drives it, without libvirtd: a status file naming the wrapper's pid
(written by the shell that then execs the wrapper, as libvirt writes it before exec), libvirt's
argv for an emulator-mode domain, and a QMP client on the monitor. The stand-in is the real QEMU
(real QEMU 7.2 TCG behind it) and a real broker process runs on loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from qemu.qmp import ExecuteError, QMPClient

from sevhook.errors import SevhookError
from sevhook.sev.certs import SevCertificate, Usage
from sevhook.sim.platform import SoftwarePlatform
from sevhook.sim.state import StateDir
from sevhook.sim.world import PASSPHRASE, SimWorld, sevhook
from sevhook.wrapper.launch import GODH_FIFO, RUN_DIR, SESSION_FIFO

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(300)]
WRAPPER = str(Path(sys.executable).with_name("sevhook-qemu"))
SECRET = PASSPHRASE.encode() + b"\0"


@pytest.fixture(scope="module")
def world(shared: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimWorld]:
    created = SimWorld.create(tmp_path_factory.mktemp("qmpworld"), shared / "vectors/sevctl/OVMF.amdsev.trimmed.fd")
    (created.root / "state").mkdir()
    cache = created.platform_cache(created.root / "platform")
    (created.root / "emulator.conf").write_text(f"qemu = /usr/bin/qemu-system-x86_64\nplatform-cache = {cache}\n"
                                               f"libvirt-state-dir = {created.root / 'state'}\n")
    yield created
    created.close()


def _libvirt_argv(world: SimWorld, name: str, socket: Path, firmware: Path | None = None) -> list[str]:
    """What libvirt 9.0 gives the emulator for the domain (the parts a launch depends on)."""
    sev = {"qom-type": "sev-guest", "id": "lsec0", "cbitpos": 47, "reduced-phys-bits": 1, "policy": 1}
    return ["-name", f"guest={name},debug-threads=on", "-S", "-machine", "q35,confidential-guest-support=lsec0",
            "-accel", "tcg", "-m", "128",
            "-drive", f"if=pflash,format=raw,unit=0,file={firmware or world.firmware},readonly=on",
            "-object", json.dumps(sev, separators=(",", ":")), "-nodefaults", "-display", "none",
            "-qmp", f"unix:{socket},server=on,wait=off"]


def _start(world: SimWorld, name: str, argv: list[str], socket: Path,
           domain_xml: str | None = None, conf: str = "emulator.conf") -> subprocess.Popen[bytes]:
    """The shell writes libvirt's status file with its own pid, then execs the wrapper (same pid)."""
    template = world.root / f"{name}.status"
    template.write_text("<domstatus state='paused' reason='starting up' pid='@PID@'>\n"
                        f"{domain_xml or world.emulator_domain(name)}</domstatus>\n")
    status = world.root / "state" / f"{name}.xml"
    script = f'sed "s/@PID@/$$/" {template} > {status} && exec {WRAPPER} "$@"'
    env = {**os.environ, "SEVHOOK_QEMU_CONFIG": str(world.root / conf),
           "SEVHOOK_SIM_DIR": str(world.sim_dir), "SEVHOOK_QEMU_LOG": str(world.root / "emulator.log")}
    process = subprocess.Popen(["sh", "-c", script, "sh", *argv], env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=open(world.root / f"{name}.log", "wb"))
    deadline = time.monotonic() + 60
    while not socket.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return process


def _log(world: SimWorld, name: str) -> str:
    return (world.root / f"{name}.log").read_text(errors="replace")


def _secrets(world: SimWorld, name: str) -> list[bytes]:
    return [base64.b64decode(entry["value_b64"]) for secret in world.secrets(name)
            for entry in secret["table"]]  # type: ignore[union-attr]


async def _session(socket: Path, *commands: str) -> list[object]:
    """Run the commands in order on one QMP session: each answer, or the ExecuteError."""
    qmp = QMPClient("libvirt-like")
    await qmp.connect(str(socket))
    answers: list[object] = []
    try:
        for command in commands:
            try:
                answers.append(await qmp.execute(command))
            except ExecuteError as exc:
                answers.append(exc)
    finally:
        await qmp.disconnect()
    return answers


def _stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.terminate()
    return process.wait(timeout=30)


def test_cont_is_held_for_the_verdict_then_forwarded(world, short_dir):
    name, socket = "q-good", short_dir / "good.sock"
    process = _start(world, name, _libvirt_argv(world, name, socket), socket)
    files = RUN_DIR / name
    try:
        assert socket.exists(), _log(world, name)
        # QEMU read its GODH and session from FIFOs only root can reach, written once the broker answered
        assert stat.S_IMODE(files.stat().st_mode) == 0o700
        for fifo in (files / GODH_FIFO, files / SESSION_FIFO):
            assert stat.S_ISFIFO(fifo.stat().st_mode) and stat.S_IMODE(fifo.stat().st_mode) == 0o600
        before, reset, cont, after = asyncio.run(_session(socket, "query-status", "system_reset", "cont",
                                                          "query-status"))
        assert before["status"] == "prelaunch"
        assert isinstance(reset, ExecuteError) and "system_reset: an in-place reset" in str(reset)
        assert cont == {}
        assert after["running"] is True
        assert _secrets(world, name) == [SECRET]
        assert f"sevhook-qemu: {name}: launch " in _log(world, name)
    finally:
        _stop(process)
    assert not (world.root / "state" / name).exists()
    assert not files.exists()


def test_a_refused_measurement_answers_cont_with_the_reason_and_quits(world, short_dir):
    name, socket = "q-fw", short_dir / "fw.sock"
    patched = world.root / "OVMF.patched.fd"
    image = bytearray(world.firmware.read_bytes())
    image[0] ^= 0xFF
    patched.write_bytes(bytes(image))
    process = _start(world, name, _libvirt_argv(world, name, socket, patched), socket,
                     world.emulator_domain(name, firmware=patched))
    try:
        (cont,) = asyncio.run(_session(socket, "cont"))
        assert isinstance(cont, ExecuteError)
        assert str(cont).startswith(f"sevhook-qemu: {name}: attest: the key broker refused"), str(cont)
        assert process.wait(timeout=30) != 0  # QEMU was killed: its vCPUs never ran
        assert _secrets(world, name) == []
    finally:
        _stop(process)


def test_incoming_unlinked_sev_and_broker_down_are_refused_before_the_guest_launches(world, short_dir):
    """-incoming and an unlinked sev-guest are refused before QEMU runs; with the broker down, QEMU
    (started at once, waiting for its session on the FIFOs) is killed before its LAUNCH_START."""
    name, socket = "q-in", short_dir / "in.sock"
    process = _start(world, name, [*_libvirt_argv(world, name, socket), "-incoming", "defer"], socket)
    assert process.wait(timeout=60) == 1
    assert f"sevhook-qemu: {name}: incoming: an attested SEV guest cannot be migrated in" in _log(world, name)
    name, socket = "q-nolink", short_dir / "nolink.sock"
    unlinked = [arg.replace(",confidential-guest-support=lsec0", "") for arg in _libvirt_argv(world, name, socket)]
    process = _start(world, name, unlinked, socket)
    assert process.wait(timeout=60) == 1
    assert f"sevhook-qemu: {name}: argv: the QEMU command line has no sev-guest object" in _log(world, name)
    name, socket = "q-down", short_dir / "down.sock"
    domain = world.emulator_domain(name, broker_url="http://127.0.0.1:9")
    process = _start(world, name, _libvirt_argv(world, name, socket), socket, domain)
    assert process.wait(timeout=60) == 1
    assert f"sevhook-qemu: {name}: launch: " in _log(world, name)
    assert not socket.exists() or not _alive(process)
    with pytest.raises(SevhookError, match="has been launched"):  # the platform never saw a LAUNCH_START
        sevhook("sim", "secrets", "--state-dir", str(world.sim_dir), "--domain", name, "--json")


def test_emulator_mode_metadata_the_full_checks_refuse_kills_qemu_before_its_launch(world, short_dir):
    """QEMU is spawned after a first look at the metadata; the full checks (here: a second
    <sevhook:attestation>) refuse it while QEMU waits on its FIFOs, so the platform never sees a launch."""
    name, socket = "q-meta", short_dir / "meta.sock"
    domain = world.emulator_domain(name)
    second = ("<sevhook:attestation xmlns:sevhook='http://sevhook.org/xmlns/libvirt/1.0'><sevhook:broker "
              "url='http://127.0.0.1:9'/><sevhook:guest id='x'/></sevhook:attestation></metadata>")
    assert "</metadata>" in domain
    process = _start(world, name, _libvirt_argv(world, name, socket), socket, domain.replace("</metadata>", second))
    assert process.wait(timeout=60) == 1
    assert f"sevhook-qemu: {name}: metadata: " in _log(world, name)
    assert "a second <sevhook:attestation>" in _log(world, name)
    with pytest.raises(SevhookError, match="has been launched"):  # the platform never saw a LAUNCH_START
        sevhook("sim", "secrets", "--state-dir", str(world.sim_dir), "--domain", name, "--json")


def _alive(process: subprocess.Popen[bytes]) -> bool:
    return process.poll() is None


def test_a_guest_without_emulator_metadata_runs_the_configured_qemu_untouched(world, short_dir):
    """No status file (not started by libvirt): the argv goes to emulator.conf's QEMU unchanged, which
    here is the system QEMU without SEV: it fails on the sev-guest object itself (under TCG, an abort)."""
    socket = short_dir / "plain.sock"
    env = {**os.environ, "SEVHOOK_QEMU_CONFIG": str(world.root / "emulator.conf")}
    result = subprocess.run([WRAPPER, *_libvirt_argv(world, "q-nostatus", socket)], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    assert "sevhook-qemu" not in result.stderr and "qemu-system-x86_64" in result.stderr


def test_a_stale_pdh_in_the_cache_is_named(world, short_dir):
    """The cache holds a PDH the firmware no longer has (regenerated since the export), properly signed
    by the platform's PEK, so the broker makes a launch for it; the firmware's LAUNCH_START refuses."""
    platform = SoftwarePlatform(StateDir(world.sim_dir))
    new_pdh = (SevCertificate.generate(Usage.PDH, ec.generate_private_key(ec.SECP384R1()).public_key(),
                                       platform.config.api_major, platform.config.api_minor)
               .sign(Usage.PEK, platform.pek_private_key).to_bytes())
    stale = world.root / "stale-platform"
    stale.mkdir()
    (stale / "pdh.cert").write_bytes(new_pdh)
    for name in ("cert_chain.cert", "chip_id.hex"):  # the firmware's chain (unsigned CEK) and the chip id: unchanged
        (stale / name).write_bytes((world.root / "platform" / name).read_bytes())
    conf = (world.root / "emulator.conf").read_text().replace(str(world.root / "platform"), str(stale))
    (world.root / "stale.conf").write_text(conf)
    name, socket = "q-stale", short_dir / "stale.sock"
    process = _start(world, name, _libvirt_argv(world, name, socket), socket, conf="stale.conf")
    assert process.wait(timeout=60) != 0
    log = _log(world, name)
    assert "LAUNCH_START" in log, log
    assert f"sevhook-qemu: {name}: launch: the platform's PDH changed: run `sevhook platform export`" in log


def test_a_broker_slower_than_the_deadline_refuses_cont_in_time(world, short_dir, slow_broker):
    name, socket = "q-slow", short_dir / "slow.sock"
    domain = world.emulator_domain(name, broker_url=slow_broker, timeout=3)
    process = _start(world, name, _libvirt_argv(world, name, socket), socket, domain)
    try:
        begin = time.monotonic()
        (cont,) = asyncio.run(_session(socket, "cont"))
        elapsed = time.monotonic() - begin
        assert isinstance(cont, ExecuteError)
        assert str(cont).startswith(f"sevhook-qemu: {name}: attest: "), str(cont)
        assert "3 s budget ran out" in str(cont) or "no verdict within" in str(cont), str(cont)
        assert elapsed < 10
        assert process.wait(timeout=30) != 0
        assert _secrets(world, name) == []
    finally:
        _stop(process)


def test_a_revoked_host_token_is_refused_before_qemu_runs(world, short_dir):
    token = world.root / "revoked.token"
    data = ["--data-dir", str(world.root / "broker")]
    sevhook("broker", "add-host", "host-revoked", "--token-file", str(token), *data)
    sevhook("broker", "revoke-host", "host-revoked", *data)
    name, socket = "q-revoked", short_dir / "revoked.sock"
    process = _start(world, name, _libvirt_argv(world, name, socket), socket, world.emulator_domain(name, token=token))
    assert process.wait(timeout=60) == 1
    log = _log(world, name)
    assert f"sevhook-qemu: {name}: launch: the key broker refused" in log and "revoked" in log, log
    assert token.read_text().strip() not in log  # the bearer token is never printed


def test_ten_guests_started_at_once_all_attest(world, short_dir):
    names = [f"q-crowd{index}" for index in range(10)]
    sockets = {name: short_dir / f"{name}.sock" for name in names}
    domains = {name: world.emulator_domain(name, timeout=120) for name in names}
    processes = [_start(world, name, _libvirt_argv(world, name, sockets[name]), sockets[name], domains[name])
                 for name in names]

    async def all_cont() -> list[list[object]]:
        return await asyncio.gather(*(_session(sockets[name], "cont", "query-status") for name in names))

    try:
        for name, (cont, status) in zip(names, asyncio.run(all_cont()), strict=True):
            assert cont == {}, (name, cont)
            assert status["running"] is True, name
            assert _secrets(world, name) == [SECRET], name
    finally:
        for process in processes:
            _stop(process)
