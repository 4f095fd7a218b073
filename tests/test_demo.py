"""`dpmigrate demo`, the main job, end to end: three migrations under traffic, the checker's
verdict, the timeline plot, and nothing left behind."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from support import require, run_cli


def _netns() -> set[str]:
    """The local clusters' namespaces (dpm<id>-hub, dpm<id>-node<i>) that exist now."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    names = {line.split()[0] for line in out.stdout.splitlines() if line.strip()}
    return {n for n in names if re.fullmatch(r"dpm[0-9a-f]+-(hub|node\d+)", n)}


def test_demo_migrates_three_times_and_loses_nothing(tmp_path: Path) -> None:
    require("root", "netns", "criu", "nftables")
    before = _netns()
    plot = tmp_path / "timeline.png"
    result = run_cli("demo", "--json", "--plot", str(plot), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert set(report) == {"migrations", "checker", "plot"}
    hops = [(m["source"], m["destination"], m["strategy"]) for m in report["migrations"]]
    assert hops == [("node1", "node2", "stop-and-copy"), ("node2", "node3", "post-copy"),
                    ("node3", "node1", "stop-and-copy")]  # fmt: skip
    for m in report["migrations"]:
        assert m["lost"] == 0 and m["duplicated"] == 0 and not m["rolled_back"], m
        assert m["state_digest_before"] == m["state_digest_after"]
    checker = report["checker"]
    assert checker["ok"] is True
    assert checker["received"] == checker["expected_total"] and checker["lost"] == 0
    assert checker["digest"] == checker["expected_digest"]
    assert report["plot"] == str(plot) and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _netns() == before, "the demo left a namespace behind"
