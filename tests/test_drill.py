"""`dpmigrate drill`: the list, the JSON schema, a few quick drills on a real local cluster
(each must pass with nothing lost or duplicated *and* show evidence that its fault
happened), and a drill whose invariant is broken on purpose must fail with exit status 1."""

from __future__ import annotations

import json

import pytest
from support import require, run_cli

from dpmigrate.drill import DRILLS

QUICK = ["kill-stage", "netem", "strangers", "migrate-loop"]
KEYS = {"name", "passed", "lost", "duplicated", "detail", "downtime_s", "time_s", "evidence",
        "failures", "migrations", "checker", "total"}  # fmt: skip


def test_list_names_every_drill() -> None:
    result = run_cli("drill", "--list", "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)["drills"]
    assert [d["name"] for d in listed] == list(DRILLS)
    assert all(d["description"] for d in listed)
    for name in ("migrate-loop", "pause-stage", "criu-fault", "strangers", "etcd-restart"):
        assert name in DRILLS


def test_an_unknown_drill_is_a_usage_error() -> None:
    result = run_cli("drill", "no-such-drill")
    assert result.returncode == 2 and "unknown drill" in result.stderr


@pytest.fixture(scope="module")
def quick_run() -> dict:
    """One run of the quick drills on one shared cluster (it costs about a minute)."""
    require("root", "netns", "criu", "nftables", "etcd")
    result = run_cli("drill", *QUICK, "--strategy", "stop-and-copy", "--json", timeout=600)
    report = json.loads(result.stdout)
    report["returncode"] = result.returncode
    report["stderr"] = result.stderr
    return report


def test_quick_drills_pass_with_evidence(quick_run: dict) -> None:
    drills = {d["name"]: d for d in quick_run["drills"]}
    assert list(drills) == QUICK, quick_run["stderr"]
    for d in drills.values():
        assert set(d) >= KEYS, d
        assert d["passed"], (d["name"], d["failures"])
        assert d["lost"] == 0 and d["duplicated"] == 0, d
        assert d["checker"]["received"] == d["total"] > 0, d
        assert d["evidence"].get("received_at_fault", 0) > 0, d  # the fault hit live traffic
        assert d["evidence"]["received_at_fault"] < d["total"], d
    assert quick_run["returncode"] == 0 and quick_run["passed"] is True
    kill = drills["kill-stage"]["evidence"]
    assert kill["killed_pid"] != kill["restarted_pid"] and kill["restarts"] >= 1
    net = drills["netem"]["evidence"]
    assert "netem" in net["qdisc"] or ("tbf" in net["qdisc"] and "dup to" in net["nft"]), net
    strangers = drills["strangers"]["evidence"]
    assert strangers["connections"] > 0 and len(strangers["targets"]) >= 4 + 2, strangers
    hops = [(m["from"], m["to"], m["rolled_back"]) for m in drills["migrate-loop"]["migrations"]]
    assert hops == [("node2", "node4", False), ("node4", "node2", False)], hops


def test_a_broken_invariant_fails_the_drill_with_exit_status_1() -> None:
    """The hidden hook makes the checker drop 3 of its input messages: the drill must say
    they were lost, fail, and exit 1."""
    require("root", "netns", "criu", "nftables", "etcd")
    result = run_cli("drill", "kill-stage", "--drop-checker-input", "3", "--json", timeout=300)
    assert result.returncode == 1, result.stderr
    (drill,) = json.loads(result.stdout)["drills"]
    assert drill["passed"] is False and drill["lost"] == 3, drill
    assert "checker counted 3 lost" in drill["detail"], drill["detail"]
    assert "differs from an uninterrupted run" in drill["detail"], drill["detail"]
