"""Live migration of a flows stage under traffic on a local cluster, with real CRIU: nothing
lost, nothing duplicated, state intact — and a failure injected in a phase rolls back with the
stage still running on its source."""

from __future__ import annotations

import hashlib
import json
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

from dpmigrate.migrate import LocalCluster, Migration
from dpmigrate.runtime.manifest import App
from dpmigrate.runtime.multinode import MultiNodeRun


def test_stop_and_copy_back_and_forth_under_traffic(
    cluster_state_dir: Path, tmp_path: Path
) -> None:
    """table: node2 → node1 (its ring from gen turns shm) → node3 (tcp again) by the CLI."""
    app = App.load(paced_flows(tmp_path, 80000))
    expected = reference_checker(app)
    with LocalCluster(3) as cluster:
        run = MultiNodeRun(app, cluster)
        run.start()
        try:
            wait_for_input(run, 6000)
            first = cluster.migrate("table", to="node1")
            assert not first.rolled_back, first.error
            assert stage_status(run)["node"] == "node1"
            rings = {r["name"]: r["transport"] for r in stage_status(run)["rings"]}
            assert rings["flows.gen.out-table.in"] == "shm", rings
            wait_for_input(run, stage_status(run)["msgs_in"] + 3000)
            result = run_cli("migrate", "flows/table", "--to", "node3", "--strategy", "post-copy", "--json",
                             env={"DPMIGRATE_STATE_DIR": str(cluster_state_dir)}, timeout=120)  # fmt: skip
            assert result.returncode == 0, result.stderr
            second = json.loads(result.stdout)
            assert run.wait(duration=90), run.status()
        finally:
            run.stop()
        for report in (first.as_dict(), second):
            assert report["lost"] == 0 and report["duplicated"] == 0, report
            assert report["state_digest_before"] == report["state_digest_after"], report
            assert report["rolled_back"] is False
            assert report["frozen_time_s"] > 0 and report["pages_written"] > 0
            assert report["transferred_bytes"] > 0 and report["downtime_s"] > 0
            assert set(report["phases"]) == {"preflight", "quiesce", "transfer", "restore",
                                             "reconnect", "verify", "cleanup"}  # fmt: skip
            assert report["warnings"] == [], report["warnings"]
        # each side removed its own folder of each migration
        assert not list(cluster_state_dir.glob("**/migrations/m*"))
        stages = {s["name"]: s for s in run.status()}
        assert stages["table"]["node"] == "node3"
        assert all(s["restarts"] == 0 for s in stages.values()), stages
        assert checker_of(list(stages.values())) == {
            "received": 80000,
            "lost": 0,
            "duplicated": 0,
            "digest": expected["digest"],
        }
        run.cleanup()


def test_shm_rings_continue_as_tcp_when_a_stage_leaves_its_host(
    cluster_state_dir: Path, tmp_path: Path
) -> None:
    """All three stages on one host (shm rings, as in the multi-process model); the table
    leaves for another node: both its rings continue as tcp, sequence numbers continuing."""
    text = paced_flows(tmp_path, 50000).read_text()
    text = text.replace('node = "node2"', 'node = "node1"').replace(
        'node = "node3"', 'node = "node1"'
    )
    (tmp_path / "app.toml").write_text(text)
    app = App.load(tmp_path / "app.toml")
    assert {s.node for s in app.stages} == {"node1"}
    expected = reference_checker(app)
    with LocalCluster(2) as cluster:
        run = MultiNodeRun(app, cluster)
        run.start()
        try:
            wait_for_input(run, 6000)
            before = {r["name"]: r for r in stage_status(run)["rings"]}
            assert {r["transport"] for r in before.values()} == {"shm"}
            report = cluster.migrate("table", to="node2")
            assert not report.rolled_back, report.error
            after = {r["name"]: r for r in stage_status(run)["rings"]}
            assert {r["transport"] for r in after.values()} == {"tcp"}, after
            for name, ring in after.items():  # numbering continues across the switch
                position = "next_expected" if ring["role"] == "consumer" else "next_seq"
                assert ring[position] >= before[name][position] > 0
            assert run.wait(duration=90), run.status()
        finally:
            run.stop()
        assert report.lost == 0 and report.duplicated == 0
        assert checker_of(run.status()) == {
            "received": 50000,
            "lost": 0,
            "duplicated": 0,
            "digest": expected["digest"],
        }
        run.cleanup()


@pytest.mark.root
@pytest.mark.criu
@pytest.mark.netns
@pytest.mark.nftables
@pytest.mark.parametrize("strategy", ["stop-and-copy", "post-copy"])
def test_a_file_corrupted_at_the_source_is_refused_and_the_stage_stays(
    cluster_state_dir: Path, tmp_path: Path, strategy: str
) -> None:
    """After the source sealed its outgoing folder and before the destination pulled it, one
    byte of an image flips: the destination refuses it naming the file, before any restore,
    the migration rolls back, the stage runs on at its source and the checker sees nothing
    lost or duplicated; both sides removed their folders of the migration."""
    app = App.load(paced_flows(tmp_path, 50000))
    expected = reference_checker(app)
    with LocalCluster(3) as cluster:
        run = MultiNodeRun(app, cluster)
        run.start()
        flipped: list[str] = []
        try:
            wait_for_input(run, 5000)
            source_pid = stage_status(run)["pid"]

            def corrupt(step: str) -> None:
                if step != "dumped":
                    return
                assert migration.source_bundle is not None
                root = cluster.host_path("node2", migration.source_bundle)
                listed = json.loads((root / "manifest.json").read_text())["files"]
                name = next(n for n in sorted(listed) if n.startswith("images/core-"))
                path = root / name
                data = bytearray(path.read_bytes())
                data[len(data) // 2] ^= 0xFF
                path.write_bytes(bytes(data))
                assert hashlib.sha256(path.read_bytes()).hexdigest() != listed[name]["sha256"]
                assert path.stat().st_size == listed[name]["size"]  # only the content differs
                flipped.append(name)

            migration = Migration(cluster, "table", "node3", strategy, on_step=corrupt,
                                  flow_timeout=3.0)  # fmt: skip
            report = migration.run()
            assert flipped, "the fault was never injected"
            assert report.rolled_back and report.error, report
            assert "\n" not in report.error, report.error
            assert report.error.startswith("transfer: "), report.error
            assert f"{flipped[0]}: checksum mismatch" in report.error, report.error
            assert "restore" not in report.phases, report.phases  # CRIU never saw the files
            assert report.warnings == [], report.warnings
            table = stage_status(run)
            assert table["node"] == "node2" and table["pid"] == source_pid, table
            assert not list(cluster_state_dir.glob(f"**/migrations/{migration.id}")), (
                "a side kept its folder of the migration"
            )
            assert run.wait(duration=90), run.status()
        finally:
            run.stop()
        assert report.lost == 0 and report.duplicated == 0, report
        stages = {s["name"]: s for s in run.status()}
        assert stages["table"]["node"] == "node2"
        assert checker_of(list(stages.values())) == {
            "received": 50000,
            "lost": 0,
            "duplicated": 0,
            "digest": expected["digest"],
        }
        run.cleanup()
