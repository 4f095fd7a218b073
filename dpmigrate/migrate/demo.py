"""`dpmigrate demo`: the main job, end to end, on a fresh machine.

A local cluster of four nodes; the flows example under traffic — gen on node1, its flow-table
stage on node2 with a hot standby on node4 (``standby = "node4"`` in the manifest), the
checker on node3. The table is migrated node2 → node1 (stop-and-copy, next to the
generator), node1 → node3 (post-copy, next to the checker) and node3 → node2 (statesync: a
fresh instance catches up while the source runs, then a short cutover); the standby follows
each new primary and gates it again. Then node2 dies — its link is cut and its agent and its
stages are SIGKILLed, by PID, processes of the demo's own cluster only — and the standby
takes over once node2's lease has expired.
Printed: a table of the migrations and the failover; the checker's verdict once the whole
stream went through (everything received, nothing lost, nothing duplicated, the digest of an
uninterrupted run); and a timeline plot of the checker's message rate with each migration's
phases and the failover shaded. The cluster is torn down at the end, also on failure or Ctrl-C.

It runs in a private state folder, so it never touches a cluster the user has up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.table import Table

from dpmigrate.errors import DpmigrateError
from dpmigrate.migrate import LocalCluster, MigrationReport
from dpmigrate.runtime import inprocess, stagehost
from dpmigrate.runtime.cluster import private_state_dir
from dpmigrate.runtime.manifest import App
from dpmigrate.runtime.multinode import MultiNodeRun

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "flows"
RATE = 10_000  # packets per second
TOTAL = 180_000  # the stream: 18 s
NODES = 4
STAGE = "table"
START = "node2"  # where the table starts
STANDBY = "node4"  # its hot standby
HOPS = (("node1", "stop-and-copy"), ("node3", "post-copy"), ("node2", "statesync"))
KILLED = "node2"  # the table's node when it dies: the last hop's destination
WARMUP_S = 2.0  # traffic before the first migration (once the standby is in sync)
BETWEEN_S = 1.5  # traffic between two steps
IN_SYNC_TIMEOUT_S = 30.0
TAKEOVER_TIMEOUT_S = 30.0
#: Stream left when node2 is killed, at least: the failover must happen under traffic.
MIN_LEFT_S = 3.0
FINISH_TIMEOUT_S = 60.0


@dataclasses.dataclass
class Failover:
    """The node loss: when it was killed, and how the standby took over."""

    stage: str
    source: str  # the node that died
    destination: str  # the standby's node
    killed_at: float  # wall clock
    #: kill → the placement names the standby's node (lease expiry, watch, compare-and-swap)
    takeover_s: float | None = None
    #: kill → the stage runs there (as its agent reports it)
    running_s: float | None = None
    #: the checker's longest input gap ending after the kill: the downtime its consumer saw
    gap_s: float | None = None
    gap: tuple[float, float] | None = None  # that gap's (start, end), wall clock
    lost: int | None = None
    duplicated: int | None = None
    killed_pids: list[int] = dataclasses.field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class DemoResult:
    migrations: list[MigrationReport]
    checker: dict[str, Any]
    expected_digest: str
    samples: list[tuple[float, int]]
    failover: Failover | None = None
    plot: str | None = None
    cluster_id: str | None = None  # the local cluster the demo built (and tore down)

    @property
    def ok(self) -> bool:
        c, f = self.checker, self.failover
        return (
            c.get("received") == TOTAL and c.get("lost") == 0 and c.get("duplicated") == 0
            and c.get("digest") == self.expected_digest
            and len(self.migrations) == len(HOPS)
            and not any(m.rolled_back for m in self.migrations)
            and f is not None and f.error is None and f.running_s is not None
        )  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        return {
            "migrations": [m.as_dict() for m in self.migrations],
            "failover": None if self.failover is None else self.failover.as_dict(),
            "checker": {**self.checker, "expected_total": TOTAL,
                        "expected_digest": self.expected_digest, "ok": self.ok},
            "plot": self.plot,
            "cluster_id": self.cluster_id,
        }  # fmt: skip


def _write_app(folder: Path, rate: int = RATE, standby: bool = True) -> App:
    """The flows example, ``TOTAL`` packets at ``rate``/s, table on node2 (with its standby
    on node4 in the manifest if ``standby``)."""
    shutil.copy(EXAMPLE / "stages.py", folder / "stages.py")
    text = (EXAMPLE / "app.toml").read_text()
    text = text.replace("total = 20000", f"total = {TOTAL}, rate = {rate}")
    table = f'entry = "stages:FlowTable"\nnode = "{START}"'
    if table not in text or f"total = {TOTAL}" not in text:
        raise DpmigrateError(f"{EXAMPLE / 'app.toml'} is not the flows example the demo knows")
    if standby:
        text = text.replace(table, f'{table}\nstandby = "{STANDBY}"')
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


def _wait(check: Callable[[], object], what: str, timeout: float, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise DpmigrateError(f"demo: timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


class _Demo:
    """The steps, on one cluster and one run of the app."""

    def __init__(self, cluster: LocalCluster, run: MultiNodeRun, say: Callable[[str], None],
                 on_phase: Callable[[str], None] | None) -> None:  # fmt: skip
        self.cluster = cluster
        self.run = run
        self.say = say
        self.on_phase = on_phase
        self.started = time.monotonic()
        self.reports: list[MigrationReport] = []
        self.failover: Failover | None = None
        self.error: str | None = None  # why the demo stopped early
        self._checker_before: dict[str, Any] = {}  # the checker's counts at the kill

    def stage(self, name: str) -> dict[str, Any]:
        return next((s for s in self.run.status() if s["name"] == name), {})

    def standby_in_sync(self) -> bool:
        return any(s.get("node") == STANDBY and s.get("in_sync")
                   for s in self.stage(STAGE).get("standbys", []))  # fmt: skip

    def migrate(self) -> None:
        self.say(f"waiting for the standby on {STANDBY} to be in sync")
        _wait(self.standby_in_sync, f"the standby on {STANDBY} in sync", IN_SYNC_TIMEOUT_S)
        time.sleep(WARMUP_S)
        for node, strategy in HOPS:
            self.say(f"migrating {STAGE} to {node} ({strategy})")
            report = self.cluster.migrate(STAGE, to=node, strategy=strategy,
                                          on_phase=self.on_phase)  # fmt: skip
            self.reports.append(report)
            if report.rolled_back:
                raise DpmigrateError(f"demo: the migration to {node} rolled back: {report.error}")
            time.sleep(BETWEEN_S)

    def lose_node(self) -> None:
        """Kill the table's node (link cut, then SIGKILL of its agent and its stages by PID)
        once the standby is in sync with the table there; the standby takes over."""
        self.say(f"waiting for the standby on {STANDBY} to gate the table on {KILLED}")
        _wait(lambda: self.stage(STAGE).get("node") == KILLED and self.standby_in_sync(),
              f"the standby in sync with the table on {KILLED}", IN_SYNC_TIMEOUT_S)  # fmt: skip
        left = TOTAL / RATE - (time.monotonic() - self.started)
        if left < MIN_LEFT_S:
            raise DpmigrateError(
                f"demo: only {max(left, 0):.1f} s of the stream left before the node loss (this "
                "machine is slow or busy); run the demo again"
            )
        self._checker_before = self.stage("check").get("metrics", {})
        node = self.cluster.node(KILLED)
        pids = [s["pid"] for s in self.run.status() if s.get("node") == KILLED and s.get("pid")]
        if node.agent_pid is None or not pids:
            raise DpmigrateError(f"demo: no agent or stage process to kill on {KILLED}")
        # the whole node: its agent's keeper first (it would start the agent again)
        killed = [p for p in (node.keeper_pid, node.agent_pid) if p is not None] + pids
        self.say(f"killing {KILLED}: link cut, its agent's keeper, agent and table SIGKILLed "
                 f"(PIDs {', '.join(map(str, killed))})")  # fmt: skip
        hub = f"dpm{self.cluster.id}-hub"
        veth = f"veth{KILLED.removeprefix('node')}"
        failover = self.failover = Failover(f"{self.run.app.name}/{STAGE}", KILLED, STANDBY,
                                            time.time(), killed_pids=killed)  # fmt: skip
        t0 = time.monotonic()
        subprocess.run(["ip", "-n", hub, "link", "set", veth, "down"], check=True, timeout=10,
                       capture_output=True)  # fmt: skip
        for pid in killed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.say(f"waiting for {STANDBY} to take over ({KILLED}'s lease expires first)")
        _wait(lambda: self._placed() == STANDBY, f"{STANDBY} to take over", TAKEOVER_TIMEOUT_S,
              poll=0.01)  # fmt: skip
        failover.takeover_s = round(time.monotonic() - t0, 4)
        _wait(self._running_on_standby, f"{STAGE} running on {STANDBY}", TAKEOVER_TIMEOUT_S,
              poll=0.01)  # fmt: skip
        failover.running_s = round(time.monotonic() - t0, 4)

    def _placed(self) -> str | None:
        placed = self.cluster.store().placement(self.run.app.name, STAGE)
        return placed.node if placed else None

    def _running_on_standby(self) -> bool:
        with self.cluster.client(STANDBY, timeout=5) as agent:
            return any(s["name"] == STAGE and s.get("role", "primary") == "primary"
                       and s.get("phase") == "running"
                       for s in agent.call("status")["stages"])  # fmt: skip

    def measure_failover(self, check: dict[str, Any]) -> None:
        """From the checker's status at the end: its gap after the kill, lost and dup."""
        f = self.failover
        if f is None:
            return
        gaps = [(a, b) for a, b in check.get("input_gaps") or [] if b >= f.killed_at]
        if gaps:
            f.gap = max(gaps, key=lambda g: g[1] - g[0])
            f.gap_s = round(f.gap[1] - f.gap[0], 4)
        after, before = check.get("metrics", {}), self._checker_before
        if "lost" in after and "lost" in before:
            f.lost = int(after["lost"]) - int(before["lost"])
            f.duplicated = int(after["duplicated"]) - int(before["duplicated"])


