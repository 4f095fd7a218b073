"""`dpmigrate doctor` against the real criu of this machine."""

from __future__ import annotations

import json
import os
import stat

import pytest
from support import require, run_cli

from dpmigrate.checkpoint.criu_binary import MIN_VERSION, CriuBinary
from dpmigrate.errors import CriuNotFound


def test_real_criu_is_supported(criu_path: str) -> None:
    criu = CriuBinary(criu_path)
    major, minor, _ = criu.version()
    assert (major, minor) >= MIN_VERSION
    criu.require_supported()
    assert criu.check().ok, "plain `criu check` must pass on this machine"
    assert criu.check("uffd-noncoop").ok, "lazy pages (post-copy) need userfaultfd"
    assert not criu.check("no-such-feature").ok


def test_too_old_criu_is_refused(tmp_path) -> None:
    old = tmp_path / "criu"
    old.write_text("#!/bin/sh\necho 'Version: 3.17.1'\n")
    old.chmod(old.stat().st_mode | stat.S_IXUSR)
    criu = CriuBinary(str(old))
    assert criu.version() == (3, 17, 1)
    with pytest.raises(CriuNotFound, match=r"version 3\.17\.1.*4\.2 or newer"):
        criu.require_supported()


def test_doctor_json_shape_and_verdict(criu_path: str) -> None:
    require("netns", "nftables")
    result = run_cli("doctor", "--json", timeout=120)
    report = json.loads(result.stdout)
    assert set(report) == {"ok", "criu", "checks"}
    assert report["criu"]["path"] == criu_path
    assert report["criu"]["version"].startswith("4.")
    names = set()
    for check in report["checks"]:
        assert set(check) == {"name", "status", "detail"}
        assert check["status"] in {"ok", "warn", "fail"}
        assert check["detail"], f"check {check['name']} says nothing"
        names.add(check["name"])
    for expected in (
        "criu version",
        "criu check",
        "lazy pages (userfaultfd)",
        "memory dirty tracking",
        "tcp repair",
        "nftables network lock",
        "root",
        "network namespaces",
        "hugepages",
        "pipe-max-size",
        "rdma devices",
        "pycriu",
        "etcd",
        "cluster store",
    ):
        assert expected in names
    failed = [c for c in report["checks"] if c["status"] == "fail"]
    assert report["ok"] is (not failed)
    assert result.returncode == (0 if report["ok"] else 1)
    # scripts/setup prepared this machine: checkpoint and migration must be possible.
    assert report["ok"], f"doctor failed checks: {failed}"


def test_doctor_with_missing_criu_says_where_and_how_to_fix() -> None:
    result = run_cli("doctor", env={"DPMIGRATE_CRIU": "/nonexistent"})
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "/nonexistent" in lines[0] and "scripts/setup" in lines[0]
    assert "DPMIGRATE_CRIU" in lines[0]


def test_doctor_with_non_executable_criu(tmp_path) -> None:
    fake = tmp_path / "criu"
    fake.write_text("not a program")
    os.chmod(fake, 0o644)
    result = run_cli("doctor", "--json", env={"DPMIGRATE_CRIU": str(fake)})
    assert result.returncode == 1
    assert "not executable" in result.stderr
