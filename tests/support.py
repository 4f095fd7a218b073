"""Helpers shared by the tests: the capability gate and running the CLI.

``require(what)`` skips a test whose machine truly lacks something, with the reason. With
DPMIGRATE_STRICT=1 (CI sets it) a missing CRIU, root, network namespaces or nftables is a
failure instead: CI installs all of them, so such a skip would hide a broken set-up step. Only
what the hardware can lack (an RDMA device) may still skip there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dpmigrate import config

#: Capabilities a CI machine must have; missing one in strict mode fails the test.
_MANDATORY = {"root", "criu", "netns", "nftables"}


def _has(what: str) -> tuple[bool, str]:
    if what == "root":
        return os.geteuid() == 0, "needs root"
    if what == "criu":
        cfg = config.load()
        if not os.access(cfg.criu, os.X_OK):
            return False, f"needs criu >= 4.2 at {cfg.criu} (run scripts/setup)"
        return True, ""
    if what == "netns":
        ok = shutil.which("unshare") is not None and os.geteuid() == 0
        return ok, "needs network namespaces (root and util-linux unshare)"
    if what == "nftables":
        ok = shutil.which("nft") is not None and os.geteuid() == 0
        return ok, "needs nftables (apt-get install nftables) and root"
    if what == "rdma":
        return bool(os.listdir("/sys/class/infiniband")) if os.path.isdir(
            "/sys/class/infiniband"
        ) else False, "no RDMA device on this machine"
    raise ValueError(f"unknown capability {what!r}")


def require(*what: str) -> None:
    """Skip (or, in strict mode, fail) unless this machine has every capability in ``what``."""
    strict = config.load().strict
    for item in what:
        ok, reason = _has(item)
        if ok:
            continue
        if strict and item in _MANDATORY:
            pytest.fail(f"DPMIGRATE_STRICT: {reason}; scripts/setup should have provided it")
        pytest.skip(reason)


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the installed `dpmigrate` command as a user would."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    exe = os.path.join(os.path.dirname(sys.executable), "dpmigrate")
    if not os.path.exists(exe):
        exe = shutil.which("dpmigrate") or "dpmigrate"
    return subprocess.run(
        [exe, *args], capture_output=True, text=True, env=full_env, timeout=timeout, check=False
    )


EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "flows" / "app.toml"


def paced_flows(folder: Path, total: int, rate: int = 20000) -> Path:
    """The flows example with ``total`` packets at ``rate`` per second, written to ``folder``."""
    text = EXAMPLE.read_text().replace("total = 20000", f"total = {total}, rate = {rate}")
    assert f"total = {total}" in text
    (folder / "stages.py").write_text((EXAMPLE.parent / "stages.py").read_text())
    path = folder / "app.toml"
    path.write_text(text)
    return path


def checker_of(stages: list[dict]) -> dict:
    """The flows checker's metrics (received, lost, duplicated, digest) from a stage list."""
    return next(s["metrics"] for s in stages if s["name"] == "check")
