"""Checkpoint and restore of a running flows stage on a local cluster, with real CRIU:
quiesce, dump, restore on the same or another node, wake, rings reconnect — and the checker
sees nothing lost, nothing duplicated, and the same digest as an uninterrupted run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from support import (
    checker_of,
    paced_flows,
    reference_checker,
    run_cli,
    stage_status,
    wait_for_input,
)

from dpmigrate.checkpoint import bundle as bundles
from dpmigrate.errors import DpmigrateError
from dpmigrate.runtime.cluster import LocalCluster
from dpmigrate.runtime.manifest import App
from dpmigrate.runtime.multinode import MultiNodeRun


@pytest.fixture
def app(tmp_path: Path) -> App:
    return App.load(paced_flows(tmp_path, 40000))


def test_checkpoint_then_restore_on_another_node(
    cluster_state_dir: Path, app: App, tmp_path: Path
) -> None:
    expected = reference_checker(app)
    with LocalCluster(3) as cluster:
        run = MultiNodeRun(app, cluster)
        run.start()
        try:
            wait_for_input(run, 8000)
            env = {"DPMIGRATE_STATE_DIR": str(cluster_state_dir)}
            out = tmp_path / "table.bundle"
            result = run_cli("checkpoint", "flows/table", "--out", str(out), "--json", env=env,
                             timeout=120)  # fmt: skip
            assert result.returncode == 0, result.stderr
            made = json.loads(result.stdout)
            assert made["node"] == "node2" and made["criu"]["pages_written"] > 0
            assert made["criu"]["frozen_time"] > 0
            assert (out.stat().st_mode & 0o777) == 0o700
            assert bundles.verify(out).ok
            assert not stage_status(run), "the checkpointed stage still shows as running"
            loaded = bundles.load(out)
            assert loaded.rings["positions"]["inputs"]["in"] > 0
            restored = run_cli("restore", str(out), "--node", "node1", "--json", env=env,
                               timeout=120)  # fmt: skip
            assert restored.returncode == 0, restored.stderr
            info = json.loads(restored.stdout)
            assert info["node"] == "node1" and info["state_version"] == made["state_version"]
            assert run.wait(duration=90), run.status()
        finally:
            run.stop()
        stages = {s["name"]: s for s in run.status()}
        assert stages["table"]["node"] == "node1" and stages["table"]["restarts"] == 0
        assert checker_of(list(stages.values())) == {
            "received": 40000,
            "lost": 0,
            "duplicated": 0,
            "digest": expected["digest"],
        }
        run.cleanup()


def test_leave_running_then_restore_on_the_same_node(
    cluster_state_dir: Path, app: App, tmp_path: Path
) -> None:
    expected = reference_checker(app)
    with LocalCluster(3) as cluster:
        run = MultiNodeRun(app, cluster)
        run.start()
        try:
            wait_for_input(run, 6000)
            out = tmp_path / "table.bundle"
            made = cluster.checkpoint("table", out, leave_running=True)
            before = stage_status(run)["msgs_in"]
            wait_for_input(run, before + 3000)  # it went on after the checkpoint
            # A second instance beside the running one is refused.
            with pytest.raises(DpmigrateError, match="is running on node node2"):
                cluster.restore(out)
            with cluster.client("node2") as agent:
                agent.call("stop_stage", app="flows", stage="table")
            info = cluster.restore(out)  # same node; it continues from its journal's point
            assert info["node"] == "node2"
            assert info["state_version"] >= made["state_version"]
            assert run.wait(duration=90), run.status()
        finally:
            run.stop()
        assert checker_of(run.status()) == {
            "received": 40000,
            "lost": 0,
            "duplicated": 0,
            "digest": expected["digest"],
        }
        run.cleanup()


def test_corrupt_stage_bundle_is_refused_and_nothing_changes(
    cluster_state_dir: Path, app: App, tmp_path: Path
) -> None:
    with LocalCluster(3) as cluster:
        run = MultiNodeRun(app, cluster)
        run.start()
        try:
            wait_for_input(run, 3000)
            out = tmp_path / "b"
            cluster.checkpoint("table", out, leave_running=True)
            pages = sorted((out / "images").glob("pages-*.img"))[0]
            os.chmod(out, 0o700)
            data = bytearray(pages.read_bytes())
            data[len(data) // 2] ^= 0xFF
            pages.write_bytes(bytes(data))
            listing = sorted(p.name for p in (out / "images").iterdir())
            pid_before = stage_status(run)["pid"]
            with cluster.client("node2") as agent:
                agent.call("stop_stage", app="flows", stage="table")
            with pytest.raises(DpmigrateError, match=pages.name):
                cluster.restore(out, node="node1")
            assert sorted(p.name for p in (out / "images").iterdir()) == listing
            table = stage_status(run)
            assert pid_before and table["node"] == "node2" and not table["pid"], (
                "a refused restore started something"
            )
        finally:
            run.stop()
