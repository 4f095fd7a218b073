"""Drain, cordon and the readable status.

The plan (:func:`plan_drain`) is tested on its own, without a cluster: order, least-loaded
choice, every reason a node is refused. Then on real local clusters (etcd, agents, CRIU): a
node holding two stages of the flows example drained under traffic (nothing lost or
duplicated, the node cordoned, a later migration to it refused until uncordoned), and a drain
refused because no node can take a stage (nothing moved, the cordon as it was), with the
status at 80 columns on that cluster.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from support import (
    checker_of,
    paced_flows,
    reference_checker,
    run_cli,
    stage_status,
    wait_for_input,
    wait_until,
)

from dpmigrate.errors import PlacementRefused
from dpmigrate.migrate import LocalCluster
from dpmigrate.migrate.drain import NodeView, StageView, drain_order, plan_drain, sink_distances
from dpmigrate.runtime.manifest import App
from dpmigrate.runtime.multinode import MultiNodeRun

MiB = 1 << 20


def _nodes(**loads: int) -> list[NodeView]:
    return [NodeView(name, alive=True, cordoned=False, stages=n) for name, n in loads.items()]


def _no_space(memory: int) -> int:
    return 0


# -- the plan, without a cluster -------------------------------------------------------------


def test_sink_distances_of_the_flows_example() -> None:
    app = App.load(Path(__file__).resolve().parent.parent / "examples" / "flows" / "app.toml")
    assert sink_distances(app) == {"gen": 2, "table": 1, "check": 0}


def test_order_is_sinks_first_then_app_and_name() -> None:
    stages = [StageView("b", "src", 2), StageView("a", "mid", 1), StageView("a", "sink", 0),
              StageView("b", "sink", 0), StageView("a", "src", 2)]  # fmt: skip
    assert [s.key for s in drain_order(stages)] == ["a/sink", "b/sink", "a/mid", "a/src", "b/src"]


def test_plan_moves_each_stage_to_the_least_loaded_node_counting_planned_moves() -> None:
    stages = [StageView("app", f"s{i}", sink_distance=4 - i) for i in range(5)]
    plan = plan_drain("node1", stages, _nodes(node1=5, node2=2, node3=0, node4=1),
                      space_needed=_no_space)  # fmt: skip
    got = [(m.stage, m.destination) for m in plan.moves]
    # sinks first; node3 (0) gets one, then node3 and node4 tie at 1 (name decides), ...
    assert got == [("app/s4", "node3"), ("app/s3", "node3"), ("app/s2", "node4"),
                   ("app/s1", "node2"), ("app/s0", "node3")], got  # fmt: skip
    assert all(m.source == "node1" and m.strategy == "stop-and-copy" for m in plan.moves)
    assert plan.moves[0].why == "least loaded: node3 runs 0 stage(s)"


def test_plan_skips_cordoned_dead_and_standby_nodes() -> None:
    nodes = [NodeView("node1", True, False, 3), NodeView("node2", True, True, 0),
             NodeView("node3", False, False, 0), NodeView("node4", True, False, 9),
             NodeView("node5", True, False, 5)]  # fmt: skip
    stage = StageView("flows", "table", replica_nodes=("node5",))
    plan = plan_drain("node1", [stage], nodes, "post-copy", space_needed=_no_space)
    assert [(m.destination, m.strategy) for m in plan.moves] == [("node4", "post-copy")]


def test_plan_refuses_naming_every_stage_without_a_place_and_each_reason() -> None:
    nodes = [NodeView("node1", True, False, 2), NodeView("node2", True, True, 0),
             NodeView("node3", False, False, 0), NodeView("node4", True, False, 0)]  # fmt: skip
    stages = [StageView("flows", "check"), StageView("flows", "table", 1, ("node4",))]
    with pytest.raises(PlacementRefused) as err:
        plan_drain("node1", stages, nodes, space_needed=_no_space)
    text = str(err.value)
    assert "\n" not in text
    assert "stage flows/check" not in text  # node4 takes it
    assert ("stage flows/table has nowhere to go (node2 is cordoned; node3 is not alive; "
            "node4 runs its standby)") in text, text  # fmt: skip
    assert text.startswith("drain of node1 refused, nothing was moved: ")
    with pytest.raises(PlacementRefused, match="the cluster has no other node"):
        plan_drain("node1", stages[:1], nodes[:1], space_needed=_no_space)


def test_plan_checks_free_space_cpus_and_memory_limits() -> None:
    nodes = [NodeView("node1", True, False, 3),
             NodeView("node2", True, False, 0, free_bytes=10 * MiB),
             NodeView("node3", True, False, 1, free_bytes=1 << 40, cpus=frozenset({0}),
                      mem_available_bytes=300 * MiB),
             NodeView("node4", True, False, 2, free_bytes=1 << 40, cpus=frozenset({0, 1}),
                      mem_available_bytes=300 * MiB)]  # fmt: skip
    # stop-and-copy needs the stage's memory + 10 % + a margin free: node2 has 10 MiB
    big = StageView("a", "big", memory_bytes=100 * MiB)
    assert [m.destination for m in plan_drain("node1", [big], nodes).moves] == ["node3"]
    # CPUs 0-1 only on node4
    pinned = StageView("a", "pinned", cpus="0-1")
    assert [m.destination for m in plan_drain("node1", [pinned], nodes).moves] == ["node4"]
    # 200 MiB limits, 300 MiB available on node3 and node4: one fits each, a third nowhere
    limited = [StageView("a", f"m{i}", memory_limit=200 * MiB) for i in range(3)]
    with pytest.raises(PlacementRefused) as err:
        plan_drain("node1", limited, nodes)
    text = str(err.value)
    assert "stage a/m0" not in text and "stage a/m1" not in text, text
    assert ("stage a/m2 has nowhere to go (node2 has 10 MiB free, it needs 32 MiB; node3 has "
            "100 MiB memory available, its resources.memory is 200 MiB; node4 has 100 MiB "
            "memory available, its resources.memory is 200 MiB)") in text, text  # fmt: skip


def test_plan_rejects_an_unknown_strategy() -> None:
    from dpmigrate.errors import DpmigrateError

    with pytest.raises(DpmigrateError, match="unknown strategy 'teleport'"):
        plan_drain("node1", [], _nodes(node2=0), "teleport")


# -- on real clusters ------------------------------------------------------------------------


def _cli(
    state_dir: Path, *args: str, timeout: float = 60, columns: int | None = None
) -> subprocess.CompletedProcess[str]:
    env = {"DPMIGRATE_STATE_DIR": str(state_dir)}
    if columns is not None:
        env["COLUMNS"] = str(columns)
    return run_cli(*args, env=env, timeout=timeout)


@pytest.mark.root
@pytest.mark.criu
@pytest.mark.netns
@pytest.mark.nftables
def test_drain_a_node_with_two_stages_under_traffic(
    cluster_state_dir: Path, tmp_path: Path
) -> None:
    """gen on node1, table and check on node2; node2 drained: check (the sink) first to node3
    (no stage), then table to node1 (node1 and node3 tie at one stage; the name decides). The
    checker ends with every packet, none lost or duplicated, the digest of an uninterrupted
    run; node2 stays cordoned, a migration to it is refused until it is uncordoned."""
    text = paced_flows(tmp_path, 80000).read_text().replace('node = "node3"', 'node = "node2"')
    (tmp_path / "app.toml").write_text(text)
    app = App.load(tmp_path / "app.toml")
    assert [s.node for s in app.stages] == ["node1", "node2", "node2"]
    expected = reference_checker(app)
    with LocalCluster(3) as cluster:
        run = MultiNodeRun(app, cluster)
        run.start()
        try:
            wait_for_input(run, 6000, "check")
            done = _cli(cluster_state_dir, "drain", "node2", "--json", timeout=300)
            assert done.returncode == 0, (done.stdout, done.stderr)
            result = json.loads(done.stdout)
            assert result["result"] == "drained" and result["cordoned"] is True, result
            assert [(m["stage"], m["destination"]) for m in result["plan"]["moves"]] == [
                ("flows/check", "node3"), ("flows/table", "node1")], result["plan"]  # fmt: skip
            for move in result["moves"]:
                report = move["report"]
                assert move["result"] == "moved" and not report["rolled_back"], move
                assert report["lost"] == 0 and report["duplicated"] == 0, report
                assert report["state_digest_before"] == report["state_digest_after"], report
            placed = {s["name"]: s["node"] for s in run.status()}
            assert placed == {"gen": "node1", "table": "node1", "check": "node3"}, placed
            # node2 is cordoned: an explicit migration there is refused, in one line
            refused = _cli(cluster_state_dir, "migrate", "flows/table", "--to", "node2")
            assert refused.returncode == 1, refused
            err = refused.stderr.strip()
            assert "\n" not in err and "`dpmigrate uncordon node2`" in err, err
            assert placed == {s["name"]: s["node"] for s in run.status()}
            assert run.wait(duration=120), run.status()
        finally:
            run.stop()
        stages = {s["name"]: s for s in run.status()}
        assert checker_of(list(stages.values())) == {
            "received": 80000,
            "lost": 0,
            "duplicated": 0,
            "digest": expected["digest"],
        }
        shown = json.loads(_cli(cluster_state_dir, "status", "--json").stdout)
        assert {n["name"]: n["cordoned"] for n in shown["nodes"]} == {
            "node1": False, "node2": True, "node3": False}  # fmt: skip
        # uncordon clears it (twice: idempotent)
        for changed in (True, False):
            cleared = _cli(cluster_state_dir, "uncordon", "node2", "--json")
            assert cleared.returncode == 0, cleared
            assert json.loads(cleared.stdout) == {"node": "node2", "cordoned": False,
                                                  "changed": changed}  # fmt: skip
        shown = json.loads(_cli(cluster_state_dir, "status", "--json").stdout)
        assert not any(n["cordoned"] for n in shown["nodes"]), shown["nodes"]
        run.cleanup()


@pytest.mark.root
@pytest.mark.criu
@pytest.mark.netns
@pytest.mark.nftables
def test_drain_refused_when_no_node_can_take_a_stage(
    cluster_state_dir: Path, tmp_path: Path
) -> None:
    """Two nodes, node1 cordoned: draining node2 has nowhere to put table and check. Exit
    status 2, one line naming both stages and why, nothing moved (same PIDs, same epochs),
    node2 not left cordoned; cordon of an unknown node is a clear error; and `status` at 80
    columns: every line fits, one line per stage, node1 shown cordoned."""
    text = paced_flows(tmp_path, 400000, rate=2000).read_text()
    (tmp_path / "app.toml").write_text(text.replace('node = "node3"', 'node = "node2"'))
    app = App.load(tmp_path / "app.toml")
    with LocalCluster(2) as cluster:
        run = MultiNodeRun(app, cluster)
        run.start()
        try:
            wait_for_input(run, 500, "check")
            before = {s["name"]: (s["node"], s["pid"], s.get("epoch")) for s in run.status()}
            first = _cli(cluster_state_dir, "cordon", "node1")
            assert first.returncode == 0 and "node1 cordoned" in first.stdout, first
            again = _cli(cluster_state_dir, "cordon", "node1", "--json")
            assert json.loads(again.stdout)["changed"] is False, again
            unknown = _cli(cluster_state_dir, "cordon", "node7")
            assert unknown.returncode != 0, unknown
            assert "no node 'node7'" in unknown.stderr and "node1, node2" in unknown.stderr

            done = _cli(cluster_state_dir, "drain", "node2", timeout=120)
            assert done.returncode == 2, (done.stdout, done.stderr)
            err = done.stderr.strip()
            assert "\n" not in err, err
            assert "stage flows/check has nowhere to go (node1 is cordoned)" in err, err
            assert "stage flows/table has nowhere to go (node1 is cordoned)" in err, err
            after = {s["name"]: (s["node"], s["pid"], s.get("epoch")) for s in run.status()}
            assert after == before, (before, after)
            as_json = _cli(cluster_state_dir, "drain", "node2", "--json", timeout=120)
            assert as_json.returncode == 2, as_json
            refused = json.loads(as_json.stdout)
            assert refused["result"] == "refused" and refused["moves"] == [], refused
            assert refused["cordoned"] is False  # the cordon is as it was before the drain

            shown = _cli(cluster_state_dir, "status", columns=80)
            assert shown.returncode == 0, shown
            lines = shown.stdout.splitlines()
            assert all(len(line) <= 80 for line in lines), [len(x) for x in lines]
            for stage, node in (("flows/gen", "node1"), ("flows/table", "node2"),
                                ("flows/check", "node2")):  # fmt: skip
                rows = [line for line in lines if line.split()[:1] == [stage]]
                assert len(rows) == 1 and rows[0].split()[1:3] == [node, "running"], lines
            node_rows = {line.split()[0]: line for line in lines if line.startswith(" node")}
            assert "alive, cordoned" in node_rows["node1"], node_rows
            assert "cordoned" not in node_rows["node2"], node_rows
            one = _cli(cluster_state_dir, "status", "flows/check", columns=80)
            assert one.returncode == 0, one
            one_lines = one.stdout.splitlines()
            assert all(len(line) <= 80 for line in one_lines), one.stdout
            for metric in ("received", "lost", "duplicated", "digest"):
                assert any(line.split()[:2] == ["metric", metric] for line in one_lines), one_lines
            one = json.loads(_cli(cluster_state_dir, "status", "check", "--json").stdout)
            assert (one["stage"]["name"], one["stage"]["node"], one["replicas"]) == (
                "check", "node2", []), one  # fmt: skip
            assert {"lost", "duplicated"} <= set(one["stage"]["metrics"]), one
            missing = _cli(cluster_state_dir, "status", "flows/nosuch")
            assert missing.returncode == 1 and "running: flows/check" in missing.stderr, missing
        finally:
            run.stop()
        run.cleanup()


@pytest.mark.root
@pytest.mark.criu
@pytest.mark.netns
@pytest.mark.nftables
def test_a_standby_on_a_cordoned_node_does_not_take_over_until_uncordoned(
    cluster_state_dir: Path, tmp_path: Path
) -> None:
    """table on node2 with its standby on node4; node4 cordoned, then node2 dies: node4's
    agent refuses the takeover (its log says why), the placement stays on the dead node; a
    new standby on a cordoned node is refused too. Uncordoned, the standby takes over and the
    stream ends with nothing lost or duplicated and the reference digest."""
    from test_statesync_cluster import _kill_node, _placed, _summary, _with_standby

    path = _with_standby(tmp_path, 30000)  # 30 s at 1,000/s: it still flows at the kill
    path.write_text(path.read_text().replace("rate = 20000", "rate = 1000"))
    app = App.load(path)
    assert app.stage("gen").config["rate"] == 1000
    expected = reference_checker(app)
    with LocalCluster(4) as cluster:
        run = MultiNodeRun(app, cluster)
        run.start()
        try:
            wait_until(lambda: any(s.get("node") == "node4" and s.get("in_sync") for s in
                                   stage_status(run).get("standbys", [])),
                       "the standby in sync", 60, 0.1)  # fmt: skip
            wait_for_input(run, 3000)
            assert _cli(cluster_state_dir, "cordon", "node4").returncode == 0
            assert _cli(cluster_state_dir, "cordon", "node3").returncode == 0
            refused = _cli(cluster_state_dir, "standby", "flows/table", "--on", "node3")
            assert refused.returncode == 1, refused
            assert "`dpmigrate uncordon node3`" in refused.stderr, refused.stderr
            assert _cli(cluster_state_dir, "uncordon", "node3").returncode == 0
            _kill_node(cluster, "node2", run)
            log = Path(cluster.node("node4").log)

            def refusal_logged() -> bool:
                return any("standby cannot take over" in line and "cordoned" in line
                           for line in log.read_text().splitlines())  # fmt: skip

            wait_until(refusal_logged, "node4's agent to refuse the takeover", 30, 0.05)
            assert _placed(cluster) == "node2"  # still the dead node: nobody took over
            assert _cli(cluster_state_dir, "uncordon", "node4").returncode == 0
            wait_until(lambda: _placed(cluster) == "node4", "the takeover", 30, 0.05)
            if not run.wait(duration=120):
                pytest.fail(f"the stream stalled: {_summary(run.status(), str(cluster_state_dir))}")
        finally:
            run.stop()
        assert checker_of(run.status()) == {
            "received": 30000,
            "lost": 0,
            "duplicated": 0,
            "digest": expected["digest"],
        }


@pytest.mark.root
@pytest.mark.criu
@pytest.mark.netns
@pytest.mark.nftables
def test_a_stage_that_cannot_move_stays_and_the_others_go_on(
    cluster_state_dir: Path, tmp_path: Path
) -> None:
    """The first move's destination is cordoned after the plan was made (another operator,
    at the worst moment): that migration's preflight refuses it and rolls back, the stage
    runs on where it was; the next move still runs; the drain is partial (exit status 1) and
    the stream ends with nothing lost or duplicated."""
    from dpmigrate.cluster import cordon
    from dpmigrate.migrate.drain import Drain, DrainPlan

    text = paced_flows(tmp_path, 40000, rate=4000).read_text()
    (tmp_path / "app.toml").write_text(text.replace('node = "node3"', 'node = "node2"'))
    app = App.load(tmp_path / "app.toml")
    expected = reference_checker(app)
    with LocalCluster(3) as cluster:
        run = MultiNodeRun(app, cluster)
        run.start()
        try:
            wait_for_input(run, 2000, "check")
            check_pid = stage_status(run, "check")["pid"]
            cordoned: list[str] = []

            def meanwhile(plan: DrainPlan) -> None:
                cordon.cordon(cluster.store(), plan.moves[0].destination)
                cordoned.append(plan.moves[0].destination)

            result = Drain(cluster, "node2", on_plan=meanwhile).run()
            assert cordoned == ["node3"], result.plan  # the fault happened, where planned
            assert (result.result, result.exit_status) == ("partial", 1), result.as_dict()
            first, second = result.moves
            assert (first.move.stage, first.result) == ("flows/check", "rolled back"), first
            assert first.report is not None and first.report.undone, first.report
            assert "node3 is cordoned" in (first.error or ""), first.error
            assert (second.move.stage, second.move.destination, second.result) == (
                "flows/table", "node1", "moved"), second  # fmt: skip
            check = stage_status(run, "check")
            assert (check["node"], check["pid"]) == ("node2", check_pid), check
            assert run.wait(duration=120), run.status()
        finally:
            run.stop()
        assert checker_of(run.status()) == {
            "received": 40000,
            "lost": 0,
            "duplicated": 0,
            "digest": expected["digest"],
        }
        run.cleanup()
