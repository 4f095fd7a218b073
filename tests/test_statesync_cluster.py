"""State synchronization on a real local cluster (DESIGN.md §5): the statesync migration
strategy under traffic, and a hot standby taking over when its primary's node dies or is
paused — each time nothing lost, nothing duplicated, the checker's digest equal to an
uninterrupted run's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support import (
    alive,
    checker_of,
    paced_flows,
    process_state,
    reference_checker,
    run_cli,
    stage_status,
    wait_for_input,
    wait_until,
)

from dpmigrate.drill.faults import Faults, partition, partition_counters
from dpmigrate.migrate import LocalCluster
from dpmigrate.runtime.manifest import App
from dpmigrate.runtime.multinode import MultiNodeRun


def _with_standby(tmp_path: Path, total: int, standby: str = "node4") -> Path:
    """The paced flows app on node1..3 with a standby of its table on ``standby``."""
    path = paced_flows(tmp_path, total)
    text = path.read_text().replace(
        'entry = "stages:FlowTable"\nnode = "node2"',
        f'entry = "stages:FlowTable"\nnode = "node2"\nstandby = "{standby}"',
    )
    assert f'standby = "{standby}"' in text
    path.write_text(text)
    return path


def _cli(state_dir: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`dpmigrate ARGS` against the test's cluster, bounded by ``timeout``."""
    return run_cli(*args, env={"DPMIGRATE_STATE_DIR": str(state_dir)}, timeout=timeout)


def _standby_in_sync(run: MultiNodeRun, node: str) -> bool:
    return any(s.get("node") == node and s.get("in_sync")
               for s in stage_status(run).get("standbys", []))  # fmt: skip


def _placed(cluster: LocalCluster, stage: str = "table") -> str | None:
    placed = cluster.store().placement("flows", stage)
    return placed.node if placed else None


def _on(cluster: LocalCluster, node: str, stage: str = "table") -> dict:
    """The stage as ``node``'s agent alone reports it (another node's agent may be paused)."""
    with cluster.client(node, timeout=5) as agent:
        found = [s for s in agent.call("status")["stages"]
                 if s["name"] == stage and s.get("role") == "primary"]  # fmt: skip
    return found[0] if found else {}


def _summary(stages: list[dict], state_dir: str = "") -> str:
    """What a stalled stream's stages say: phase, counts, each ring's positions, the standbys
    that gate, and the end of each stage's own log (JSON: pytest does not shorten it)."""
    return json.dumps([{
        "stage": s["name"], "node": s.get("node"), "phase": s.get("phase"),
        "in": s.get("msgs_in"), "out": s.get("msgs_out"), "restarts": s.get("restarts"),
        "standbys": s.get("standbys"), "persisted": s.get("persisted"),
        "rings": [(r["name"], r["role"], r.get("extra", {}).get("connected"),
                   r.get("next_seq"), r.get("acked"), r.get("next_expected"),
                   r.get("reconnects")) for r in s.get("rings", [])],
        "log": _log_tail(Path(state_dir, "nodes", str(s.get("node")), "logs",
                             f"{s.get('app')}.{s['name']}.log")) if state_dir else [],
    } for s in stages], indent=1)  # fmt: skip


def _log_tail(path: Path, lines: int = 25) -> list[str]:
    try:
        return path.read_text().splitlines()[-lines:]
    except OSError:
        return []


def _finish_and_check(run: MultiNodeRun, expected: dict) -> dict:
    if not run.wait(duration=120):
        pytest.fail(f"the stream stalled: {_summary(run.status(), run.cluster.state_dir)}")
    checker = checker_of(run.status())
    assert checker["lost"] == 0 and checker["duplicated"] == 0, checker
    assert checker["digest"] == expected["digest"], (checker, expected)
    assert checker["received"] == expected["received"]
    return checker


