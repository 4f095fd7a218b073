#!/usr/bin/env python3
"""Hot standby: what a node loss costs the stream, and what the standby costs before it.

    sudo .venv/bin/python benchmarks/failover.py            # 5 kills, 3+3 throughput runs, ~2.5 min
    sudo .venv/bin/python benchmarks/failover.py --quick    # 2 kills, 1+1 runs, ~1 min
    sudo .venv/bin/python benchmarks/failover.py --capacity 8192 --out /tmp/f.json  # bigger rings

Needs root (network namespaces). Prints the machine, the tables and the targets with met /
not met, and writes ``benchmarks/results/failover.json`` (``--out`` to write elsewhere).
Nothing is asserted: a target that is not met is reported as such.

Cases
    * ``kill``: the flows example (``examples/flows``), ``RATE`` packets/s paced, a finite
      stream of ``TOTAL`` packets; gen on node1, table on node2 with ``standby = "node4"``,
      check on node3; a fresh 4-node local cluster per sample. Once the standby is in sync
      and the table took in ``KILL_AFTER_MSGS``, node2 dies: its hub veth is cut, then its
      agent and its stages are SIGKILLed by PID (what tests/test_statesync_cluster.py does).
      The standby's agent sees node2's lease expire (``DPMIGRATE_NODE_TTL``, default 1 s),
      wins the placement's compare-and-swap and wakes the standby, which opens the rings at
      its point; upstream resends what follows, downstream drops what it already has.
    * ``throughput``: the same app with an unpaced, endless generator, once with the standby
      and once without, fresh clusters, interleaved (without, with, without, ...): the
      checker's received/s over ``MEASURE_S`` after ``WARMUP_S``. Every ring is tcp in both
      (gen, table and check are on three nodes), so the difference is the standby's.

What is measured
    * ``gap_s``: the checker's longest input gap (its status ``input_gaps``, pauses over 20 ms)
      ending after the kill: how long the stream stopped, as its consumer saw it.
    * ``detect_s``: kill to the placement naming node4 (polled every 10 ms from the store):
      lease expiry, the watch, the takeover's compare-and-swap. ``running_s``: kill to the
      table reported running on node4 by node4's agent. ``first_input_s``: kill to the end of
      the checker's gap (its first message from the new primary).
    * ``received`` / ``lost`` / ``duplicated`` / ``digest_ok``: the checker's at the end of
      the stream, against ``TOTAL`` and the digest of an uninterrupted in-process run of
      the same stream.
    * ``received_per_s``: the checker's received count over the measuring window, from its
      status (count and wall clock of the same status).

Targets (reported, not asserted)
    (1) ``failover_gap_s`` (median of the kills) ≤ 2 s with default settings;
    (2) lost = duplicated = 0 and the digest equal in every kill sample (and lost =
        duplicated = 0 in the throughput runs);
    (3) ``throughput_ratio_with_standby`` (median with / median without) ≥ 0.8.

Cleanup
    Each cluster is brought up with ``with LocalCluster(...)`` (down on exit: namespaces,
    agents, etcd) and its state folder is then ``clean``ed and removed; only the processes of
    the benchmark's own cluster are killed, by PID. Every wait has a deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dpmigrate import config
from dpmigrate.migrate import LocalCluster
from dpmigrate.runtime import inprocess
from dpmigrate.runtime.cluster import clean
from dpmigrate.runtime.manifest import App
from dpmigrate.runtime.multinode import MultiNodeRun

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "failover.json"
EXAMPLE = HERE.parent / "examples" / "flows"
RATE = 20000  # packets/s in the kill samples
TOTAL = 200_000  # packets per kill sample: ~10 s at RATE
KILL_AFTER_MSGS = 60_000  # into the table before the kill (~3 s of traffic)
PRIMARY, STANDBY = "node2", "node4"
IN_SYNC_TIMEOUT_S = 60.0
TAKEOVER_TIMEOUT_S = 30.0
FINISH_TIMEOUT_S = 120.0
FLOW_TIMEOUT_S = 60.0
WARMUP_S = 3.0  # throughput runs: before the window
MEASURE_S = 8.0  # throughput runs: the window
POLL_S = 0.01

TARGET_GAP_S = 2.0
TARGET_THROUGHPUT_RATIO = 0.8

DASH = "\u2013"


@dataclasses.dataclass(frozen=True)
class Plan:
    mode: str
    kills: int
    throughput_runs: int  # of each kind (with and without a standby)
    capacity: int = 0  # ring capacity ([defaults] capacity); 0: the example's (1024)


QUICK = Plan("quick", 2, 1)
FULL = Plan("full", 5, 3)


class BenchError(Exception):
    """A sample failed; its row says why and the others still run."""


def _wait(check: Callable[[], bool], what: str, timeout: float, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def write_app(folder: Path, total: int, rate: int, standby: bool, capacity: int = 0) -> Path:
    """The flows example with ``total`` packets (0: endless) at ``rate``/s (0: unpaced), its
    table on node2, with a standby on node4 if ``standby``, rings of ``capacity`` (0: the
    example's)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(EXAMPLE / "stages.py", folder / "stages.py")
    text = (EXAMPLE / "app.toml").read_text()
    table = 'entry = "stages:FlowTable"\nnode = "node2"'
    if "total = 20000" not in text or table not in text:
        raise BenchError(f"{EXAMPLE / 'app.toml'} no longer has total = 20000 and {table!r}")
    text = text.replace("total = 20000", f"total = {total}, rate = {rate}")
    if standby:
        text = text.replace(table, f'{table}\nstandby = "{STANDBY}"')
    if capacity:
        if "capacity = 1024" not in text:
            raise BenchError(f"{EXAMPLE / 'app.toml'} no longer has capacity = 1024")
        text = text.replace("capacity = 1024", f"capacity = {capacity}")
    (folder / "app.toml").write_text(text)
    return folder / "app.toml"


class Sample:
    """One fresh cluster with the app running on it; torn down on exit."""

    def __init__(self, root: Path, name: str, app: App) -> None:
        self.state_dir = str(root / name)
        self.app = app
        self._stack = contextlib.ExitStack()
        self.cluster: LocalCluster
        self.run: MultiNodeRun

    def __enter__(self) -> Sample:
        os.environ["DPMIGRATE_STATE_DIR"] = self.state_dir  # MultiNodeRun reads it via config
        self._stack.callback(shutil.rmtree, self.state_dir, ignore_errors=True)
        self._stack.callback(clean, self.state_dir)
        try:
            self.cluster = self._stack.enter_context(LocalCluster(4, state_dir=self.state_dir))
            self.run = MultiNodeRun(self.app, self.cluster)
            self._stack.callback(self.run.cleanup)
            self._stack.callback(self.run.stop)
            self.run.start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def stage(self, name: str) -> dict[str, Any]:
        return next((s for s in self.run.status() if s["name"] == name), {})

    def flowing(self, at_least: int) -> None:
        _wait(lambda: self.stage("table").get("msgs_in", 0) >= at_least,
              f"{at_least} messages into the table", FLOW_TIMEOUT_S)  # fmt: skip

    def standby_in_sync(self) -> bool:
        return any(s.get("node") == STANDBY and s.get("in_sync")
                   for s in self.stage("table").get("standbys", []))  # fmt: skip

    def placed_on(self) -> str | None:
        placed = self.cluster.store().placement(self.app.name, "table")
        return placed.node if placed else None

    def running_on(self, node: str) -> bool:
        with self.cluster.client(node, timeout=5) as agent:
            return any(s["name"] == "table" and s.get("role", "primary") == "primary"
                       and s.get("phase") == "running"
                       for s in agent.call("status")["stages"])  # fmt: skip

    def kill_node(self, name: str) -> list[int]:
        """Cut the node's link, then SIGKILL its agent and its stages (by PID, ours only)."""
        node = self.cluster.node(name)
        hub = f"dpm{self.cluster.id}-hub"
        veth = f"veth{name.removeprefix('node')}"
        pids = [s["pid"] for s in self.run.status() if s.get("node") == name and s.get("pid")]
        if not pids or node.agent_pid is None:
            raise BenchError(f"nothing to kill on {name}: {self.run.status()}")
        subprocess.run(["ip", "-n", hub, "link", "set", veth, "down"], check=True, timeout=10)
        for pid in [node.agent_pid, *pids]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shown = subprocess.run(["ip", "-n", hub, "-o", "link", "show", veth], check=True,
                               capture_output=True, text=True, timeout=10).stdout  # fmt: skip
        if "state DOWN" not in shown and "NO-CARRIER" not in shown:
            raise BenchError(f"{veth} is still up after the cut: {shown}")
        _wait(lambda: not any(_alive(p) for p in [node.agent_pid, *pids]),
              f"the processes of {name} to die", 10, poll=POLL_S)  # fmt: skip
        return [node.agent_pid, *pids]


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


# --------------------------------------------------------------------------- kill


def kill_sample(root: Path, index: int, app: App, expected: str) -> dict[str, Any]:
    with Sample(root, f"k{index}", app) as s:
        _wait(s.standby_in_sync, "the standby in sync", IN_SYNC_TIMEOUT_S, poll=0.1)
        s.flowing(KILL_AFTER_MSGS)
        killed_at, t0 = time.time(), time.monotonic()
        s.kill_node(PRIMARY)
        _wait(lambda: s.placed_on() == STANDBY, "the takeover", TAKEOVER_TIMEOUT_S, poll=POLL_S)
        detect = time.monotonic() - t0
        _wait(lambda: s.running_on(STANDBY), "the table running on node4", TAKEOVER_TIMEOUT_S,
              poll=POLL_S)  # fmt: skip
        running = time.monotonic() - t0
        if not s.run.wait(duration=FINISH_TIMEOUT_S):
            raise BenchError(f"the stream did not finish within {FINISH_TIMEOUT_S:.0f} s")
        check = s.stage("check")
    metrics = check.get("metrics", {})
    after = [(start, end) for start, end in check.get("input_gaps") or [] if end >= killed_at]
    start, end = max(after, key=lambda g: g[1] - g[0]) if after else (killed_at, killed_at)
    return {
        "gap_s": round(end - start, 4),
        "gap_started_after_kill_s": round(start - killed_at, 4),
        "detect_s": round(detect, 4),
        "running_s": round(running, 4),
        "first_input_s": round(end - killed_at, 4),
        "received": metrics.get("received"),
        "lost": metrics.get("lost"),
        "duplicated": metrics.get("duplicated"),
        "digest_ok": metrics.get("digest") == expected,
        "complete": metrics.get("received") == TOTAL,
    }


# --------------------------------------------------------------------------- throughput


def throughput_sample(root: Path, name: str, app: App, standby: bool) -> dict[str, Any]:
    with Sample(root, name, app) as s:
        s.flowing(1)
        if standby:
            _wait(s.standby_in_sync, "the standby in sync", IN_SYNC_TIMEOUT_S, poll=0.1)
        time.sleep(WARMUP_S)
        first = s.stage("check")
        time.sleep(MEASURE_S)
        last = s.stage("check")
        table = s.stage("table")
    n0, n1 = first["metrics"]["received"], last["metrics"]["received"]
    seconds = float(last["time"]) - float(first["time"])  # the checker's own status times
    if seconds <= 0:
        raise BenchError("the checker wrote no new status during the window")
    standbys = table.get("standbys", [])
    return {
        "standby": standby,
        "received_per_s": round((n1 - n0) / seconds, 1),
        "window_s": round(seconds, 3),
        "lost": last["metrics"]["lost"],
        "duplicated": last["metrics"]["duplicated"],
        "standby_in_sync_at_end": bool(standbys and standbys[0].get("in_sync")),
        "standby_lag_points": standbys[0].get("lag_points") if standbys else None,
    }


# --------------------------------------------------------------------------- reporting


def _stats(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"median": None, "min": None, "max": None}
    return {"median": round(statistics.median(xs), 4), "min": round(min(xs), 4),
            "max": round(max(xs), 4)}  # fmt: skip


def summarise(kills: list[dict[str, Any]], runs: list[dict[str, Any]]) -> dict[str, Any]:
    good = [k for k in kills if not k.get("error")]
    out: dict[str, Any] = {}
    for key in ("gap_s", "detect_s", "running_s", "first_input_s"):
        out[key] = _stats([float(k[key]) for k in good])
    out["failover_gap_s"] = out["gap_s"]["median"]
    with_sb = [r["received_per_s"] for r in runs if not r.get("error") and r["standby"]]
    without = [r["received_per_s"] for r in runs if not r.get("error") and not r["standby"]]
    out["throughput_with_standby_per_s"] = _stats(with_sb)
    out["throughput_without_standby_per_s"] = _stats(without)
    ratio = None
    if with_sb and without:
        ratio = round(statistics.median(with_sb) / statistics.median(without), 3)
    out["throughput_ratio_with_standby"] = ratio
    return out


def targets(plan: Plan, kills: list[dict[str, Any]], runs: list[dict[str, Any]],
            summary: dict[str, Any]) -> list[dict[str, Any]]:  # fmt: skip
    good = [k for k in kills if not k.get("error")]
    gap = summary["failover_gap_s"]
    bad = sum(int(k["lost"] or 0) + int(k["duplicated"] or 0) for k in good)
    bad += sum(int(r["lost"] or 0) + int(r["duplicated"] or 0) for r in runs if not r.get("error"))
    wrong = sum(1 for k in good if not (k["digest_ok"] and k["complete"]))
    failed = len(kills) - len(good) + sum(1 for r in runs if r.get("error"))
    ratio = summary["throughput_ratio_with_standby"]
    return [
        {"name": f"failover gap at the checker (median of {len(good)} kills)", "value": gap,
         "detail": "-" if gap is None else f"{gap:.3f} s",
         "required": f"<= {TARGET_GAP_S} s", "met": gap is not None and gap <= TARGET_GAP_S},
        {"name": "lost = duplicated = 0, every stream complete with the reference digest",
         "value": bad, "detail": f"{bad} lost+duplicated, {wrong} incomplete or wrong digest, "
         f"{failed} samples failed", "required": "0",
         "met": bad == 0 and wrong == 0 and failed == 0 and len(good) == plan.kills},
        {"name": "throughput with a standby / without (medians, checker received/s)",
         "value": ratio, "detail": "-" if ratio is None else
         f"{summary['throughput_with_standby_per_s']['median']:,.0f} vs "
         f"{summary['throughput_without_standby_per_s']['median']:,.0f} /s",
         "required": f">= {TARGET_THROUGHPUT_RATIO}",
         "met": ratio is not None and ratio >= TARGET_THROUGHPUT_RATIO},
    ]  # fmt: skip


def machine_info(plan: Plan) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError):
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "run": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "mode": plan.mode,
            "kills": plan.kills,
            "throughput_runs_each": plan.throughput_runs,
            "node_ttl_s": config.load().node_ttl,
            "ring_capacity": plan.capacity or "the example's (1024)",
            "kill": f"table on {PRIMARY}, standby on {STANDBY}, {RATE:,} packets/s, "
            f"{TOTAL:,} packets, node2 killed after {KILL_AFTER_MSGS:,} into the table",
            "throughput": f"unpaced endless generator, {WARMUP_S} s warm-up, {MEASURE_S} s "
            "window, checker received/s",
        },
    }


