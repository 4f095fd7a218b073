#!/usr/bin/env python3
"""Drain: how long emptying a node takes as the number of stages on it grows, per strategy.

    sudo .venv/bin/python benchmarks/drain.py                  # 2, 8, 20 stages x 3 strategies
    sudo .venv/bin/python benchmarks/drain.py --sizes 2,8 --strategies post-copy
    sudo .venv/bin/python benchmarks/drain.py --out /tmp/drain.json

Needs root (network namespaces) and CRIU. Prints the machine and the tables, writes
``benchmarks/results/drain.json`` (``--out`` elsewhere). Nothing is asserted: a sample whose
checker saw a loss or a duplicate, or whose drain did not finish, is reported as such.

The app (built here, in a temporary folder): a chain ``gen → table → r01 → ... → check``,
the flows example's generator, flow table and checker (``examples/flows/stages.py``) with
``N - 1`` relays between table and check (``benchmarks/apps/chain/relay.py``: each forwards
records unchanged and keeps per-source state). gen runs on node1, check on node3, and the
``N`` stages table, r01, ... all on node2 (their rings between them are shm); node4 is empty.
The generator is paced at ``RATE`` packets/s and endless. A fresh 4-node local cluster per
sample (size x strategy).

Per sample: once the checker took in ``WARMUP_MSGS``, node2 is drained
(:class:`dpmigrate.migrate.drain.Drain`, what ``dpmigrate drain node2 --strategy S`` runs):
cordoned, planned (sinks first, least loaded node: node4, node1, node3 in turn), one
migration at a time. Then the generator is stopped, the stream runs out and every stage
finishes; the checker must have received every packet the generator made, none lost, none
duplicated.

What is reported
    * ``drain_s``: the whole drain (cordon, survey, plan, every move); ``per_stage_s``:
      ``drain_s / N``; a least-squares line ``drain_s = a + b * N`` per strategy over the
      sizes run (``b`` is the cost of one more stage; linear growth means ``b`` stays put
      and ``per_stage_s`` falls toward it).
    * each move's ``downtime_s`` (as the engine measures it: the longest input gap the
      stage's downstream saw, never less than the time the stage slept) and ``total_s``.
    * ``lost`` / ``duplicated``: per move (the engine's, from the checker before and after)
      and at the end (the checker's own counts), ``received`` (the checker's, once it caught
      up) against ``generated`` (the generator's when the drain ended).

Cleanup: each cluster is ``with LocalCluster(...)`` (down on exit, also on failure or
Ctrl-C), its state folder ``clean``ed and removed; only processes of the benchmark's own
clusters are touched, by PID. Every wait has a deadline; each migration is bounded by the
engine's own timeouts.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dpmigrate.migrate import STRATEGIES, LocalCluster
from dpmigrate.migrate.drain import Drain, MoveResult
from dpmigrate.runtime.cluster import clean
from dpmigrate.runtime.manifest import App
from dpmigrate.runtime.multinode import MultiNodeRun

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "drain.json"
FLOWS = HERE.parent / "examples" / "flows" / "stages.py"
RELAY = HERE / "apps" / "chain" / "relay.py"
SIZES = (2, 8, 20)
RATE = 1000  # packets/s
WARMUP_MSGS = 2000  # at the checker before the drain starts
DRAINED = "node2"
START_TIMEOUT_S = 120.0
FINISH_TIMEOUT_S = 120.0
POLL_S = 0.1


class BenchError(Exception):
    """A sample failed; its row says why and the others still run."""


def _wait(check: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(POLL_S)


def chain_manifest(folder: Path, stages_on_node: int) -> Path:
    """The chain app with ``stages_on_node`` stages (table and relays) on node2."""
    shutil.copy(FLOWS, folder / "stages.py")
    shutil.copy(RELAY, folder / "relay.py")
    relays = [f"r{i:02d}" for i in range(1, stages_on_node)]
    chain = ["gen", "table", *relays, "check"]
    lines = [
        '[app]\nname = "chain"\n[defaults]\ncapacity = 1024\nbatch = 32\n',
        '[stages.gen]\nentry = "stages:Generator"\nnode = "node1"\n'
        f"config = {{ sources = 8, flows = 512, total = 0, rate = {RATE}, seed = 42 }}\n",
        f'[stages.table]\nentry = "stages:FlowTable"\nnode = "{DRAINED}"\n',
        *(f'[stages.{r}]\nentry = "relay:Relay"\nnode = "{DRAINED}"\n' for r in relays),
        '[stages.check]\nentry = "stages:Checker"\nnode = "node3"\n',
        *(f'[[rings]]\nfrom = "{a}.out"\nto = "{b}.in"\n' for a, b in itertools.pairwise(chain)),
    ]  # fmt: skip
    path = folder / "app.toml"
    path.write_text("\n".join(lines))
    return path


def _stage(run: MultiNodeRun, name: str) -> dict[str, Any]:
    return next((s for s in run.status() if s["name"] == name), {})


def sample(root: Path, size: int, strategy: str, say: Callable[[str], None]) -> dict[str, Any]:
    folder = root / f"app-{size}-{strategy}"
    folder.mkdir()
    app = App.load(chain_manifest(folder, size))
    state_dir = str(root / f"s{size}{strategy[:2]}")
    os.environ["DPMIGRATE_STATE_DIR"] = state_dir  # MultiNodeRun and the engine read it
    row: dict[str, Any] = {"stages": size, "strategy": strategy}
    try:
        with LocalCluster(4, state_dir=state_dir) as cluster:
            run = MultiNodeRun(app, cluster)
            try:
                run.start()
                _wait(lambda: _stage(run, "check").get("msgs_in", 0) >= WARMUP_MSGS,
                      f"{WARMUP_MSGS} messages at the checker", START_TIMEOUT_S)  # fmt: skip

                def done(outcome: MoveResult) -> None:
                    r = outcome.report
                    down = "-" if r is None or r.downtime_s is None else f"{r.downtime_s:.3f} s"
                    say(f"  {outcome.move.stage} → {outcome.move.destination}: {outcome.result}"
                        f", downtime {down}")  # fmt: skip

                result = Drain(cluster, DRAINED, strategy, on_done=done).run()
                # Every packet generated until the drain ended must reach the checker.
                generated = _stage(run, "gen")["metrics"]["generated"]
                _wait(lambda: _stage(run, "check")["metrics"]["received"] >= generated,
                      f"the checker to receive the {generated:,} packets generated during the "
                      "drain", FINISH_TIMEOUT_S)  # fmt: skip
                stages = {s["name"]: s for s in run.status()}
            finally:
                run.stop()
            run.cleanup()
    except BenchError as err:
        return {**row, "error": str(err)}
    finally:
        clean(state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)
    checker = stages["check"]["metrics"]
    moves = [{
        "stage": m.move.stage, "to": m.move.destination, "result": m.result,
        "downtime_s": m.report.downtime_s if m.report else None,
        "total_s": m.report.total_time_s if m.report else None,
        "lost": m.report.lost if m.report else None,
        "duplicated": m.report.duplicated if m.report else None, "error": m.error,
    } for m in result.moves]  # fmt: skip
    downtimes = [m["downtime_s"] for m in moves if m["downtime_s"] is not None]
    return {
        **row, "result": result.result, "drain_s": result.total_time_s,
        "per_stage_s": round(result.total_time_s / size, 4),
        "moved": sum(m["result"] == "moved" for m in moves),
        "downtime_median_s": round(statistics.median(downtimes), 4) if downtimes else None,
        "downtime_max_s": max(downtimes) if downtimes else None,
        "generated": generated, "received": checker["received"], "lost": checker["lost"],
        "duplicated": checker["duplicated"], "moves": moves,
        "not_on_node2": all(s["node"] != DRAINED for s in stages.values()),
    }  # fmt: skip


def linear_fit(points: list[tuple[int, float]]) -> dict[str, float] | None:
    """Least squares ``y = a + b x`` and r² (None with fewer than two sizes)."""
    if len({x for x, _ in points}) < 2:
        return None
    xs, ys = [x for x, _ in points], [y for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - a - b * x) ** 2 for x, y in points)
    return {"a_s": round(a, 3), "b_s_per_stage": round(b, 3),
            "r2": round(1 - ss_res / ss_tot, 4) if ss_tot else 1.0}  # fmt: skip


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "app": f"chain gen → table → relays → check, {RATE:,} packets/s endless; N stages on "
               f"{DRAINED}, gen on node1, check on node3, node4 empty; drain after "
               f"{WARMUP_MSGS:,} messages at the checker",
    }  # fmt: skip


def tables(rows: list[dict[str, Any]], fits: dict[str, Any]) -> list[Table]:
    main = Table(title="drain of node2")
    for col in ("stages", "strategy", "result", "drain", "per stage", "downtime med", "max",
                "received", "lost", "dup"):  # fmt: skip
        main.add_column(col, justify="right")
    for r in rows:
        if "error" in r:
            main.add_row(str(r["stages"]), r["strategy"], f"ERROR: {r['error']}", *[""] * 7)
            continue
        main.add_row(str(r["stages"]), r["strategy"], r["result"], f"{r['drain_s']:.2f} s",
                     f"{r['per_stage_s']:.2f} s", f"{(r['downtime_median_s'] or 0) * 1000:.0f} ms",
                     f"{(r['downtime_max_s'] or 0) * 1000:.0f} ms",
                     f"{r['received']:,}/{r['generated']:,}", str(r["lost"]),
                     str(r["duplicated"]))  # fmt: skip
    fit = Table(title="drain time = a + b * stages (least squares)")
    for col in ("strategy", "a", "b (per stage)", "r²"):
        fit.add_column(col, justify="right")
    for strategy, f in fits.items():
        if f is not None:
            fit.add_row(strategy, f"{f['a_s']:.2f} s", f"{f['b_s_per_stage']:.2f} s",
                        f"{f['r2']:.4f}")  # fmt: skip
    return [main, fit]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)),
                        help="stages on the drained node, comma-separated")  # fmt: skip
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    strategies = [s for s in args.strategies.split(",") if s]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        parser.error(f"unknown strategies {unknown}; choose from {list(STRATEGIES)}")
    if os.geteuid() != 0:
        print("benchmarks/drain.py needs root (network namespaces)", file=sys.stderr)
        return 2
    console = Console(stderr=True)
    info = machine_info()
    console.print(info)
    rows: list[dict[str, Any]] = []
    root = Path(tempfile.mkdtemp(prefix="dpm-bd-"))
    started = time.monotonic()
    try:
        for size in sizes:
            for strategy in strategies:
                console.print(f"[bold]{size} stages, {strategy}[/bold]")
                t0 = time.monotonic()
                row = sample(root, size, strategy, console.print)
                row["sample_wall_s"] = round(time.monotonic() - t0, 1)
                rows.append(row)
                console.print({k: v for k, v in row.items() if k != "moves"})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    fits = {s: linear_fit([(r["stages"], r["drain_s"]) for r in rows
                           if r["strategy"] == s and "drain_s" in r]) for s in strategies}  # fmt: skip
    data = {"machine": info, "wall_s": round(time.monotonic() - started, 1), "samples": rows,
            "fit": fits}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    out = Console(width=120)
    for table in tables(rows, fits):
        out.print(table)
    out.print(f"written: {args.out}")
    ok = all(r.get("result") == "drained" and r.get("lost") == 0 and r.get("duplicated") == 0
             and r.get("received", -1) >= r.get("generated", 0) for r in rows)  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