def test_statesync_migration_under_traffic(cluster_state_dir: Path, tmp_path: Path) -> None:
    """table node2 → node3 by the API, then back by the CLI; no CRIU involved."""
    app = App.load(paced_flows(tmp_path, 100000))
    expected = reference_checker(app)
    with LocalCluster(3) as cluster:
        run = MultiNodeRun(app, cluster)
        run.start()
        try:
            wait_for_input(run, 5000)
            first = cluster.migrate("table", to="node3", strategy="statesync")
            assert not first.rolled_back, first.error
            assert stage_status(run)["node"] == "node3"
            wait_for_input(run, stage_status(run)["msgs_in"] + 3000)
            result = _cli(cluster_state_dir, "migrate", "flows/table", "--to", "node2",
                          "--strategy", "statesync", "--json")  # fmt: skip
            assert result.returncode == 0, result.stderr
            second = json.loads(result.stdout)
            assert stage_status(run)["node"] == "node2"
            _finish_and_check(run, expected)
        finally:
            run.stop()
    # the first target starts empty: a snapshot; the second, on node2, resumes from the
    # journal the source left there at a point of the new primary's history: points only
    assert first.snapshot_bytes and first.snapshot_bytes > 0, first
    for report in (first.as_dict(), second):
        assert report["lost"] == 0 and report["duplicated"] == 0, report
        assert report["state_digest_before"] == report["state_digest_after"], report
        assert report["strategy"] == "statesync"
        assert "prepare" in report["phases"], report["phases"]
        assert report["transferred_bytes"] > 0, report
        print({k: report[k] for k in ("downtime_s", "asleep_s", "snapshot_bytes", "snapshot_mb_s",
                                      "catch_up_s", "final_delta_bytes", "transferred_bytes",
                                      "phases", "reconnect_after_placement_s")})  # fmt: skip
        assert report["final_delta_bytes"] is not None, report
        assert report["pages_written"] == 0 and report["frozen_time_s"] == 0, report  # no CRIU
        assert report["warnings"] == [], report["warnings"]


def _kill_node(cluster: LocalCluster, name: str, run: MultiNodeRun) -> list[int]:
    """Cut the node's link, then SIGKILL its agent and its stages: a node that died."""
    node = cluster.node(name)
    hub = f"dpm{cluster.id}-hub"
    veth = f"veth{name.removeprefix('node')}"
    pids = [s["pid"] for s in run.status() if s.get("node") == name and s.get("pid")]
    assert pids, run.status()
    subprocess.run(["ip", "-n", hub, "link", "set", veth, "down"], check=True)
    assert node.agent_pid is not None and node.keeper_pid is not None
    agent = node.agent_pid
    for pid in [node.keeper_pid, agent, *pids]:  # the keeper first: it restarts the agent
        os.kill(pid, signal.SIGKILL)
    # the fault happened: link down, every process gone
    shown = subprocess.run(["ip", "-n", hub, "-o", "link", "show", veth], check=True,
                           capture_output=True, text=True).stdout  # fmt: skip
    assert "state DOWN" in shown or "NO-CARRIER" in shown, shown
    wait_until(lambda: not any(alive(p) for p in [node.keeper_pid, agent, *pids]),
               "the node's death")  # fmt: skip
    return pids


def test_standby_takes_over_when_the_primary_node_dies(
    cluster_state_dir: Path, tmp_path: Path
) -> None:
    app = App.load(_with_standby(tmp_path, 140000))
    expected = reference_checker(app)
    with LocalCluster(4) as cluster:
        run = MultiNodeRun(app, cluster)
        run.start()
        try:
            wait_until(lambda: _standby_in_sync(run, "node4"), "the standby in sync", 60, 0.1)
            wait_for_input(run, 20000)
            before = stage_status(run)["standbys"][0]
            assert before["lag_points"] is not None and before["lag_s"] is not None, before
            shown = _cli(cluster_state_dir, "status", "--json", timeout=60)
            assert shown.returncode == 0, shown.stderr
            replicas = json.loads(shown.stdout)["replicas"]
            assert [
                (r["name"], r["node"], r["role"], r["synced"], r["in_sync"]) for r in replicas
            ] == [("table", "node4", "standby", True, True)], replicas
            assert {s["name"] for s in json.loads(shown.stdout)["stages"]} == {
                "gen",
                "table",
                "check",
            }
            killed_at = time.time()
            _kill_node(cluster, "node2", run)
            wait_until(lambda: _placed(cluster) == "node4", "the takeover", 30, 0.05)
            wait_until(lambda: stage_status(run).get("phase") == "running", "table on node4",
                       30, 0.05)  # fmt: skip
            assert stage_status(run)["node"] == "node4"
            # a new standby for the new primary, by the CLI (node2 is dead: on node3)
            result = _cli(cluster_state_dir, "standby", "flows/table", "--on", "node3", "--json")
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout)["in_sync"] is True
            checker = _finish_and_check(run, expected)
            gaps = [end - start for start, end in stage_status(run, "check")["input_gaps"]
                    if end >= killed_at] or [0.0]  # fmt: skip
            print(f"failover: longest gap at the checker {max(gaps):.3f} s; {checker}")
        finally:
            run.stop()


