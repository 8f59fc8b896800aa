"""The broker's host and admin API against a real server process (SQLite and PostgreSQL): the happy path, both
chain forms, reusable launches, the audit trail, and secrets that never reach disk or logs in clear."""

from __future__ import annotations

import base64
import stat

from sqlalchemy import create_engine, select

from sevhook.broker import db
from tests.broker.conftest import API, DIGEST_A, DIGEST_B, SECRET_GUID, FirmwareLaunch, Owner


def test_launch_then_attest_releases_the_secret_table(owner: Owner) -> None:
    guest = owner.add_guest(digests=(DIGEST_B, DIGEST_A), secret=b"open sesame\0")
    grant = owner.launch(guest)
    assert grant["policy"] == 0x1 and len(base64.b64decode(grant["session"])) == 128
    assert len(base64.b64decode(grant["godh"])) == 2084
    firmware = FirmwareLaunch.start(owner.platform, grant)
    answer = owner.attest(grant["launch_id"], firmware.measure(DIGEST_A, 0x1))
    assert answer.status_code == 200, answer.text
    assert firmware.open_secret(answer.json()).entries == ((SECRET_GUID, b"open sesame\0"),)
    with owner.host() as host:
        status = host.get(f"/v1/launches/{grant['launch_id']}").json()
    assert status["state"] == "released" and status["attestations"] == 1 and status["guest"] == guest


def test_full_chain_form_is_accepted(owner: Owner) -> None:
    guest = owner.add_guest()
    with owner.host() as host:
        response = host.post("/v1/launches", json={"guest": guest, "pdh": owner.platform.pdh_b64,
                                                    "cert_chain": owner.platform.full_b64})
    assert response.status_code == 200, response.text
    firmware = FirmwareLaunch.start(owner.platform, response.json())
    answer = owner.attest(response.json()["launch_id"], firmware.measure(DIGEST_A, 0x1))
    assert answer.status_code == 200, answer.text


def test_requested_policy_must_be_allowed_and_is_bound_into_the_session(owner: Owner) -> None:
    guest = owner.add_guest(policies=(0x1, 0x5))
    grant = owner.launch(guest, policy=0x5)
    assert grant["policy"] == 0x5
    firmware = FirmwareLaunch.start(owner.platform, grant)  # open_session checks the policy MAC
    assert owner.attest(grant["launch_id"], firmware.measure(DIGEST_A, 0x5), policy=0x5).status_code == 200


def test_reusable_launch_can_be_attested_again(owner: Owner) -> None:
    guest = owner.add_guest(reusable=True)
    grant = owner.launch(guest)
    firmware = FirmwareLaunch.start(owner.platform, grant)
    for _ in range(2):
        answer = owner.attest(grant["launch_id"], firmware.measure(DIGEST_A, 0x1))
        assert answer.status_code == 200, answer.text
        firmware.open_secret(answer.json())


def test_minimum_api_and_build_pass_when_met(owner: Owner) -> None:
    guest = owner.add_guest(min_api=API, min_build=15)
    grant = owner.launch(guest)
    firmware = FirmwareLaunch.start(owner.platform, grant)
    assert owner.attest(grant["launch_id"], firmware.measure(DIGEST_A, 0x1)).status_code == 200


def test_every_decision_is_audited_with_measurement_and_reason(owner: Owner) -> None:
    guest = owner.add_guest()
    grant = owner.launch(guest)
    firmware = FirmwareLaunch.start(owner.platform, grant)
    measurement = firmware.measure(DIGEST_A, 0x1)
    assert owner.attest(grant["launch_id"], measurement).status_code == 200
    assert owner.attest(grant["launch_id"], measurement).status_code == 403
    with owner.broker.admin() as admin:
        entries = admin.get("/admin/audit", params={"guest": guest, "limit": 1000}).json()
    decisions = [(e["action"], e["decision"], e["reason"]) for e in entries]
    assert decisions == [("add-guest", "allow", "ok"), ("create-launch", "allow", "ok"),
                         ("attest", "allow", "released"), ("attest", "deny", "launch-used")]
    assert entries[2]["measurement"] == base64.b64decode(measurement).hex() == entries[3]["measurement"]


def test_secrets_and_launch_keys_are_encrypted_at_rest_and_not_logged(owner: Owner) -> None:
    marker = b"very-secret-marker-0123456789"
    guest = owner.add_guest(secret=marker)
    grant = owner.launch(guest)
    firmware = FirmwareLaunch.start(owner.platform, grant)
    assert owner.attest(grant["launch_id"], firmware.measure(DIGEST_A, 0x1)).status_code == 200
    data_dir = owner.broker.data_dir
    engine = create_engine(owner.broker.db_url)
    with engine.connect() as conn:
        stored = b"".join(bytes(value) for table in (db.secrets, db.launches)
                          for row in conn.execute(select(table)).all() for value in row
                          if isinstance(value, (bytes, memoryview)))
    engine.dispose()
    assert stored
    for value in (marker, firmware.tek, firmware.tik):
        assert value not in stored
        assert value.hex() not in owner.broker.log() and base64.b64encode(value).decode() not in owner.broker.log()
    for name in ("storage.key", "admin.token"):
        assert stat.S_IMODE((data_dir / name).stat().st_mode) == 0o600


def test_admin_views_never_show_secret_values(owner: Owner) -> None:
    guest = owner.add_guest(secret=b"hidden-value")
    with owner.broker.admin() as admin:
        listing = admin.get("/admin/guests").text
        single = admin.get(f"/admin/guests/{guest}").json()
    assert "hidden-value" not in listing and base64.b64encode(b"hidden-value").decode() not in listing
    assert single["secret_guids"] == [str(SECRET_GUID)] and single["revoked"] is False


def test_openapi_spec_and_health_are_served(owner: Owner) -> None:
    with owner.host() as host:
        spec = host.get("/openapi.json").json()
        assert host.get("/healthz").json() == {"status": "ok"}
    assert {"/v1/launches", "/v1/launches/{launch_id}/attestation", "/v1/launches/{launch_id}"} <= set(spec["paths"])


def test_sealed_launch_keys_are_bound_to_their_row(owner: Owner) -> None:
    guest = owner.add_guest()
    first, second = owner.launch(guest), owner.launch(guest)
    firmware = FirmwareLaunch.start(owner.platform, second)
    engine = create_engine(owner.broker.db_url)
    with engine.begin() as conn:  # an attacker with database access swaps sealed keys between launches
        sealed = conn.execute(select(db.launches.c.keys_sealed).where(db.launches.c.id == first["launch_id"])).scalar()
        conn.execute(db.launches.update().where(db.launches.c.id == second["launch_id"]).values(keys_sealed=sealed))
    engine.dispose()
    answer = owner.attest(second["launch_id"], firmware.measure(DIGEST_A, 0x1))
    assert answer.status_code == 500 and answer.json()["reason"] == "storage-integrity"
    assert "secret" not in answer.json()
