"""A hostile host against a real broker process: every trick is refused with its stable reason code
and no secret is released."""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.broker.conftest import API, DIGEST_A, BrokerProcess, FirmwareLaunch, Owner, PlatformKeys, register


def refused(response: httpx.Response, status: int, reason: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["reason"] == reason, body
    assert "secret" not in body and "secret_header" not in body and body["error"]


def fresh(owner: Owner, **guest: object) -> tuple[str, dict, FirmwareLaunch]:
    guest_id = owner.add_guest(**guest)
    grant = owner.launch(guest_id)
    return guest_id, grant, FirmwareLaunch.start(owner.platform, grant)


def test_wrong_measurement(owner: Owner) -> None:
    _, grant, _ = fresh(owner)
    refused(owner.attest(grant["launch_id"], base64.b64encode(os.urandom(48)).decode()), 403,
            "measurement-mismatch")


def test_measurement_of_another_image(owner: Owner) -> None:
    _, grant, firmware = fresh(owner)
    refused(owner.attest(grant["launch_id"], firmware.measure(bytes(32), 0x1)), 403, "measurement-mismatch")


def test_replayed_measurement_from_an_earlier_launch(owner: Owner) -> None:
    guest, grant, firmware = fresh(owner)
    earlier = firmware.measure(DIGEST_A, 0x1)
    assert owner.attest(grant["launch_id"], earlier).status_code == 200
    later = owner.launch(guest)
    refused(owner.attest(later["launch_id"], earlier), 403, "measurement-mismatch")


def test_measurement_for_another_guests_launch(owner: Owner) -> None:
    _, grant_a, firmware_a = fresh(owner)
    _, grant_b, _ = fresh(owner)
    refused(owner.attest(grant_b["launch_id"], firmware_a.measure(DIGEST_A, 0x1)), 403, "measurement-mismatch")
    assert owner.attest(grant_a["launch_id"], firmware_a.measure(DIGEST_A, 0x1)).status_code == 200


def test_lying_about_the_platform_version_breaks_the_measurement(owner: Owner) -> None:
    _, grant, firmware = fresh(owner)
    measurement = firmware.measure(DIGEST_A, 0x1, api=API)
    refused(owner.attest(grant["launch_id"], measurement, api=(API[0], API[1] + 1)), 403, "measurement-mismatch")


def test_a_refused_single_use_launch_is_spent(owner: Owner) -> None:
    _, grant, firmware = fresh(owner)
    refused(owner.attest(grant["launch_id"], base64.b64encode(bytes(48)).decode()), 403, "measurement-mismatch")
    refused(owner.attest(grant["launch_id"], firmware.measure(DIGEST_A, 0x1)), 403, "launch-used")


def test_single_use_launch_replay_is_refused(owner: Owner) -> None:
    _, grant, firmware = fresh(owner)
    measurement = firmware.measure(DIGEST_A, 0x1)
    assert owner.attest(grant["launch_id"], measurement).status_code == 200
    refused(owner.attest(grant["launch_id"], measurement), 403, "launch-used")


def tampered(platform: PlatformKeys, offset: int) -> str:
    chain = bytearray(platform.pek + platform.oca + platform.cek)
    chain[offset] ^= 0x01
    return base64.b64encode(bytes(chain)).decode()


# PEK key, PEK signature, OCA key, CEK key. (A CEK whose own signature was altered is indistinguishable
# from a CEK signed by another ASK, and is refused as unknown-root.)
@pytest.mark.parametrize("offset", [0x20, 0x414 + 8, 2084 + 0x30, 2 * 2084 + 0x20])
def test_tampered_chain(owner: Owner, offset: int) -> None:
    guest = owner.add_guest()
    with owner.host() as host:
        response = host.post("/v1/launches", json={"guest": guest, "pdh": owner.platform.pdh_b64,
                                                    "cert_chain": tampered(owner.platform, offset)})
    refused(response, 403, "chain-invalid")


def test_pdh_from_another_platform(owner: Owner, other_platform: PlatformKeys) -> None:
    guest = owner.add_guest()
    with owner.host() as host:
        response = host.post("/v1/launches", json={"guest": guest, "pdh": other_platform.pdh_b64,
                                                    "cert_chain": owner.platform.chain_b64})
    refused(response, 403, "chain-invalid")


@pytest.mark.parametrize("form", ["qmp", "full"])
def test_unknown_ark(owner: Owner, other_platform: PlatformKeys, form: str) -> None:
    guest = owner.add_guest()
    chain = other_platform.chain_b64 if form == "qmp" else other_platform.full_b64
    with owner.host() as host:
        response = host.post("/v1/launches", json={"guest": guest, "pdh": other_platform.pdh_b64,
                                                    "cert_chain": chain})
    refused(response, 403, "unknown-root")


def test_debug_policy_refused_at_launch(owner: Owner) -> None:
    guest = owner.add_guest(policies=(0x1,))
    with owner.host() as host:
        response = host.post("/v1/launches", json={"guest": guest, "pdh": owner.platform.pdh_b64,
                                                    "cert_chain": owner.platform.chain_b64, "policy": 0x0})
    refused(response, 403, "debug-not-allowed")


def test_debug_policy_refused_at_attestation(owner: Owner) -> None:
    _, grant, firmware = fresh(owner, policies=(0x1,))
    refused(owner.attest(grant["launch_id"], firmware.measure(DIGEST_A, 0x0), policy=0x0), 403,
            "debug-not-allowed")


def test_other_policy_refused(owner: Owner) -> None:
    _, grant, firmware = fresh(owner, policies=(0x1,))
    refused(owner.attest(grant["launch_id"], firmware.measure(DIGEST_A, 0x3), policy=0x3), 403,
            "policy-not-allowed")


def test_policy_differing_from_the_session(owner: Owner) -> None:
    guest = owner.add_guest(policies=(0x1, 0x3))
    grant = owner.launch(guest)
    firmware = FirmwareLaunch.start(owner.platform, grant)
    refused(owner.attest(grant["launch_id"], firmware.measure(DIGEST_A, 0x3), policy=0x3), 403, "policy-mismatch")


def test_firmware_and_build_too_old(owner: Owner) -> None:
    _, grant, firmware = fresh(owner, min_api=(API[0], API[1] + 1))
    refused(owner.attest(grant["launch_id"], firmware.measure(DIGEST_A, 0x1)), 403, "firmware-too-old")
    _, grant, firmware = fresh(owner, min_build=200)
    refused(owner.attest(grant["launch_id"], firmware.measure(DIGEST_A, 0x1)), 403, "build-too-old")


def test_unknown_and_revoked_guests(owner: Owner) -> None:
    with owner.host() as host:
        response = host.post("/v1/launches", json={"guest": "no-such-guest", "pdh": owner.platform.pdh_b64,
                                                    "cert_chain": owner.platform.chain_b64})
    refused(response, 403, "unknown-guest")
    guest, grant, firmware = fresh(owner)
    with owner.broker.admin() as admin:
        assert admin.post(f"/admin/guests/{guest}/revoke").json()["revoked"] is True
    refused(owner.attest(grant["launch_id"], firmware.measure(DIGEST_A, 0x1)), 403, "guest-revoked")
    with owner.host() as host:
        response = host.post("/v1/launches", json={"guest": guest, "pdh": owner.platform.pdh_b64,
                                                    "cert_chain": owner.platform.chain_b64})
    refused(response, 403, "guest-revoked")


def test_missing_and_wrong_tokens(owner: Owner) -> None:
    _, grant, firmware = fresh(owner)
    measurement = firmware.measure(DIGEST_A, 0x1)
    body = {"measurement": measurement, "api_major": API[0], "api_minor": API[1], "build_id": 15, "policy": 1}
    path = f"/v1/launches/{grant['launch_id']}/attestation"
    refused(httpx.post(owner.broker.url + path, json=body), 401, "token-missing")
    refused(owner.attest(grant["launch_id"], measurement, token="not-a-token"), 401, "token-invalid")
    refused(owner.attest(grant["launch_id"], measurement, token=owner.broker.admin_token), 401, "token-invalid")
    with owner.host() as host:
        refused(host.get("/admin/guests"), 401, "token-invalid")
    other_host = register(owner.broker, owner.platform)
    refused(owner.attest(grant["launch_id"], measurement, token=other_host.host_token), 404, "unknown-launch")
    assert owner.attest(grant["launch_id"], measurement).status_code == 200  # none of that spent the launch


def test_revoked_host_token_is_refused_with_its_own_reason(owner: Owner) -> None:
    other = register(owner.broker, owner.platform)
    guest = owner.add_guest()
    launch = {"guest": guest, "pdh": owner.platform.pdh_b64, "cert_chain": owner.platform.chain_b64}
    with other.host() as host:
        grant = host.post("/v1/launches", json=launch)
        assert grant.status_code == 200, grant.text
        with owner.broker.admin() as admin:
            listed = {h["name"]: h["revoked"] for h in admin.get("/admin/hosts").json()}
            assert listed[other.host_name] is False and listed[owner.host_name] is False
            revoked = admin.post(f"/admin/hosts/{other.host_name}/revoke")
            assert revoked.status_code == 200 and revoked.json()["revoked"] is True, revoked.text
            assert {h["name"]: h["revoked"] for h in admin.get("/admin/hosts").json()}[other.host_name] is True
            refused(admin.post("/admin/hosts/no-such-host/revoke"), 404, "unknown-host")
            again = admin.post("/admin/hosts", json={"name": other.host_name})
            assert again.status_code == 400 and "never reused" in again.json()["error"]
        refused(host.post("/v1/launches", json=launch), 403, "host-revoked")
        refused(host.get(f"/v1/launches/{grant.json()['launch_id']}"), 403, "host-revoked")
    assert owner.launch(guest)["launch_id"]  # other hosts are untouched
    with owner.broker.admin() as admin:
        audit = admin.get("/admin/audit", params={"limit": 1000}).json()
    assert any(e["action"] == "revoke-host" and other.host_name in e["detail"] for e in audit)
    assert any(e["actor"] == other.host_name and e["reason"] == "host-revoked" for e in audit)


def test_oversized_bodies(owner: Owner) -> None:
    big = {"guest": "g", "pdh": "A" * 70000, "cert_chain": ""}
    with owner.host() as host:
        refused(host.post("/v1/launches", json=big), 413, "body-too-large")

        def chunks() -> Iterator[bytes]:  # no Content-Length: the cap counts streamed bytes
            for _ in range(100):
                yield b"A" * 1024

        refused(host.post("/v1/launches", content=chunks()), 413, "body-too-large")


def test_malformed_inputs_are_client_errors(owner: Owner) -> None:
    guest, grant, _ = fresh(owner)
    refused(owner.attest(grant["launch_id"], "not base64!"), 400, "bad-request")
    refused(owner.attest(grant["launch_id"], base64.b64encode(bytes(47)).decode()), 400, "bad-request")
    with owner.host() as host:
        refused(host.post("/v1/launches", json={"guest": guest, "pdh": "!!", "cert_chain": "AA=="}), 400, "bad-request")
        refused(host.post(f"/v1/launches/{grant['launch_id']}/attestation", json={"measurement": 1}), 422,
                "bad-request")


def test_rate_limit_per_token(tmp_path, platform: PlatformKeys) -> None:  # type: ignore[no-untyped-def]
    broker = BrokerProcess(tmp_path / "data", extra=("--rate-limit", "2", "--burst", "5"))
    try:
        limited = register(broker, platform)
        with limited.host() as host:
            codes = [host.get("/v1/launches/none").status_code for _ in range(12)]
        assert codes[:5] == [404] * 5 and 429 in codes[5:]
        with limited.host() as host:
            refused(host.get("/v1/launches/none"), 429, "rate-limited")
    finally:
        broker.stop()


def test_expired_launch(tmp_path, platform: PlatformKeys) -> None:  # type: ignore[no-untyped-def]
    broker = BrokerProcess(tmp_path / "data", extra=("--launch-ttl", "1"))
    try:
        short = register(broker, platform)
        _, grant, firmware = fresh(short)
        time.sleep(1.3)
        with short.host() as host:
            assert host.get(f"/v1/launches/{grant['launch_id']}").json()["state"] == "expired"
        refused(short.attest(grant["launch_id"], firmware.measure(DIGEST_A, 0x1)), 403, "launch-expired")
    finally:
        broker.stop()
