"""Nodes share nothing but the network (DESIGN.md §7, issue 10): every node's agent and stages
see only their own folder of the state dir; etcd is the cluster's one authority; a stale copy
of a stage fences itself; etcd away stops placement changes, not traffic."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from support import (
    checker_of,
    in_mount_ns,
    paced_flows,
    reference_checker,
    stage_status,
    wait_for_input,
    wait_until,
)

from dpmigrate.checkpoint import bundle as bundles
from dpmigrate.cluster import nodefs
from dpmigrate.cluster.store import StoreUnavailable
from dpmigrate.errors import DpmigrateError, RemoteError
from dpmigrate.migrate import LocalCluster
from dpmigrate.runtime.manifest import App
from dpmigrate.runtime.multinode import MultiNodeRun


def _mount_ns(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/mnt")


def test_each_node_sees_only_its_own_folder_and_migrations_still_work(
    cluster_state_dir: Path, tmp_path: Path
) -> None:
    """The proof of share-nothing: node folders out of reach of every other node's agent and
    stages (checked by looking through their own mount namespaces), and in that world both
    CRIU strategies migrate there and back, and a checkpoint/restore moves a stage."""
    app = App.load(paced_flows(tmp_path, 120000, rate=6000))
    expected = reference_checker(app)
    with LocalCluster(3) as cluster:
        run = MultiNodeRun(app, cluster)
        run.start()
        try:
            wait_for_input(run, 5000)
            host_ns = _mount_ns(os.getpid())
            for node in cluster.nodes:
                assert node.agent_pid is not None
                assert _mount_ns(node.agent_pid) != host_ns, f"{node.name}'s agent shares ours"
                seen = in_mount_ns(node.agent_pid, "ls", "-A", str(cluster_state_dir))
                assert seen.returncode == 0 and seen.stdout.split() == ["node"], seen
                # its own folder is there, under the one fixed path every node uses
                own = in_mount_ns(node.agent_pid, "cat", "/proc/self/mountinfo").stdout
                assert str(nodefs.node_dir(str(cluster_state_dir))) in own
                for other in cluster.nodes:
                    if other is not node:  # the other nodes' folders: not reachable at all
                        probe = in_mount_ns(
                            node.agent_pid, "ls", str(Path(other.agent_socket).parent)
                        )
                        assert probe.returncode != 0, (node.name, other.name, probe.stdout)
            for info in run.status():  # the stages live in their agent's view
                agent_pid = cluster.node(info["node"]).agent_pid
                assert _mount_ns(info["pid"]) == _mount_ns(agent_pid), info["name"]

            reports = [
                cluster.migrate("table", to="node1", strategy="stop-and-copy"),
                cluster.migrate("table", to="node2", strategy="post-copy"),
                cluster.migrate("table", to="node3", strategy="post-copy"),
                cluster.migrate("table", to="node2", strategy="stop-and-copy"),
            ]
            for report in reports:
                assert not report.rolled_back, report.error
                assert report.lost == 0 and report.duplicated == 0, report
                assert report.state_digest_before == report.state_digest_after
                assert report.reconnect_after_placement_s is not None, report
            placed = cluster.store().placement("flows", "table")
            assert (placed.node, placed.epoch) == ("node2", 5)  # one epoch per placement change

            # a stop (checkpoint) and resume (restore on another node)
            bundle = tmp_path / "table.bundle"
            cluster.checkpoint("table", bundle)
            restored = cluster.restore(bundle, node="node1")
            assert restored["node"] == "node1"
            assert cluster.store().placement("flows", "table").epoch == 6
            assert run.wait(duration=120), run.status()
        finally:
            run.stop()
        stages = {s["name"]: s for s in run.status()}
        assert stages["table"]["node"] == "node1"
        assert checker_of(list(stages.values())) == {
            "received": 120000, "lost": 0, "duplicated": 0, "digest": expected["digest"],
        }  # fmt: skip
        run.cleanup()


def test_a_stale_copy_connects_nothing_changes_nothing_and_exits(
    cluster_state_dir: Path, tmp_path: Path
) -> None:
    """The probe of the issue: `check` checkpointed with --leave-running, moved on, and then a
    copy restored from that bundle beside the current one, under traffic. It is refused by the
    CLI; forced through the node's agent it wakes, finds the placement moved on, and exits."""
    app = App.load(paced_flows(tmp_path, 60000, rate=8000))
    expected = reference_checker(app)
    with LocalCluster(3) as cluster:
        run = MultiNodeRun(app, cluster)
        run.start()
        try:
            wait_for_input(run, 3000, name="check")
            old = tmp_path / "check.bundle"
            made = cluster.checkpoint("check", old, leave_running=True)
            assert made["node"] == "node3"
            moved = cluster.migrate("check", to="node2")
            assert not moved.rolled_back, moved.error
            epoch = cluster.store().placement("flows", "check").epoch
            assert epoch == 2
            with pytest.raises(DpmigrateError, match="is running on node node2"):
                cluster.restore(old, node="node1")

            registry_before = cluster.store().get_prefix("rings/")[0]
            received_before = stage_status(run, "check")["metrics"]["received"]
            with (
                cluster.client("node1", timeout=120) as agent,
                pytest.raises(RemoteError, match="stale copy"),
            ):
                agent.call("restore_stage", bundle=str(old), wake=True)

            def stale_copy() -> dict:
                with cluster.client("node1") as agent:
                    return next(s for s in agent.call("status")["stages"] if s["name"] == "check")

            wait_until(lambda: stale_copy()["finished"], "the stale copy reaped", 10)
            stale = stale_copy()
            assert stale["fenced"] and stale["finished"] and stale["restarts"] == 0, stale
            assert stale["phase"] == "fenced" and stale["stale"]["placed_on"] == "node2"
            log = cluster.host_path("node1", stale["log"]).read_text()
            assert "stage stopped: fenced" in log and "stage woken" not in log
            # it registered nothing, persisted nothing, and the real checker goes on
            assert cluster.store().get_prefix("rings/")[0] == registry_before
            journal = cluster.host_path("node1", stale["run_dir"]) / "stages" / "check"
            assert not (journal / "journal").exists() or (journal / "journal").stat().st_size == 0
            assert cluster.store().placement("flows", "check").epoch == epoch
            wait_for_input(run, received_before + 2000, name="check")
            assert run.wait(duration=120), run.status()
        finally:
            run.stop()
        checker = checker_of([s for s in run.status() if s["node"] == "node2"])
        assert checker == {"received": 60000, "lost": 0, "duplicated": 0,
                           "digest": expected["digest"]}  # fmt: skip
        assert bundles.verify(old).ok  # the bundle itself was not touched
        run.cleanup()


