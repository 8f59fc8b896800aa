"""The fast path (sevhook.broker.app.FastPath) answers exactly as the FastAPI routes do: a refusal on
it looks like the same refusal on a route it does not take, and a request it does not take (bad launch
id, content type or body) gets FastAPI's own answer. Real broker processes on loopback."""

from __future__ import annotations

import base64
import concurrent.futures

import httpx

from tests.broker.conftest import Owner

MEASUREMENT = base64.b64encode(bytes(48)).decode()
ATTESTATION = {"measurement": MEASUREMENT, "api_major": 0, "api_minor": 24, "build_id": 15, "policy": 1}


def test_a_bad_token_is_refused_the_same_on_the_fast_path_and_on_a_route(owner: Owner) -> None:
    with owner.host("not-a-registered-token") as host:
        fast = host.post("/v1/launches/abc/attestation", json=ATTESTATION)
        routed = host.get("/v1/launches/abc")  # launch status: a FastAPI route
    assert fast.status_code == routed.status_code == 401
    assert fast.json() == routed.json() == {"error": "the bearer token is not a registered host's token",
                                            "reason": "token-invalid"}
    assert fast.headers["www-authenticate"] == routed.headers["www-authenticate"] == "Bearer"


def test_an_unknown_launch_is_refused_and_audited_on_the_fast_path(owner: Owner) -> None:
    response = owner.attest("0000-no-such-launch", MEASUREMENT)
    assert response.status_code == 404 and response.json()["reason"] == "unknown-launch", response.text
    with owner.broker.admin() as admin:
        entries = admin.get("/admin/audit", params={"limit": 1000}).json()
    assert any(e["launch_id"] == "0000-no-such-launch" and e["reason"] == "unknown-launch" for e in entries)


def test_requests_the_fast_path_does_not_take_get_fastapis_answers(owner: Owner) -> None:
    with owner.host() as host:
        bad_id = host.post("/v1/launches/not_a_valid_id!/attestation", json=ATTESTATION)
        not_json = host.post("/v1/launches/abc/attestation", content=b"measurement=x",
                             headers={"content-type": "text/plain"})
        missing = host.post("/v1/launches/abc/attestation", json={"measurement": MEASUREMENT})
        too_big = host.post("/v1/launches/abc/attestation", json={**ATTESTATION, "api_major": 256})
        broken = host.post("/v1/launches", content=b"{not json", headers={"content-type": "application/json"})
    for response in (bad_id, not_json, missing, too_big, broken):
        assert response.status_code == 422 and response.json()["reason"] == "bad-request", response.text
    assert "launch_id" in bad_id.json()["error"]
    assert "api_minor" in missing.json()["error"] and "api_major" in too_big.json()["error"]


def test_a_burst_of_health_probes_is_answered(owner: Owner) -> None:
    def probe(_n: int) -> int:
        return httpx.get(f"{owner.broker.url}/healthz", timeout=10).status_code

    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        assert set(pool.map(probe, range(64))) == {200}
    assert httpx.head(f"{owner.broker.url}/healthz", timeout=10).status_code == 405  # not on the fast path
