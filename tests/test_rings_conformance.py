"""Every ring transport passes the same conformance checks (dpmigrate.testing)."""

from __future__ import annotations

import pytest

from dpmigrate.testing.conformance import CHECKS, Harness


@pytest.fixture(params=["mem", "shm", "tcp"])
def harness(request: pytest.FixtureRequest, tmp_path) -> Harness:
    h = Harness(request.param, tmp_path)
    yield h
    h.close()


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__.removeprefix("check_") for c in CHECKS])
def test_conformance(harness: Harness, check) -> None:
    check(harness)
