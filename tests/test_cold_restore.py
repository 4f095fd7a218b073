"""Cold restore (`dpmigrate restore DIR --cold`, DESIGN.md §5 (c)): a fresh instance of a
checkpointed stage starts on another node from the bundle's state snapshot and ring
positions, without CRIU — also where a CRIU restore refuses the bundle (other CPU flags,
another kernel, no images) — and the real checker sees nothing lost, nothing duplicated and
the digest of an uninterrupted run. Refused like a CRIU restore: a corrupt state.bin (named;
nothing starts, the placement stays), the stage still running, a bundle with no state."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from support import (
    alive,
    checker_of,
    paced_flows,
    reference_checker,
    run_cli,
    stage_status,
    wait_for_input,
)

from dpmigrate.checkpoint import bundle as bundles
from dpmigrate.checkpoint import cold
from dpmigrate.errors import BundleError, DpmigrateError
from dpmigrate.runtime.cluster import LocalCluster
from dpmigrate.runtime.manifest import App
from dpmigrate.runtime.multinode import MultiNodeRun

TOTAL = 40000


@pytest.fixture
def app(tmp_path: Path) -> App:
    return App.load(paced_flows(tmp_path, TOTAL))


def _table_on(run: MultiNodeRun, node: str) -> dict:
    """The table stage as ``node``'s agent reports it ({} if it has none); a stage stopped on
    one node shows there as well, finished."""
    return next((s for s in run.status() if s["name"] == "table" and s["node"] == node), {})


def _finished_clean(run: MultiNodeRun, expected: dict, node: str) -> None:
    """The app ran to its end with the stage on ``node``, and the checker saw everything once."""
    table = _table_on(run, node)
    assert table.get("finished") and table["restarts"] == 0, table
    assert checker_of(run.status()) == {
        "received": TOTAL,
        "lost": 0,
        "duplicated": 0,
        "digest": expected["digest"],
    }


def test_cold_restore_on_another_node(cluster_state_dir: Path, app: App, tmp_path: Path) -> None:
    expected = reference_checker(app)
    with LocalCluster(3) as cluster:
        run = MultiNodeRun(app, cluster)
        run.start()
        try:
            wait_for_input(run, 8000)
            out = tmp_path / "table.bundle"
            made = cluster.checkpoint("table", out)  # without --leave-running: it ends here
            assert not stage_status(run), "the checkpointed stage still shows as running"
            snapshot = cold.read(out)
            assert (snapshot.state.version, snapshot.state.digest()) == (
                made["state_version"], made["state_digest"],
            )  # fmt: skip
            before = cluster.store().placement("flows", "table")
            assert before is not None and before.node == "node2"
            info = cluster.restore(out, node="node1", cold=True)
            assert info["cold"] is True and info["node"] == "node1"
            assert info["started_from"] == "bundle"
            assert (info["state_version"], info["state_digest"]) == (
                made["state_version"], made["state_digest"],
            )  # fmt: skip
            quiesced = {k: made["positions"][k] for k in ("inputs", "outputs")}
            assert info["positions"] == quiesced and quiesced["inputs"]["in"] > 0
            assert alive(info["pid"]) and info["total_s"] >= info["restore_s"] > 0
            after = cluster.store().placement("flows", "table")
            assert after is not None and (after.node, after.epoch) == ("node1", before.epoch + 1)
            assert run.wait(duration=90), run.status()
        finally:
            run.stop()
        _finished_clean(run, expected, "node1")
        run.cleanup()


def test_cold_restore_where_criu_restore_refuses_through_the_cli(
    cluster_state_dir: Path, app: App, tmp_path: Path
) -> None:
    expected = reference_checker(app)
    env = {"DPMIGRATE_STATE_DIR": str(cluster_state_dir)}
    with LocalCluster(3) as cluster:
        run = MultiNodeRun(app, cluster)
        run.start()
        try:
            wait_for_input(run, 6000)
            out = tmp_path / "table.bundle"
            result = run_cli("checkpoint", "flows/table", "--out", str(out), "--json", env=env,
                             timeout=120)  # fmt: skip
            assert result.returncode == 0, result.stderr
            made = json.loads(result.stdout)
            # Dumped, as far as the manifest says, on a CPU with a flag this one lacks and on
            # another kernel. The manifest is not among the files it checksums: edited in place.
            manifest_path = out / bundles.MANIFEST
            manifest = json.loads(manifest_path.read_text())
            manifest["cpu_flags"].append("dpm_no_such_flag")
            manifest["kernel"] = "4.19.0-other"
            manifest_path.write_text(json.dumps(manifest, indent=2))
            report = bundles.verify(out)
            assert report.ok is False and any(
                p.kind == "incompatible" and "dpm_no_such_flag" in p.problem
                for p in report.problems
            ), report.problems
            plain = run_cli("restore", str(out), "--node", "node1", "--json", env=env,
                            timeout=120)  # fmt: skip
            assert plain.returncode == 1 and "dpm_no_such_flag" in plain.stderr, plain.stderr
            assert not stage_status(run), "a refused CRIU restore started something"
            shutil.rmtree(out / bundles.IMAGES)  # and no CRIU image at all: not needed
            restored = run_cli("restore", str(out), "--cold", "--node", "node1", "--json",
                               env=env, timeout=120)  # fmt: skip
            assert restored.returncode == 0, restored.stderr
            info = json.loads(restored.stdout)
            assert info["cold"] is True and info["node"] == "node1" and info["pid"] > 0
            assert info["stage"] == "flows/table" and info["started_from"] == "bundle"
            assert (info["state_version"], info["state_digest"]) == (
                made["state_version"], made["state_digest"],
            )  # fmt: skip
            assert info["positions"] == {k: made["positions"][k] for k in ("inputs", "outputs")}
            assert info["total_s"] > 0
            assert run.wait(duration=90), run.status()
        finally:
            run.stop()
        _finished_clean(run, expected, "node1")
        run.cleanup()


def test_cold_restore_refusals_then_a_leave_running_bundle_elsewhere(
    cluster_state_dir: Path, app: App, tmp_path: Path
) -> None:
    expected = reference_checker(app)
    env = {"DPMIGRATE_STATE_DIR": str(cluster_state_dir)}
    with LocalCluster(3) as cluster:
        run = MultiNodeRun(app, cluster)
        run.start()
        try:
            wait_for_input(run, 4000)
            out = tmp_path / "table.bundle"
            made = cluster.checkpoint("table", out, leave_running=True)
            wait_for_input(run, made["positions"]["inputs"]["in"] + 3000)  # it went on
            with pytest.raises(DpmigrateError, match="is running on node node2"):
                cluster.restore(out, node="node1", cold=True)
            with cluster.client("node2") as agent:
                agent.call("stop_stage", app="flows", stage="table")
            placed = cluster.store().placement("flows", "table")
            # A corrupted state snapshot: refused, naming the file; nothing starts, the
            # placement stays, the bundle is as it was.
            state_bin = out / bundles.STATE
            good = state_bin.read_bytes()
            bad = bytearray(good)
            bad[len(bad) // 2] ^= 0xFF
            state_bin.write_bytes(bytes(bad))
            with pytest.raises(BundleError, match=r"state\.bin: checksum mismatch"):
                cluster.restore(out, node="node1", cold=True)
            refused = run_cli("restore", str(out), "--cold", "--node", "node1", env=env)
            assert refused.returncode == 1 and "state.bin: checksum mismatch" in refused.stderr
            assert state_bin.read_bytes() == bytes(bad)
            assert cluster.store().placement("flows", "table") == placed
            assert not stage_status(run).get("pid"), "a refused cold restore started something"
            state_bin.write_bytes(good)
            # The stage ran on after this checkpoint and the producer forgot what it consumed
            # since: the cold copy on node1 starts from node2's later journal point instead.
            restored = run_cli("restore", str(out), "--cold", "--node", "node1", env=env,
                               timeout=120)  # fmt: skip
            assert restored.returncode == 0, restored.stderr
            line = restored.stdout.strip()
            assert line.startswith("restored stage flows/table cold (no CRIU) on node1 as pid ")
            assert "from the journal's point" in line, line
            table = _table_on(run, "node1")
            assert table["state_version"] > made["state_version"], table
            with cluster.client("node2") as agent:  # the copy stopped there, and its folder
                agent.call("forget_app", app="flows")
            assert run.wait(duration=90), run.status()
        finally:
            run.stop()
        _finished_clean(run, expected, "node1")
        run.cleanup()


def test_a_bundle_without_state_or_positions_says_what_to_do(tmp_path: Path) -> None:
    """A `checkpoint --pid` bundle holds no state snapshot and no positions: refused before
    any cluster is asked, with the way out named."""
    host = bundles.HostFacts("4.2.1", ("fpu",), "6.18.0", "x86_64")
    process = tmp_path / "process.bundle"
    (process / bundles.IMAGES).mkdir(parents=True)
    (process / bundles.IMAGES / "core-1.img").write_bytes(b"\0" * 64)
    bundles.seal(process, 1, dump={}, host=host)
    result = run_cli("restore", str(process), "--cold", "--json", timeout=30)
    assert result.returncode == 1, result.stdout
    assert "holds no state.bin and no rings.json" in result.stderr
    assert "`dpmigrate restore DIR` without --cold" in result.stderr
    assert "checkpoint APP/STAGE" in result.stderr
    no_positions = tmp_path / "no-positions.bundle"
    (no_positions / bundles.IMAGES).mkdir(parents=True)
    context = {"app": "flows", "stage": "table", "manifest": "/m.toml", "run_dir": "/r",
               "model": "multi-node"}  # fmt: skip
    bundles.seal(no_positions, 1, dump={}, state=b"\x92\x00\x80", rings=context, host=host,
                 stage="flows/table")  # fmt: skip
    with pytest.raises(BundleError, match=r"rings\.json: lacks \['positions'\]"):
        cold.read(no_positions)
