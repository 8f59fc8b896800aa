"""End to end with the software platform (sevhook.sim): the broker makes the session, the software
secure processor opens it, measures the firmware the host loaded, and accepts the secret packet the
broker released only if that measurement is one the owner registered."""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sevhook.broker.client import BrokerClient, BrokerRefused
from sevhook.sev.launch_digest import sev_launch_digest
from sevhook.sev.secret import DISK_PASSPHRASE_GUID, SecretTable
from sevhook.sim.firmware_errors import FirmwareError
from sevhook.sim.kds import SimulatedKds
from sevhook.sim.platform import PlatformConfig, SoftwarePlatform, init_platform
from sevhook.sim.state import StateDir
from tests.broker.conftest import ROOT, SEVHOOK, BrokerProcess

SECRET_GPA = 0x80_0000


def admin(data: Path, *args: str | Path) -> str:
    result = subprocess.run([*SEVHOOK, "broker", *map(str, args), "--data-dir", str(data)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def software_platform(tmp_path_factory: pytest.TempPathFactory) -> SoftwarePlatform:
    state = StateDir(tmp_path_factory.mktemp("sim-platform"))
    return init_platform(state, PlatformConfig(api_major=0, api_minor=24, build_id=15), rsa_bits=2048)[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, software_platform: SoftwarePlatform, shared: Path
          ) -> Iterator[tuple[BrokerProcess, Path, Path]]:
    work = tmp_path_factory.mktemp("e2e")
    data = work / "data"
    admin(data, "init")
    (work / "sim-ca.cert").write_bytes(software_platform.cert("ask") + software_platform.cert("ark"))
    assert "test root" in admin(data, "add-root", "software-platform", "--ca", work / "sim-ca.cert", "--test")
    admin(data, "add-host", "sim-host", "--token-file", work / "host.token")
    firmware = shared / "vectors/sevctl/OVMF.amdsev.trimmed.fd"
    (work / "passphrase").write_text("luks passphrase from the owner\n")
    admin(data, "add-guest", "e2e-guest", "--firmware", firmware, "--policy", "0x1", "--min-api", "0.17",
          "--disk-passphrase", work / "passphrase")
    kds = SimulatedKds([software_platform.state]).start()  # the signed CEK's source, as AMD's KDS for real chips
    broker = BrokerProcess(data, extra=("--kds-url", kds.url))
    yield broker, work / "host.token", firmware
    broker.stop()
    kds.stop()


def launch(platform: SoftwarePlatform, client: BrokerClient, image: bytes, full_chain: bool = False):  # type: ignore[no-untyped-def]
    """What the host does: capabilities -> broker session -> LAUNCH_START/UPDATE/MEASURE -> broker."""
    caps = platform.qmp_capabilities()
    chain = base64.b64encode(platform.full_chain()).decode() if full_chain else str(caps["cert-chain"])
    grant = client.create_launch("e2e-guest", str(caps["pdh"]), chain, str(caps["cpu0-id"]))
    context = platform.launch_start(grant.policy, base64.b64decode(grant.godh_b64),
                                    base64.b64decode(grant.session_b64), label="e2e")
    context.launch_update_data(image, "firmware")
    blob = context.launch_measure()
    return grant, context, base64.b64encode(blob).decode()


@pytest.mark.parametrize("full_chain", [False, True])
def test_secret_reaches_the_software_processor(software_platform: SoftwarePlatform, setup, full_chain: bool  # type: ignore[no-untyped-def]
                                               ) -> None:
    broker, token_file, firmware = setup
    with BrokerClient(broker.url, token_file=token_file) as client:
        grant, context, measurement = launch(software_platform, client, firmware.read_bytes(), full_chain)
        assert context.launch_digest == sev_launch_digest(firmware)
        secret = client.attest(grant.launch_id, measurement, *context.api, context.build_id, context.policy)
        plaintext = context.launch_secret(base64.b64decode(secret.header_b64), base64.b64decode(secret.secret_b64),
                                          SECRET_GPA)
        assert SecretTable.parse(plaintext).entries == ((DISK_PASSPHRASE_GUID, b"luks passphrase from the owner\0"),)
        context.launch_finish()
        with pytest.raises(BrokerRefused) as replay:
            client.attest(grant.launch_id, measurement, *context.api, context.build_id, context.policy)
        assert replay.value.reason == "launch-used"


def test_a_host_that_loads_other_firmware_gets_nothing(software_platform: SoftwarePlatform, setup) -> None:  # type: ignore[no-untyped-def]
    broker, token_file, firmware = setup
    tampered = bytearray(firmware.read_bytes())
    tampered[100] ^= 0xFF
    with BrokerClient(broker.url, token_file=token_file) as client:
        grant, context, measurement = launch(software_platform, client, bytes(tampered))
        with pytest.raises(BrokerRefused) as refused:
            client.attest(grant.launch_id, measurement, *context.api, context.build_id, context.policy)
        assert refused.value.reason == "measurement-mismatch"


def test_a_packet_for_one_launch_does_not_open_in_another(software_platform: SoftwarePlatform, setup) -> None:  # type: ignore[no-untyped-def]
    broker, token_file, firmware = setup
    with BrokerClient(broker.url, token_file=token_file) as client:
        grant, _context, measurement = launch(software_platform, client, firmware.read_bytes())
        secret = client.attest(grant.launch_id, measurement, 0, 24, 15, 0x1)
        _grant2, other, _ = launch(software_platform, client, firmware.read_bytes())
        with pytest.raises(FirmwareError):
            other.launch_secret(base64.b64decode(secret.header_b64), base64.b64decode(secret.secret_b64), SECRET_GPA)