def run_demo(
    plot: str | None, say: Callable[[str], None], on_phase: Callable[[str], None] | None = None
) -> DemoResult:
    with private_state_dir("dpm-demo-", "state") as state:  # a private cluster
        # beside the state dir, not in it: the nodes see only their own folder of that
        app = _write_app(Path(tempfile.mkdtemp(prefix="app-", dir=state)))
        say("computing the reference digest (the same stream, in-process, unpaced)")
        # pacing changes when packets go out, never which: the same stream, faster
        reference = _write_app(Path(tempfile.mkdtemp(prefix="ref-", dir=state)), 0, False)
        ref = inprocess.summary(inprocess.run(reference))["stages"]
        expected = next(s["metrics"]["digest"] for s in ref if s["name"] == "check")
        say(f"bringing up a local cluster of {NODES} nodes (network namespaces + agents)")
        with LocalCluster(NODES) as cluster:
            cluster_id = cluster.id
            run = MultiNodeRun(app, cluster)
            run.start()
            demo = _Demo(cluster, run, say, on_phase)
            # the operator's view, on the host: where the checker's node keeps its status
            check_status = stagehost.status_path(run.run_dir, "check")
            sampler = _Sampler(cluster.host_path(app.stage("check").node, str(check_status)))
            sampler.start()
            stages: list[dict[str, Any]] = []
            try:
                say(f"flows running: gen on node1, table on {START} (standby on {STANDBY}), "
                    f"check on node3, {RATE:,} packets/s")  # fmt: skip
                try:
                    demo.migrate()
                    demo.lose_node()
                except DpmigrateError as err:  # the verdict says FAIL; the rest still runs
                    demo.error = str(err)
                    say(demo.error)
                    if demo.failover is not None:
                        demo.failover.error = demo.error
                say("waiting for the rest of the stream")
                run.wait(duration=FINISH_TIMEOUT_S)
            finally:
                sampler.stop.set()
                sampler.join(5)
                stages = run.status()
                run.stop()
            check = next((s for s in stages if s["name"] == "check"), {})
            demo.measure_failover(check)
            run.cleanup()
        failover = demo.failover or Failover(
            f"{app.name}/{STAGE}", KILLED, STANDBY, time.time(),
            error=f"{KILLED} was not killed: {demo.error or 'the demo stopped before'}",
        )  # fmt: skip
        result = DemoResult(demo.reports, dict(check.get("metrics", {})), expected,
                            sampler.samples, failover, cluster_id=cluster_id)  # fmt: skip
        if plot:
            result.plot = draw(result, plot)
        return result


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.0f} ms"


