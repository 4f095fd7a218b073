"""Fixtures shared by the tests (helpers live in tests/support.py)."""

from __future__ import annotations

import pytest
from support import require

from dpmigrate import config


@pytest.fixture
def criu_path() -> str:
    require("root", "criu")
    return config.load().criu
