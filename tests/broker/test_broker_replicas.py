"""Two broker replicas on one PostgreSQL database serve one owner consistently: a single-use launch
created on either replica releases its secret exactly once, whichever replica the attestations reach."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.broker.conftest import DIGEST_A, BrokerProcess, FirmwareLaunch, Owner, PlatformKeys, register

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory, pg_database: str) -> Iterator[tuple[BrokerProcess, ...]]:
    first_dir = tmp_path_factory.mktemp("replica-a")
    first = BrokerProcess(first_dir, db_url=pg_database)
    second_dir = tmp_path_factory.mktemp("replica-b")
    for name in ("storage.key", "admin.token"):  # replicas share the owner's storage key and admin token
        shutil.copy2(first_dir / name, second_dir / name)
    second = BrokerProcess(Path(second_dir), db_url=pg_database)
    yield first, second
    first.stop()
    second.stop()


@pytest.fixture(scope="module")
def owners(replicas: tuple[BrokerProcess, ...], platform: PlatformKeys) -> tuple[Owner, Owner]:
    first = register(replicas[0], platform, root_name="replica-root")
    second = Owner(replicas[1], platform, first.host_token, first.host_name)  # same host, other replica
    return first, second


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_second_attestation_is_refused_on_either_replica(owners: tuple[Owner, Owner], order: tuple[int, int]) -> None:
    created_on, replayed_on = owners[order[0]], owners[order[1]]
    guest = created_on.add_guest()
    grant = created_on.launch(guest)
    firmware = FirmwareLaunch.start(created_on.platform, grant)
    measurement = firmware.measure(DIGEST_A, 0x1)
    first = created_on.attest(grant["launch_id"], measurement)
    assert first.status_code == 200, first.text
    firmware.open_secret(first.json())
    second = replayed_on.attest(grant["launch_id"], measurement)
    assert second.status_code == 403 and second.json()["reason"] == "launch-used"
    with replayed_on.host() as host:
        assert host.get(f"/v1/launches/{grant['launch_id']}").json()["state"] == "released"


def test_concurrent_attestations_release_exactly_once(owners: tuple[Owner, Owner]) -> None:
    guest = owners[0].add_guest()
    launches = []
    for index in range(12):
        grant = owners[index % 2].launch(guest)
        firmware = FirmwareLaunch.start(owners[0].platform, grant)
        launches.append((grant["launch_id"], firmware.measure(DIGEST_A, 0x1)))
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [(launch_id, pool.submit(owner.attest, launch_id, measurement))
                   for launch_id, measurement in launches for owner in owners for _ in range(2)]
        results: dict[str, list[int]] = {}
        for launch_id, future in futures:
            response = future.result()
            results.setdefault(launch_id, []).append(response.status_code)
            if response.status_code == 403:
                assert response.json()["reason"] == "launch-used"
    for launch_id, codes in results.items():
        assert sorted(codes) == [200, 403, 403, 403], (launch_id, codes)
    with owners[1].broker.admin() as admin:
        audit = admin.get("/admin/audit", params={"guest": guest, "limit": 1000}).json()
    released = [e for e in audit if e["action"] == "attest" and e["decision"] == "allow"]
    assert len(released) == len(launches)


def test_lost_database_gives_503_and_the_client_gives_up_cleanly(tmp_path: Path, postgres_url: str,
                                                                   platform: PlatformKeys) -> None:
    import psycopg
    from sqlalchemy.engine import make_url

    from sevhook.broker.client import BrokerClient, BrokerUnavailable

    base = make_url(postgres_url)
    name = f"broker_lost_{uuid.uuid4().hex[:8]}"
    server = base.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    process = BrokerProcess(tmp_path / "data", db_url=base.set(database=name).render_as_string(hide_password=False))
    try:
        owner = register(process, platform)
        guest = owner.add_guest()
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        with owner.host() as host:
            for _ in range(3):  # the pool's connections were cut: each answer is a clean 503
                response = host.post("/v1/launches", json={"guest": guest, "pdh": platform.pdh_b64,
                                                            "cert_chain": platform.chain_b64})
                assert response.status_code == 503 and response.json()["reason"] == "database-unavailable"
        with BrokerClient(process.url, token=owner.host_token, retries=1, backoff=0.01) as client:
            with pytest.raises(BrokerUnavailable, match="server error 503"):
                client.create_launch(guest, platform.pdh_b64, platform.chain_b64)
        assert "Traceback" not in process.log()
    finally:
        process.stop()