def test_a_standby_takes_over_from_what_the_consumer_holds(
    cluster_state_dir: Path, tmp_path: Path
) -> None:
    """The primary dies while a window of its outputs is in flight to a consumer that never
    gets them (`check`'s node partitioned: the packets are dropped). The standby received
    every point, but applied only those whose outputs `check` acknowledged (the safe mark);
    it takes over from a point `check` holds, produces the rest again from inputs `gen`
    still retains, and `check`, healed, gets every message once. (Before the safe mark the
    standby took over from its newest point: the new table numbered its outputs past what
    `check` held, refused it, and the stream stalled — a CI run saw it with one batch.)"""
    app = App.load(_with_standby(tmp_path, 100000))
    expected = reference_checker(app)
    faults = Faults()
    with LocalCluster(4) as cluster:
        run = MultiNodeRun(app, cluster)
        run.start()
        try:
            wait_until(lambda: _standby_in_sync(run, "node4"), "the standby in sync", 60, 0.1)
            wait_for_input(run, 15000)
            assert stage_status(run, "check")["node"] == "node3"
            window = sum(int(r["capacity"]) for r in _on(cluster, "node2")["rings"]
                         if r["role"] == "producer")  # fmt: skip
            partition(faults, cluster.node("node3").netns)

            def unacked() -> int:  # node3's agent cannot answer now: ask node2's alone
                rings = [r for r in _on(cluster, "node2")["rings"] if r["role"] == "producer"]
                return sum(int(r["next_seq"]) - int(r["acked"]) for r in rings)

            wait_until(lambda: unacked() >= window, "the table's window to fill", 30, 0.01)
            filled_at = time.time()

            def received_all() -> dict:  # every point the blocked table published
                found = _replica(cluster, "node4")  # its status, written every 0.2 s
                fresh = found.get("time", 0) > filled_at + 0.5  # not one from before the fill
                done = found["sync"]["received_n"] == found["lag"]["head_n"]
                return found if fresh and done else {}

            wait_until(received_all, "the standby to receive every point", 30, 0.01)
            replica = received_all()
            _kill_node(cluster, "node2", run)
            assert "packets" in partition_counters(cluster.node("node3").netns)
            faults.heal()
            assert faults.heal_failures == []
            # the fault: the standby holds points past what check acknowledged, unapplied
            assert replica["sync"]["held_points"] > 0, replica
            wait_until(lambda: _placed(cluster) == "node4", "the takeover", 30, 0.05)
            _finish_and_check(run, expected)
        finally:
            faults.heal()
            run.stop()


def test_paused_primary_is_fenced_when_it_comes_back(
    cluster_state_dir: Path, tmp_path: Path
) -> None:
    """node2's agent and table SIGSTOPped until the standby took over, then SIGCONTed: the
    old table persists nothing, stops (fenced), and the stream stays exact."""
    app = App.load(_with_standby(tmp_path, 120000))
    expected = reference_checker(app)
    with LocalCluster(4) as cluster:
        run = MultiNodeRun(app, cluster)
        run.start()
        try:
            wait_until(lambda: _standby_in_sync(run, "node4"), "the standby in sync", 60, 0.1)
            wait_for_input(run, 20000)
            old = stage_status(run)
            agent_pid = cluster.node("node2").agent_pid
            assert agent_pid is not None
            journal = cluster.host_path("node2", f"{old['run_dir']}/stages/table/journal")
            for pid in (agent_pid, old["pid"]):
                os.kill(pid, signal.SIGSTOP)
            wait_until(lambda: process_state(old["pid"]) == process_state(agent_pid) == "T",
                       "both stopped")  # fmt: skip
            wait_until(lambda: _placed(cluster) == "node4", "the takeover", 30, 0.05)
            wait_until(lambda: _on(cluster, "node4").get("phase") == "running", "table on node4",
                       30, 0.05)  # fmt: skip
            size_at_takeover = journal.stat().st_size
            for pid in (agent_pid, old["pid"]):
                os.kill(pid, signal.SIGCONT)
            wait_until(lambda: not alive(old["pid"]), "the old copy to stop", 30, 0.05)
            assert journal.stat().st_size == size_at_takeover  # it persisted nothing

            def old_copy() -> dict:
                with cluster.client("node2") as agent:
                    return next(s for s in agent.call("status")["stages"] if s["name"] == "table")

            wait_until(lambda: old_copy()["fenced"], "node2's agent to see it fenced", 10, 0.05)
            assert old_copy()["restarts"] == 0, old_copy()  # it stopped for good, at once
            _finish_and_check(run, expected)
        finally:
            run.stop()