def table(result: DemoResult) -> Table:
    """Every migration and the failover, one row each."""
    out = Table(title="migrations and the node loss")
    for col in ("stage", "from → to", "how", "total", "downtime", "frozen (CRIU)", "MiB",
                "lost", "dup", "digest kept"):  # fmt: skip
        out.add_column(col, justify="right")
    for r in result.migrations:
        kept = r.state_digest_before == r.state_digest_after if r.state_digest_after else "-"
        how = r.strategy + (" ROLLED BACK" if r.rolled_back else "")
        out.add_row(r.stage, f"{r.source} → {r.destination}", how, _ms(r.total_time_s),
                    _ms(r.downtime_s), f"{r.frozen_time_s * 1000:.1f} ms",
                    f"{r.transferred_bytes / 2**20:.1f}", str(r.lost), str(r.duplicated),
                    str(kept))  # fmt: skip
    f = result.failover
    if f is not None:
        how = f"failover ({f.source} killed)" + (" FAILED" if f.error else "")
        # total: kill → running on the standby's node; downtime: the checker's input gap
        out.add_row(f.stage, f"{f.source} → {f.destination}", how, _ms(f.running_s),
                    _ms(f.gap_s), "-", "-", str(f.lost), str(f.duplicated), "-")  # fmt: skip
    return out


