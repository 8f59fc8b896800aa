"""Shared test fixtures: where the reference data is (tests/data), and the services scripts/run test started."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"  # public reference data, with sources and licences: tests/data/README.md
FIXTURES = ROOT / "fixtures"
SERVICES_ENV = ROOT / ".run" / "services.env"


def _services() -> dict[str, str]:
    """Variables written by scripts/services; the environment wins so a developer can override."""
    values: dict[str, str] = {}
    if SERVICES_ENV.exists():
        for line in SERVICES_ENV.read_text().splitlines():
            key, _, value = line.partition("=")
            if key:
                values[key] = value
    values.update({k: v for k, v in os.environ.items() if k.startswith("SEVHOOK_TEST_")})
    return values


@pytest.fixture(scope="session")
def shared() -> Path:
    """The folder holding vectors/ and libvirt-golden/ (named after where the data came from)."""
    assert DATA.is_dir(), f"{DATA} is missing: the reference data is part of the repository"
    return DATA


@pytest.fixture(scope="session")
def services() -> dict[str, str]:
    return _services()


@pytest.fixture(scope="session")
def libvirt_uri(services: dict[str, str]) -> str:
    uri = services.get("SEVHOOK_TEST_LIBVIRT")
    if not uri:
        pytest.fail("libvirtd is not running: run the suite with `scripts/run test`")
    return uri


@pytest.fixture(scope="session")
def postgres_url(services: dict[str, str]) -> str:
    url = services.get("SEVHOOK_TEST_PG_URL")
    if not url:
        pytest.fail("PostgreSQL is not running: run the suite with `scripts/run test`")
    return url
