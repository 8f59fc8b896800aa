"""Rolling forward with a real broker over HTTPS: `broker init --tls` makes the CA and server pair that
`serve` then uses by default; a guest registered for firmware A and updated with firmware B attests
with either until A is removed (the software platform measures, the real HTTP API decides); a rotated
host token replaces the old one; every change is in the audit log."""

from __future__ import annotations

import base64
import os
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from sevhook.broker.client import BrokerClient, BrokerRefused
from sevhook.broker.store import CACHE_SECONDS
from sevhook.sev.launch_digest import sev_launch_digest
from sevhook.sim.kds import SimulatedKds
from sevhook.sim.platform import PlatformConfig, SoftwarePlatform, init_platform
from sevhook.sim.state import StateDir
from tests.broker.conftest import ROOT, SEVHOOK, free_port

GUEST = "rolling-guest"


def broker_cli(data: Path, *args: str | Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SEVHOOK_CONFIG": str(data.parent / "sevhook.toml")}
    result = subprocess.run([*SEVHOOK, "broker", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env=env)
    assert (result.returncode == 0) is ok, result.stderr
    return result


@dataclass
class World:
    data: Path
    url: str
    ca: Path
    token_file: Path
    firmware_a: Path
    firmware_b: Path
    platform: SoftwarePlatform

    def client(self, token_file: Path | None = None) -> BrokerClient:
        return BrokerClient(self.url, ca_file=self.ca, token_file=token_file or self.token_file, retries=0)

    def attest(self, image: Path, token_file: Path | None = None) -> str:
        """One launch of `image` on the software platform; "released" or the broker's reason."""
        with self.client(token_file) as client:
            caps = self.platform.qmp_capabilities()
            grant = client.create_launch(GUEST, str(caps["pdh"]), str(caps["cert-chain"]), str(caps["cpu0-id"]))
            context = self.platform.launch_start(grant.policy, base64.b64decode(grant.godh_b64),
                                                 base64.b64decode(grant.session_b64), label="rolling")
            context.launch_update_data(image.read_bytes(), "firmware")
            measurement = base64.b64encode(context.launch_measure()).decode()
            try:
                client.attest(grant.launch_id, measurement, *context.api, context.build_id, context.policy)
            except BrokerRefused as refused:
                return refused.reason
            return "released"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, shared: Path) -> Iterator[World]:
    work = tmp_path_factory.mktemp("rolling")
    data = work / "broker"
    port = free_port()
    # the data directory and listen address come from the configuration file only
    (work / "sevhook.toml").write_text(f'[broker]\ndata-dir = "{data}"\nlisten = "127.0.0.1:{port}"\n')
    made = broker_cli(data, "init", "--tls", "--san", "localhost").stdout
    ca = data / "tls" / "ca.crt"
    assert str(ca) in made and oct((data / "tls" / "ca.key").stat().st_mode & 0o777) == "0o600"
    assert oct((data / "tls" / "server.key").stat().st_mode & 0o777) == "0o600"
    platform = init_platform(StateDir(work / "sim"), PlatformConfig(api_major=0, api_minor=24, build_id=15),
                             rsa_bits=2048)[0]
    (work / "sim-ca.cert").write_bytes(platform.cert("ask") + platform.cert("ark"))
    kds = SimulatedKds([work / "sim"]).start()  # the signed CEK of the firmware's unsigned one, by chip id
    with (work / "sevhook.toml").open("a") as config:
        config.write(f'kds-url = "{kds.url}"\n')
    broker_cli(data, "add-root", "software-platform", "--ca", work / "sim-ca.cert", "--test")
    broker_cli(data, "add-host", "rolling-host", "--token-file", work / "host.token")
    firmware_a = shared / "vectors/sevctl/OVMF.amdsev.trimmed.fd"
    firmware_b = work / "OVMF.updated.fd"
    image = bytearray(firmware_a.read_bytes())
    image[100] ^= 0xFF  # "the vendor's update": another image, another launch digest
    firmware_b.write_bytes(bytes(image))
    broker_cli(data, "add-guest", GUEST, "--firmware", firmware_a, "--policy", "0x3", "--min-api", "0.17")
    log = (work / "serve.log").open("wb")
    server = subprocess.Popen([*SEVHOOK, "broker", "serve"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "SEVHOOK_CONFIG": str(work / "sevhook.toml")})
    url = f"https://localhost:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, (work / "serve.log").read_text()
            try:
                if httpx.get(f"{url}/healthz", verify=ssl.create_default_context(cafile=str(ca)),
                             timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, (work / "serve.log").read_text()
                time.sleep(0.1)
        yield World(data, url, ca, work / "host.token", firmware_a, firmware_b, platform)
    finally:
        kds.stop()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=5)
        log.close()


def test_serve_uses_the_tls_files_init_made(world: World) -> None:
    with pytest.raises(httpx.TransportError):  # the server speaks TLS only
        httpx.get(world.url.replace("https", "http") + "/healthz", timeout=2)
    with pytest.raises(httpx.ConnectError):  # and its certificate is not one the system trusts
        httpx.get(f"{world.url}/healthz", timeout=2)


def test_firmware_update_attests_with_either_until_the_old_one_is_removed(world: World) -> None:
    assert world.attest(world.firmware_a) == "released"
    assert world.attest(world.firmware_b) == "measurement-mismatch"
    out = broker_cli(world.data, "update-guest", GUEST, "--add-firmware", world.firmware_b).stdout
    assert sev_launch_digest(world.firmware_b).hex() in out and "minimum API 0.17" in out
    time.sleep(CACHE_SECONDS + 0.2)  # the serving process notices the change within its cache lifetime
    assert world.attest(world.firmware_b) == "released"
    assert world.attest(world.firmware_a) == "released"
    broker_cli(world.data, "update-guest", GUEST, "--remove-digest", sev_launch_digest(world.firmware_a).hex())
    time.sleep(CACHE_SECONDS + 0.2)
    assert world.attest(world.firmware_a) == "measurement-mismatch"
    assert world.attest(world.firmware_b) == "released"
    audit = broker_cli(world.data, "audit", "--guest", GUEST, "--limit", "200").stdout
    assert "digest-added" in audit and "digest-removed" in audit
    last = broker_cli(world.data, "update-guest", GUEST, "--remove-digest", sev_launch_digest(world.firmware_b).hex(),
                      ok=False)
    assert "never attest" in last.stderr and "Traceback" not in last.stderr
    gone = broker_cli(world.data, "update-guest", GUEST, "--remove-digest", sev_launch_digest(world.firmware_a).hex(),
                      ok=False)
    assert "not a digest of guest" in gone.stderr


def test_rotation_of_the_secret_is_audited_and_released(world: World, tmp_path: Path) -> None:
    (tmp_path / "new.pass").write_text("rotated passphrase\n")
    broker_cli(world.data, "update-guest", GUEST, "--disk-passphrase", tmp_path / "new.pass")
    assert "secrets-changed" in broker_cli(world.data, "audit", "--guest", GUEST).stdout
    time.sleep(CACHE_SECONDS + 0.2)
    assert world.attest(world.firmware_b) == "released"


def test_a_rotated_host_token_replaces_the_old_one(world: World, tmp_path: Path) -> None:
    new_token = tmp_path / "host.token.new"
    out = broker_cli(world.data, "rotate-host-token", "rolling-host", "--token-file", new_token).stdout
    assert str(new_token) in out
    assert oct(new_token.stat().st_mode & 0o777) == "0o600"
    assert new_token.read_text().strip() not in out  # a token is never printed
    time.sleep(CACHE_SECONDS + 0.2)
    with pytest.raises(BrokerRefused) as refused:
        world.attest(world.firmware_b)
    assert refused.value.reason == "token-invalid"
    assert world.attest(world.firmware_b, token_file=new_token) == "released"
    again = broker_cli(world.data, "rotate-host-token", "rolling-host", "--token-file", new_token, ok=False)
    assert "exists" in again.stderr
