"""The broker obtains the ASK-signed CEK itself: a real `sevhook broker serve` process given the
firmware's unsigned CEK (the software platform's query-sev-capabilities data, laid out as real
firmware exports it) fetches the signed copy from a simulated AMD KDS, caches it, coalesces
concurrent fetches, honours 429/Retry-After, and refuses with cek-unsigned / kds-unavailable /
cek-mismatch, never unknown-root."""

from __future__ import annotations

import base64
import subprocess
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sevhook.broker.kds import KdsClient, is_unsigned
from sevhook.sev.certs import SevCertificate
from sevhook.sim.kds import SimulatedKds
from sevhook.sim.platform import SoftwarePlatform, init_platform
from sevhook.sim.state import StateDir
from tests.broker.conftest import DIGEST_A, ROOT, SEVHOOK, BrokerProcess, free_port


@pytest.fixture(scope="module")
def sim_platform(tmp_path_factory: pytest.TempPathFactory) -> SoftwarePlatform:
    state = StateDir(tmp_path_factory.mktemp("sim") / "state")
    return init_platform(state, rsa_bits=2048)[0]


@pytest.fixture(scope="module")
def other_sim_platform(tmp_path_factory: pytest.TempPathFactory) -> SoftwarePlatform:
    state = StateDir(tmp_path_factory.mktemp("sim-other") / "state")
    return init_platform(state, rsa_bits=2048)[0]


@pytest.fixture
def kds(sim_platform: SoftwarePlatform) -> Iterator[SimulatedKds]:
    with SimulatedKds([sim_platform.state]) as server:
        yield server


class World:
    """A broker (own data directory) trusting the simulated root, with one host and one guest."""

    def __init__(self, root: Path, platform: SoftwarePlatform, kds_url: str) -> None:
        self.broker = BrokerProcess(root, extra=("--kds-url", kds_url, "--rate-limit", "0"))
        self.platform = platform
        ca = platform.cert("ask") + platform.cert("ark")
        with self.broker.admin() as admin:
            assert admin.post("/admin/roots", json={"name": "sim", "test": True,
                                                    "ca": base64.b64encode(ca).decode()}).status_code == 200
            answer = admin.post("/admin/hosts", json={"name": "host1"})
            assert answer.status_code == 200, answer.text
            self.token = answer.json()["token"]
            self.guest = f"guest-{uuid.uuid4().hex[:8]}"
            answer = admin.post("/admin/guests", json={"id": self.guest, "digests": [DIGEST_A.hex()],
                                                       "policies": [1]})
            assert answer.status_code == 200, answer.text

    def launch(self, cpu0_id: str | None = None, **override: str) -> tuple[int, dict]:
        caps = self.platform.qmp_capabilities()
        body = {"guest": self.guest, "pdh": caps["pdh"], "cert_chain": caps["cert-chain"],
                "cpu0_id": caps["cpu0-id"] if cpu0_id is None else cpu0_id, **override}
        import httpx

        response = httpx.post(f"{self.broker.url}/v1/launches", json=body, timeout=60,
                              headers={"Authorization": f"Bearer {self.token}"})
        return response.status_code, response.json()


@pytest.fixture
def world_factory(tmp_path: Path, sim_platform: SoftwarePlatform) -> Iterator:
    worlds: list[World] = []

    def make(kds_url: str, platform: SoftwarePlatform = sim_platform) -> World:
        world = World(tmp_path / f"broker{len(worlds)}", platform, kds_url)
        worlds.append(world)
        return world

    yield make
    for world in worlds:
        world.broker.stop()


def test_the_stand_in_exports_the_cek_unsigned_as_real_firmware(sim_platform: SoftwarePlatform) -> None:
    chain = base64.b64decode(sim_platform.qmp_capabilities()["cert-chain"])
    cek = SevCertificate.parse(chain[2 * 2084:])
    assert is_unsigned(cek)
    assert all(slot.usage == 0x1000 and slot.algorithm == 0 and slot.data == bytes(512) for slot in cek.signatures)


def test_a_launch_from_the_firmware_export_succeeds_through_the_kds(world_factory, kds: SimulatedKds) -> None:
    world = world_factory(kds.url)
    status, answer = world.launch()
    assert status == 200, answer
    assert answer["launch_id"]
    assert kds.requests == [f"/cek/id/{world.platform.chip_id_hex}"]


def test_the_cached_cek_is_used_without_the_kds(world_factory, kds: SimulatedKds) -> None:
    world = world_factory(kds.url)
    assert world.launch()[0] == 200
    kds.stop()
    status, answer = world.launch()
    assert status == 200, answer
    assert len(kds.requests) == 1


def test_kds_down_gives_kds_unavailable(world_factory) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    status, answer = world_factory(url).launch()
    assert (status, answer["reason"]) == (403, "kds-unavailable")
    assert url in answer["error"]


