"""`dpmigrate demo`: the main job, end to end, on a fresh machine.

A local cluster of three nodes; the flows example under traffic, its flow-table stage starting
next to the generator on node1; the stage migrated node1 → node2 (stop-and-copy), node2 →
node3 (post-copy, next to the checker) and back to node1 (stop-and-copy) — its rings switch
between shm and tcp as it goes; a table of every migration; the checker's verdict once the
whole stream went through (everything received, nothing lost, nothing duplicated, the digest
of an uninterrupted run); and a timeline plot of the checker's message rate with each
migration's phases shaded. The cluster is torn down at the end, also on failure or Ctrl-C.

It runs in a private state folder, so it never touches a cluster the user has up.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dpmigrate.migrate import LocalCluster, MigrationReport
from dpmigrate.runtime import inprocess, stagehost
from dpmigrate.runtime.manifest import App
from dpmigrate.runtime.multinode import MultiNodeRun

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "flows"
RATE = 10_000  # packets per second
TOTAL = 130_000  # the stream: about 13 s
HOPS = (("node2", "stop-and-copy"), ("node3", "post-copy"), ("node1", "stop-and-copy"))


@dataclasses.dataclass
class DemoResult:
    migrations: list[MigrationReport]
    checker: dict[str, Any]
    expected_digest: str
    samples: list[tuple[float, int]]
    plot: str | None = None

    @property
    def ok(self) -> bool:
        c = self.checker
        return (
            c.get("received") == TOTAL and c.get("lost") == 0 and c.get("duplicated") == 0
            and c.get("digest") == self.expected_digest
            and not any(m.rolled_back for m in self.migrations)
        )  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        return {
            "migrations": [m.as_dict() for m in self.migrations],
            "checker": {**self.checker, "expected_total": TOTAL,
                        "expected_digest": self.expected_digest, "ok": self.ok},
            "plot": self.plot,
        }  # fmt: skip


def _write_app(folder: Path) -> App:
    shutil.copy(EXAMPLE / "stages.py", folder / "stages.py")
    text = (EXAMPLE / "app.toml").read_text()
    text = text.replace("total = 20000", f"total = {TOTAL}, rate = {RATE}")
    text = text.replace('entry = "stages:FlowTable"\nnode = "node2"',
                        'entry = "stages:FlowTable"\nnode = "node1"')  # fmt: skip
    (folder / "app.toml").write_text(text)
    return App.load(folder / "app.toml")


class _Sampler(threading.Thread):
    """Reads the checker's received count from its status file (written 5 times a second)."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        last = None
        while not self.stop.wait(0.05):
            try:
                status = json.loads(self.path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                continue
            point = (float(status["time"]), int(status["metrics"].get("received", 0)))
            if point != last:
                self.samples.append(point)
                last = point


def run_demo(
    plot: str | None, say: Callable[[str], None], on_phase: Callable[[str], None] | None = None
) -> DemoResult:
    state = Path(tempfile.mkdtemp(prefix="dpm-demo-"))
    previous = os.environ.get("DPMIGRATE_STATE_DIR")
    os.environ["DPMIGRATE_STATE_DIR"] = str(state / "state")  # a private cluster
    try:
        # beside the state dir, not in it: the nodes see only their own folder of that
        app = _write_app(Path(tempfile.mkdtemp(prefix="app-", dir=state)))
        say("computing the reference digest (the same stream, in-process)")
        ref = inprocess.summary(inprocess.run(app))["stages"]
        expected = next(s["metrics"]["digest"] for s in ref if s["name"] == "check")
        say("bringing up a local cluster of 3 nodes (network namespaces + agents)")
        with LocalCluster(3) as cluster:
            run = MultiNodeRun(app, cluster)
            run.start()
            # the operator's view, on the host: where the checker's node keeps its status
            check_status = stagehost.status_path(run.run_dir, "check")
            sampler = _Sampler(cluster.host_path(app.stage("check").node, str(check_status)))
            sampler.start()
            reports: list[MigrationReport] = []
            try:
                say(f"flows running: gen and table on node1, check on node3, {RATE:,} packets/s")
                time.sleep(2.5)
                for node, strategy in HOPS:
                    say(f"migrating table to {node} ({strategy})")
                    reports.append(cluster.migrate("table", to=node, strategy=strategy,
                                                   on_phase=on_phase))  # fmt: skip
                    time.sleep(2.0)
                say("waiting for the rest of the stream")
                run.wait(duration=60)
            finally:
                sampler.stop.set()
                sampler.join(5)
                stages = run.status()
                run.stop()
            checker = next((s.get("metrics", {}) for s in stages if s["name"] == "check"), {})
            run.cleanup()
        result = DemoResult(reports, dict(checker), expected, sampler.samples)
        if plot:
            result.plot = draw(result, plot)
        return result
    finally:
        if previous is None:
            os.environ.pop("DPMIGRATE_STATE_DIR", None)
        else:
            os.environ["DPMIGRATE_STATE_DIR"] = previous
        shutil.rmtree(state, ignore_errors=True)


_PHASE_COLOURS = {
    "preflight": "#d9d9d9", "quiesce": "#fdd0a2", "transfer": "#fc9272", "restore": "#9ecae1",
    "reconnect": "#a1d99b", "verify": "#dadaeb", "cleanup": "#f0f0f0", "rollback": "#e31a1c",
}  # fmt: skip


def draw(result: DemoResult, path: str) -> str:
    """The checker's messages per second over time, each migration's phases shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result.samples
    if len(samples) < 2:
        raise ValueError("too few samples to plot")
    t0 = samples[0][0]
    times, rates = [], []
    for (ta, na), (tb, nb) in itertools.pairwise(samples):
        if tb > ta:
            times.append(tb - t0)
            rates.append((nb - na) / (tb - ta))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    ax.plot(times, rates, color="#08519c", linewidth=1.2, label="checker: messages/s")
    seen: set[str] = set()
    for report in result.migrations:
        for phase, (start, end) in report.phase_times.items():
            label = phase if phase not in seen else None
            seen.add(phase)
            colour = _PHASE_COLOURS.get(phase, "#cccccc")
            ax.axvspan(start - t0, max(end - t0, start - t0 + 0.01), color=colour, alpha=0.6,
                       label=label)  # fmt: skip
        ax.text(report.started_at - t0, max(rates) * 1.02,
                f"{report.source}→{report.destination}\n{report.strategy}\n"
                f"down {report.downtime_s * 1000:.0f} ms", fontsize=8, va="bottom")  # fmt: skip
    ax.set_xlabel("seconds")
    ax.set_ylabel("messages per second at the checker")
    c = result.checker
    ax.set_title(
        f"dpmigrate demo — flow-table stage migrated 3 times under traffic; received "
        f"{c.get('received', 0):,}, lost {c.get('lost')}, duplicated {c.get('duplicated')}"
    )
    ax.set_ylim(0, max(rates) * 1.35)
    ax.legend(loc="lower right", fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(Path(path).resolve())
