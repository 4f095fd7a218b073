"""The flows example on a local cluster (network namespaces, agents, tcp rings between nodes):
same digest as in-process; a SIGKILLed stage is restarted by its agent with nothing lost."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from support import checker_of, reference_checker, run_cli

from dpmigrate.runtime.cluster import LocalCluster
from dpmigrate.runtime.manifest import App
from dpmigrate.runtime.multinode import MultiNodeRun

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "flows" / "app.toml"


def _netns() -> set[str]:
    """The local clusters' namespaces (dpm<id>-hub, dpm<id>-node<i>) that exist now."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    names = {line.split()[0] for line in out.stdout.splitlines() if line.strip()}
    return {n for n in names if re.fullmatch(r"dpm[0-9a-f]+-(hub|node\d+)", n)}


def test_flows_multi_node_on_a_temporary_cluster(cluster_state_dir: Path) -> None:
    before = _netns()
    expected = reference_checker(App.load(EXAMPLE))
    result = run_cli(
        "run",
        str(EXAMPLE),
        "--model",
        "multi-node",
        "--json",
        env={"DPMIGRATE_STATE_DIR": str(cluster_state_dir)},
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["checker"] == {
        "received": 20000,
        "lost": 0,
        "duplicated": 0,
        "digest": expected["digest"],
    }
    placed = {s["name"]: s["node"] for s in report["stages"]}
    assert placed == {"gen": "node1", "table": "node2", "check": "node3"}
    assert {r["transport"] for s in report["stages"] for r in s["rings"]} == {"tcp"}
    assert _netns() == before, "the temporary cluster left a namespace behind"
    assert not (cluster_state_dir / "cluster").exists()


def test_sigkilled_stage_on_a_node_restarts_without_loss(
    cluster_state_dir: Path, tmp_path: Path
) -> None:
    text = EXAMPLE.read_text().replace("total = 20000", "total = 40000, rate = 20000")
    (tmp_path / "stages.py").write_text((EXAMPLE.parent / "stages.py").read_text())
    (tmp_path / "app.toml").write_text(text)
    app = App.load(tmp_path / "app.toml")
    expected = reference_checker(app)
    with LocalCluster(3) as cluster:
        run = MultiNodeRun(app, cluster)
        run.start()
        try:
            deadline = time.monotonic() + 60
            while True:
                assert time.monotonic() < deadline, run.status()
                table = next((s for s in run.status() if s["name"] == "table"), {})
                if table.get("msgs_in", 0) > 8000 and table.get("pid"):
                    break
                time.sleep(0.1)
            os.kill(table["pid"], signal.SIGKILL)
            # `dpmigrate status` sees the app while it runs
            status = run_cli(
                "status", "--json", env={"DPMIGRATE_STATE_DIR": str(cluster_state_dir)}
            )
            assert status.returncode == 0, status.stderr
            seen = json.loads(status.stdout)
            assert {n["name"] for n in seen["nodes"] if n["alive"]} == {"node1", "node2", "node3"}
            assert {s["name"] for s in seen["stages"]} == {"gen", "table", "check"}
            assert run.wait(duration=90), run.status()
        finally:
            run.stop()
        stages = {s["name"]: s for s in run.status()}
        assert stages["table"]["restarts"] == 1
        assert checker_of(list(stages.values())) == {
            "received": 40000,
            "lost": 0,
            "duplicated": 0,
            "digest": expected["digest"],
        }
        run.cleanup()
