"""`dpmigrate demo`, the main job, end to end: three migrations under traffic (stop-and-copy,
post-copy, statesync), a node lost and its stage's standby taking over, the checker's
verdict, the timeline plot, and nothing left behind."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from rich.console import Console
from support import require, run_cli


def _netns() -> set[str]:
    """The local clusters' namespaces (dpm<id>-hub, dpm<id>-node<i>) that exist now (other
    users' clusters included: the machine may be shared)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    names = {line.split()[0] for line in out.stdout.splitlines() if line.strip()}
    return {n for n in names if re.fullmatch(r"dpm[0-9a-f]+-(hub|node\d+)", n)}


def test_demo_migrates_three_times_fails_over_and_loses_nothing(tmp_path: Path) -> None:
    require("root", "netns", "criu", "nftables", "etcd")
    plot = tmp_path / "timeline.png"
    result = run_cli("demo", "--json", "--plot", str(plot), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert set(report) == {"migrations", "failover", "checker", "plot", "cluster_id"}
    hops = [(m["source"], m["destination"], m["strategy"]) for m in report["migrations"]]
    assert hops == [("node2", "node1", "stop-and-copy"), ("node1", "node3", "post-copy"),
                    ("node3", "node2", "statesync")]  # fmt: skip
    for m in report["migrations"]:
        assert m["lost"] == 0 and m["duplicated"] == 0 and not m["rolled_back"], m
        assert m["state_digest_before"] == m["state_digest_after"]
    statesync = report["migrations"][2]
    assert statesync["frozen_time_s"] == 0 and statesync["final_delta_bytes"] is not None
    failover = report["failover"]
    assert (failover["source"], failover["destination"]) == ("node2", "node4"), failover
    assert failover["error"] is None, failover
    assert len(failover["killed_pids"]) >= 2  # node2's agent and its table, by PID
    # the standby took over after node2's lease expired (DPMIGRATE_NODE_TTL, 1 s), and the
    # checker saw the stream stop for a while, and resume
    assert 0 < failover["takeover_s"] <= failover["running_s"] < 30, failover
    assert failover["gap_s"] is not None and 0 < failover["gap_s"] < 30, failover
    assert failover["lost"] == 0 and failover["duplicated"] == 0, failover
    checker = report["checker"]
    assert checker["ok"] is True
    assert checker["received"] == checker["expected_total"] and checker["lost"] == 0
    assert checker["duplicated"] == 0
    assert checker["digest"] == checker["expected_digest"]
    assert report["plot"] == str(plot) and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    left = {n for n in _netns() if n.startswith(f"dpm{report['cluster_id']}-")}
    assert not left, f"the demo left namespaces behind: {left}"
    _check_table(report)


def _check_table(report: dict) -> None:
    """The demo's table, as `dpmigrate demo` prints it: a row per migration, one for the
    failover (its gap at the checker as the downtime), and the failover's line."""
    from dpmigrate.migrate import MigrationReport
    from dpmigrate.migrate.demo import DemoResult, Failover, failover_line, table

    result = DemoResult([MigrationReport(**m) for m in report["migrations"]],
                        report["checker"], report["checker"]["expected_digest"], [],
                        Failover(**report["failover"]))  # fmt: skip
    console = Console(record=True, width=200)
    console.print(table(result))
    console.print(failover_line(result.failover))
    out = console.export_text()
    rows = [line for line in out.splitlines() if "flows/table" in line]
    assert len(rows) == 4, out
    expected = [("node2 → node1", "stop-and-copy"), ("node1 → node3", "post-copy"),
                ("node3 → node2", "statesync"), ("node2 → node4", "failover (node2 killed)")]  # fmt: skip
    for row, (hop, how) in zip(rows, expected, strict=True):
        assert hop in row and how in row, out
    gap = f"{report['failover']['gap_s'] * 1000:,.0f} ms"
    assert gap in rows[3], out
    assert "FAILED" not in out and "ROLLED BACK" not in out, out
    assert re.search(r"failover: node2 killed; node4's agent won the placement after [\d,]+ ms",
                     out), out  # fmt: skip
