"""Fixtures shared by the tests (helpers live in tests/support.py)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import Restored, require

from dpmigrate import config


@pytest.fixture
def criu_path() -> str:
    require("root", "criu")
    return config.load().criu


@pytest.fixture
def cluster_state_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A short private DPMIGRATE_STATE_DIR for a local cluster (unix socket paths are limited
    to 107 bytes), cleaned with `clean` whatever the test did or failed to do."""
    from dpmigrate.runtime.cluster import clean

    require("root", "netns", "criu", "nftables")
    path = Path(tempfile.mkdtemp(prefix="dpm-t-"))
    monkeypatch.setenv("DPMIGRATE_STATE_DIR", str(path))
    monkeypatch.delenv("DPMIGRATE_TOKEN", raising=False)
    try:
        yield path
    finally:
        clean(str(path))
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def restored() -> Iterator[Restored]:
    """Collects the PIDs a test restores; kills and reaps them whatever happens."""
    kept = Restored()
    try:
        yield kept
    finally:
        kept.kill_all()