def test_kds_404_gives_cek_unsigned(world_factory, kds: SimulatedKds) -> None:
    stranger = base64.b64encode(bytes(range(64))).decode()
    status, answer = world_factory(kds.url).launch(cpu0_id=stranger)
    assert (status, answer["reason"]) == (403, "cek-unsigned")
    assert "404" in answer["error"]


def test_a_signed_cek_for_another_key_gives_cek_mismatch(world_factory, kds: SimulatedKds,
                                                          sim_platform: SoftwarePlatform,
                                                          other_sim_platform: SoftwarePlatform) -> None:
    kds.put(sim_platform.chip_id_hex, other_sim_platform.signed_cek())
    status, answer = world_factory(kds.url).launch()
    assert (status, answer["reason"]) == (403, "cek-mismatch")


def test_no_cpu0_id_and_no_cache_gives_cek_unsigned(world_factory, kds: SimulatedKds) -> None:
    world = world_factory(kds.url)
    status, answer = world.launch(cpu0_id="")
    assert (status, answer["reason"]) == (403, "cek-unsigned")
    assert "cpu0_id" in answer["error"] and kds.requests == []


def test_429_with_retry_after_is_retried(world_factory, kds: SimulatedKds) -> None:
    kds.throttle(2, retry_after=1)
    status, answer = world_factory(kds.url).launch()
    assert status == 200, answer
    assert len(kds.requests) == 3


def test_twenty_concurrent_launches_for_one_chip_make_one_kds_request(world_factory, kds: SimulatedKds) -> None:
    kds.delay = 1.0
    world = world_factory(kds.url)
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: world.launch(), range(20)))
    assert [status for status, _ in results] == [200] * 20, results
    assert len(kds.requests) == 1


def test_air_gapped_broker_uses_an_imported_cek(world_factory, sim_platform: SoftwarePlatform,
                                                tmp_path: Path) -> None:
    world = world_factory("none")
    status, answer = world.launch()
    assert (status, answer["reason"]) == (403, "cek-unsigned")
    assert "add-cek" in answer["error"]
    cek_file = tmp_path / "cek.cert"
    cek_file.write_bytes(sim_platform.signed_cek())
    result = subprocess.run([*SEVHOOK, "broker", "add-cek", str(cek_file), "--chip-id", sim_platform.chip_id_hex,
                             "--data-dir", str(world.broker.data_dir)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert world.launch()[0] == 200


def test_add_cek_refuses_an_unsigned_cek(world_factory, sim_platform: SoftwarePlatform, tmp_path: Path) -> None:
    world = world_factory("none")
    cek_file = tmp_path / "cek.cert"
    cek_file.write_bytes(sim_platform.unsigned_cek())
    result = subprocess.run([*SEVHOOK, "broker", "add-cek", str(cek_file), "--data-dir", str(world.broker.data_dir)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert "no ASK signature" in result.stderr and "Traceback" not in result.stderr


def test_a_full_chain_needs_no_kds(world_factory, sim_platform: SoftwarePlatform) -> None:
    world = world_factory("none")
    status, answer = world.launch(cpu0_id="", cert_chain=base64.b64encode(sim_platform.full_chain()).decode())
    assert status == 200, answer


def test_kds_client_gives_up_within_its_deadline() -> None:
    calls: list[float] = []

    def get(url: str, timeout: float):
        calls.append(timeout)
        raise OSError("connection refused")

    client = KdsClient("http://kds.invalid", deadline=5, attempts=3, get=get, sleep=lambda _: None)
    with pytest.raises(Exception, match=r"kds.invalid.*connection refused") as caught:
        client.fetch("AB")
    assert getattr(caught.value, "reason", "") == "kds-unavailable"
    assert len(calls) == 3 and all(timeout <= 5 for timeout in calls)


def test_kds_client_honours_retry_after_and_retries_server_errors() -> None:
    from sevhook.broker.kds import KdsAnswer

    answers = [KdsAnswer(429, b"", 2.0), KdsAnswer(503, b"", None), KdsAnswer(200, b"CEK", None)]
    slept: list[float] = []
    client = KdsClient("http://kds.test", attempts=4, get=lambda url, timeout: answers.pop(0), sleep=slept.append)
    assert client.fetch("AB") == b"CEK"
    assert slept[0] == 2.0 and len(slept) == 2 and answers == []


def test_kds_client_does_not_retry_a_client_error() -> None:
    from sevhook.broker.kds import KdsAnswer

    calls: list[str] = []

    def get(url: str, timeout: float) -> KdsAnswer:
        calls.append(url)
        return KdsAnswer(400, b"", None)

    with pytest.raises(Exception, match="HTTP 400") as caught:
        KdsClient("http://kds.test", get=get, sleep=lambda _: None).fetch("AB")
    assert getattr(caught.value, "reason", "") == "kds-unavailable" and calls == ["http://kds.test/cek/id/AB"]