def render(report: dict[str, Any]) -> None:
    console = Console()
    if not console.is_terminal:
        console = Console(width=150)
    m = report["machine"]
    console.print(
        f"[bold]dpmigrate failover benchmark[/] ({m['run']['mode']}; range = min{DASH}max)\n"
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux "
        f"{m['kernel']}, {m['python']}; DPMIGRATE_NODE_TTL {m['run']['node_ttl_s']} s",
        highlight=False,
    )
    kills = Table(title=f"node loss: {PRIMARY} killed, standby on {STANDBY} takes over "
                  "(seconds after the kill)")  # fmt: skip
    for col in ("#", "gap at checker", "placement moved", "running on node4",
                "first input", "received", "lost", "dup", "digest"):  # fmt: skip
        kills.add_column(col, justify="right")
    for i, k in enumerate(report["kills"], 1):
        if k.get("error"):
            kills.add_row(str(i), f"[red]failed: {k['error']}[/]")
            continue
        kills.add_row(str(i), f"{k['gap_s']:.3f}", f"{k['detect_s']:.3f}",
                      f"{k['running_s']:.3f}", f"{k['first_input_s']:.3f}",
                      f"{k['received']:,}", str(k["lost"]), str(k["duplicated"]),
                      "equal" if k["digest_ok"] else "[red]DIFFERS[/]")  # fmt: skip
    console.print(kills)
    s = report["summary"]
    console.print(
        "medians: gap {gap_s[median]} s ({gap_s[min]}{d}{gap_s[max]}), placement moved "
        "{detect_s[median]} s, running {running_s[median]} s, first input "
        "{first_input_s[median]} s".format(d=DASH, **s),
        highlight=False,
    )
    tp = Table(title="throughput, unpaced generator (checker received/s)")
    for col in ("#", "standby", "received/s", "lost", "dup", "standby in sync", "lag (points)"):
        tp.add_column(col, justify="right")
    for i, r in enumerate(report["throughput"], 1):
        if r.get("error"):
            tp.add_row(str(i), "", f"[red]failed: {r['error']}[/]")
            continue
        tp.add_row(str(i), "yes" if r["standby"] else "no", f"{r['received_per_s']:,.0f}",
                   str(r["lost"]), str(r["duplicated"]),
                   str(r["standby_in_sync_at_end"]) if r["standby"] else "",
                   str(r["standby_lag_points"]) if r["standby"] else "")  # fmt: skip
    console.print(tp)
    tgt = Table(title="targets (same run)")
    for col in ("target", "value", "detail", "required", "met"):
        tgt.add_column(col)
    for t in report["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:g}"
        met = "[green]met[/]" if t["met"] else "[red]not met[/]"
        tgt.add_row(t["name"], value, t["detail"], t["required"], met)
    console.print(tgt)


# --------------------------------------------------------------------------- main


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through every with: clusters down, folders removed


def _attempt(what: str, step: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        sample = step()
    except Exception as err:  # the sample fails; the others still run
        sample = {"error": f"{type(err).__name__}: {err}"}
    text = sample.get("error") or ", ".join(
        f"{k} {v}" for k, v in sample.items() if k in ("gap_s", "detect_s", "running_s",
                                                       "received_per_s", "lost", "duplicated")
    )  # fmt: skip
    print(f"  {what}: {text} ({time.monotonic() - t0:.1f} s)", file=sys.stderr, flush=True)
    return sample


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 kills, 1+1 throughput runs")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON file ({RESULTS})")
    parser.add_argument("--capacity", type=int, default=0, metavar="N",
                        help="ring capacity (default: the example's, 1024)")  # fmt: skip
    args = parser.parse_args(argv)
    plan = dataclasses.replace(QUICK if args.quick else FULL, capacity=max(0, args.capacity))
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.pop("DPMIGRATE_TOKEN", None)  # each cluster makes its own
    started = time.monotonic()
    load_before = [round(x, 2) for x in os.getloadavg()]
    root = Path(tempfile.mkdtemp(prefix="dpmfo-"))  # short: agents' unix sockets live here
    try:
        kill_app = App.load(write_app(root / "app-kill", TOTAL, RATE, True, plan.capacity))
        print("  reference digest (the same stream in-process, unpaced)", file=sys.stderr,
              flush=True)  # fmt: skip
        reference = App.load(write_app(root / "app-ref", TOTAL, 0, standby=False))
        ref = inprocess.summary(inprocess.run(reference))["stages"]
        expected = next(s["metrics"]["digest"] for s in ref if s["name"] == "check")
        kills = [
            _attempt(f"kill #{i + 1}", lambda i=i: kill_sample(root, i, kill_app, expected))
            for i in range(plan.kills)
        ]
        apps = {sb: App.load(write_app(root / f"app-tp-{sb}", 0, 0, sb, plan.capacity))
                for sb in (False, True)}  # fmt: skip
        runs = []
        for i in range(plan.throughput_runs):
            for sb in (False, True):
                name = f"t{i}{'s' if sb else 'n'}"
                runs.append({"standby": sb, **_attempt(
                    f"throughput #{i + 1} {'with' if sb else 'without'} standby",
                    lambda name=name, sb=sb: throughput_sample(root, name, apps[sb], sb))})  # fmt: skip
        summary = summarise(kills, runs)
        report = {
            "machine": machine_info(plan),
            "failover_gap_s": summary["failover_gap_s"],
            "throughput_ratio_with_standby": summary["throughput_ratio_with_standby"],
            "summary": summary,
            "kills": kills,
            "throughput": runs,
            "targets": targets(plan, kills, runs, summary),
        }
        report["machine"]["run"]["seconds"] = round(time.monotonic() - started, 1)
        report["machine"]["run"]["loadavg_before"] = load_before
        report["machine"]["run"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    except KeyboardInterrupt:
        print("interrupted: clusters down, folders removed", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(root, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp_out, args.out)
    render(report)
    print(f"wrote {args.out} in {report['machine']['run']['seconds']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