def test_etcd_away_stops_placement_changes_not_traffic(
    cluster_state_dir: Path, tmp_path: Path
) -> None:
    app = App.load(paced_flows(tmp_path, 160000, rate=8000))
    expected = reference_checker(app)
    with LocalCluster(3) as cluster:
        etcd_pid = cluster.status()["store"]["pid"]
        run = MultiNodeRun(app, cluster)
        run.start()
        try:
            wait_for_input(run, 3000)
            os.kill(etcd_pid, signal.SIGSTOP)  # the fault: etcd stops answering
            try:
                with pytest.raises(StoreUnavailable):
                    cluster.store().health()  # first: the fault is real
                before = stage_status(run, "check")["metrics"]["received"]
                wait_for_input(run, before + 4000, name="check")  # traffic goes on
                report = cluster.migrate("table", to="node1")
                assert report.rolled_back and "etcd is unreachable" in report.error, report
                assert report.lost == 0 and report.duplicated == 0, report
                assert stage_status(run)["node"] == "node2"
                status = cluster.status()
                assert not status["healthy"] and not status["store"]["reachable"]
            finally:
                os.kill(etcd_pid, signal.SIGCONT)
            wait_until(lambda: cluster.status()["store"]["reachable"], "etcd back", 20)
            again = cluster.migrate("table", to="node1")
            assert not again.rolled_back, again.error
            assert run.wait(duration=120), run.status()
        finally:
            run.stop()
        assert checker_of(run.status()) == {"received": 160000, "lost": 0, "duplicated": 0,
                                            "digest": expected["digest"]}  # fmt: skip
        run.cleanup()


def test_cluster_down_leaves_no_trace_of_etcd(cluster_state_dir: Path) -> None:
    cluster = LocalCluster(2)
    cluster.up()
    try:
        status = cluster.status()
        assert status["store"]["reachable"] and status["store"]["version"].startswith("3.4")
        assert all(n["member"] for n in status["nodes"]), status["nodes"]
        pid = status["store"]["pid"]
        record = json.loads((cluster_state_dir / "cluster" / "cluster.json").read_text())
        data = Path(record["etcd"]["log"]).parent.parent / "etcd"
        assert data.is_dir() and os.path.exists(f"/proc/{pid}")
        # it listens on the hub's bridge only, not in the host's namespace
        listening = subprocess.run(["ip", "netns", "exec", record["hub"], "ss", "-ltnH"],
                                   capture_output=True, text=True, timeout=10).stdout  # fmt: skip
        assert "10.213.0.254:2379" in listening
        host = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, timeout=10).stdout
        assert "10.213.0.254:2379" not in host
    finally:
        cluster.down()
    assert (
        not os.path.exists(f"/proc/{pid}")
        or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    )
    assert not data.exists()
    assert not (cluster_state_dir / "nodes").exists()
