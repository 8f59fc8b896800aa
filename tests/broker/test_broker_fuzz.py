"""Fuzzing the broker's API from its own OpenAPI spec (schemathesis): whatever a client sends, the
server answers with a documented client error or success, never a server error."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from tests.broker.conftest import BrokerProcess, Owner, PlatformKeys, register


@pytest.fixture(scope="module")
def fuzz_owner(tmp_path_factory: pytest.TempPathFactory, platform: PlatformKeys) -> Iterator[Owner]:
    process = BrokerProcess(tmp_path_factory.mktemp("broker-fuzz"),
                            extra=("--rate-limit", "0", "--auth-failure-rate", "0"))
    owner = register(process, platform)
    owner.add_guest()
    yield owner
    process.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_owner: Owner) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{fuzz_owner.broker.url}/openapi.json")


CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]


def operations(api_schema: schemathesis.BaseSchema) -> list:
    found = [result.ok() for result in api_schema.get_all_operations()]
    assert len(found) >= 10, "the spec lost operations"
    return found


def test_api_never_fails_with_a_server_error(api_schema: schemathesis.BaseSchema, fuzz_owner: Owner) -> None:
    # schemathesis' pytest plugin does not support this pytest, so the cases are driven by hypothesis here
    calls: list[int] = []
    for operation, mode in itertools.product(operations(api_schema), schemathesis.GenerationMode):
        token = fuzz_owner.broker.admin_token if operation.path.startswith("/admin") else fuzz_owner.host_token
        checks = CHECKS if mode is schemathesis.GenerationMode.POSITIVE else [not_a_server_error]

        @given(case=operation.as_strategy(mode))
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case: schemathesis.Case) -> None:
            response = case.call_and_validate(headers={"Authorization": f"Bearer {token}"}, checks=checks,  # noqa: B023  (run() is called in this iteration)
                                              timeout=30)
            calls.append(response.status_code)

        try:
            run()
        except Unsatisfiable:
            assert mode is schemathesis.GenerationMode.NEGATIVE  # e.g. /healthz has nothing to get wrong
    assert len(calls) > 100 and 200 in calls and 422 in calls, sorted(set(calls))


def test_api_without_credentials_is_refused_cleanly(api_schema: schemathesis.BaseSchema) -> None:
    for operation in operations(api_schema):

        @given(case=operation.as_strategy())
        @settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case: schemathesis.Case) -> None:
            response = case.call(timeout=30)
            assert response.status_code < 500, response.text
            if case.path not in ("/healthz", "/readyz"):
                assert response.status_code in (401, 404, 405, 413, 422), response.text

        run()