def failover_line(f: Failover) -> str:
    if f.error:
        return f"failover: {f.error}"
    return (f"failover: {f.source} killed; {f.destination}'s agent won the placement after "
            f"{_ms(f.takeover_s)} (the node's lease expired, then compare-and-swap), the "
            f"standby ran as the table after {_ms(f.running_s)}; the checker's input stopped "
            f"for {_ms(f.gap_s)}")  # fmt: skip


_PHASE_COLOURS = {
    "preflight": "#d9d9d9", "prepare": "#c7e9c0", "quiesce": "#fdd0a2", "transfer": "#fc9272",
    "restore": "#9ecae1", "reconnect": "#a1d99b", "verify": "#dadaeb", "cleanup": "#f0f0f0",
    "rollback": "#e31a1c",
}  # fmt: skip
_FAILOVER_COLOUR = "#cb181d"


def draw(result: DemoResult, path: str) -> str:
    """The checker's messages per second over time, each migration's phases and the
    failover shaded."""
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
    top = max(rates) if rates else 1.0
    fig, ax = plt.subplots(figsize=(12, 4.8))
    ax.plot(times, rates, color="#08519c", linewidth=1.2, label="checker: messages/s")
    seen: set[str] = set()
    for report in result.migrations:
        for phase, (start, end) in report.phase_times.items():
            label = phase if phase not in seen else None
            seen.add(phase)
            colour = _PHASE_COLOURS.get(phase, "#cccccc")
            ax.axvspan(start - t0, max(end - t0, start - t0 + 0.01), color=colour, alpha=0.6,
                       label=label)  # fmt: skip
        down = "-" if report.downtime_s is None else f"{report.downtime_s * 1000:.0f} ms"
        ax.text(report.started_at - t0, top * 1.02,
                f"{report.source}→{report.destination}\n{report.strategy}\n"
                f"down {down}", fontsize=8, va="bottom")  # fmt: skip
    f = result.failover
    if f is not None and f.error is None:
        end = f.gap[1] if f.gap else f.killed_at + (f.running_s or 0.0)
        ax.axvspan(f.killed_at - t0, max(end - t0, f.killed_at - t0 + 0.01), alpha=0.25,
                   color=_FAILOVER_COLOUR, label=f"{f.source} lost → failover")  # fmt: skip
        ax.axvline(f.killed_at - t0, color=_FAILOVER_COLOUR, linewidth=1)
        ax.text(f.killed_at - t0, top * 1.02,
                f"{f.source} killed\nstandby {f.destination}\ngap {_ms(f.gap_s)}",
                fontsize=8, va="bottom", color=_FAILOVER_COLOUR)  # fmt: skip
    ax.set_xlabel("seconds")
    ax.set_ylabel("messages per second at the checker")
    c = result.checker
    ax.set_title(
        f"dpmigrate demo — flow table migrated {len(result.migrations)} times under traffic, "
        f"then its node lost; received {c.get('received', 0):,}, lost {c.get('lost')}, "
        f"duplicated {c.get('duplicated')}"
    )
    ax.set_ylim(0, top * 1.4)
    # below the axes: inside, it would hide the rate where it matters (the gaps)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=8, ncol=10,
              frameon=False)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return str(Path(path).resolve())