def _replica(cluster: LocalCluster, node: str, stage: str = "table") -> dict:
    with cluster.client(node, timeout=5) as agent:
        found = [s for s in agent.call("status")["stages"]
                 if s["name"] == stage and s.get("role") in ("standby", "target")]  # fmt: skip
    return found[0] if found else {}


def test_a_crashed_standby_resumes_from_its_journal_and_can_still_take_over(
    cluster_state_dir: Path, tmp_path: Path
) -> None:
    """The standby SIGKILLed (not its node): its agent restarts it, it resumes from its own
    journal (no snapshot), gates again, and later takes over when the primary's node dies."""
    app = App.load(_with_standby(tmp_path, 160000))
    expected = reference_checker(app)
    with LocalCluster(4) as cluster:
        run = MultiNodeRun(app, cluster)
        run.start()
        try:
            wait_until(lambda: _standby_in_sync(run, "node4"), "the standby in sync", 60, 0.1)
            wait_for_input(run, 15000)
            first = _replica(cluster, "node4")
            os.kill(first["pid"], signal.SIGKILL)
            killed_at = time.time()
            wait_until(lambda: not alive(first["pid"]), "the standby's death")

            def restarted() -> dict:
                found = _replica(cluster, "node4")  # its own status, written after the restart
                fresh = found.get("restarts", 0) >= 1 and found.get("time", 0) > killed_at
                return found if fresh and found.get("synced") else {}

            wait_until(restarted, "its restart", 30, 0.05)
            again = restarted()
            assert again["pid"] != first["pid"]
            assert again["sync"]["snapshots"] == 0, again["sync"]  # resumed: points only
            wait_until(lambda: _standby_in_sync(run, "node4"), "gating again", 30, 0.05)
            _kill_node(cluster, "node2", run)
            wait_until(lambda: _placed(cluster) == "node4", "the takeover", 30, 0.05)
            _finish_and_check(run, expected)
        finally:
            run.stop()


def test_a_statesync_target_that_hangs_rolls_the_migration_back(
    cluster_state_dir: Path, tmp_path: Path
) -> None:
    """The target SIGSTOPped as the quiesce starts: the source's quiesce cannot hand it the
    last point, the cutover refuses, and the rollback wakes the source where it was."""
    app = App.load(paced_flows(tmp_path, 100000))
    expected = reference_checker(app)
    with LocalCluster(3) as cluster:
        run = MultiNodeRun(app, cluster)
        run.start()
        hung: list[int] = []

        def on_phase(phase: str) -> None:
            if phase == "quiesce":
                target = _replica(cluster, "node3")
                os.kill(target["pid"], signal.SIGSTOP)
                wait_until(lambda: process_state(target["pid"]) == "T", "the target stopped")
                hung.append(target["pid"])

        try:
            wait_for_input(run, 5000)
            report = cluster.migrate("table", to="node3", strategy="statesync", on_phase=on_phase)
            assert hung, "the fault was not injected"
            assert report.rolled_back and "transfer" in (report.error or ""), report.error
            assert report.undone, report.rollback_failures
            assert report.lost == 0 and report.duplicated == 0, report
            assert stage_status(run)["node"] == "node2"
            wait_until(lambda: not alive(hung[0]), "the hung target discarded", 10)
            _finish_and_check(run, expected)
        finally:
            for pid in hung:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
            run.stop()


def test_a_stage_with_a_standby_migrates_and_its_standby_follows(
    cluster_state_dir: Path, tmp_path: Path
) -> None:
    """Quiesces of a gated primary wait for its standby; after each move the standby gates
    the new primary, and takes over when that one's node dies."""
    app = App.load(_with_standby(tmp_path, 200000))
    expected = reference_checker(app)
    with LocalCluster(4) as cluster:
        run = MultiNodeRun(app, cluster)
        run.start()
        try:
            wait_until(lambda: _standby_in_sync(run, "node4"), "the standby in sync", 60, 0.1)
            for node, strategy in (("node1", "stop-and-copy"), ("node2", "statesync")):
                wait_for_input(run, stage_status(run)["msgs_in"] + 5000)
                report = cluster.migrate("table", to=node, strategy=strategy)
                assert not report.rolled_back, report.error
                assert report.lost == 0 and report.duplicated == 0, report
                wait_until(lambda: _standby_in_sync(run, "node4"), "gating the new primary", 30)
            refused = cluster.migrate("table", to="node4", strategy="statesync")
            assert refused.rolled_back and "runs a standby" in (refused.error or ""), refused
            _kill_node(cluster, "node2", run)
            wait_until(lambda: _placed(cluster) == "node4", "the takeover", 30, 0.05)
            _finish_and_check(run, expected)
        finally:
            run.stop()
