"""`dpmigrate drill`: chaos drills against a live local cluster under traffic (DESIGN.md §8).

:func:`run_drills` brings up one private 4-node cluster (its own state folder, so a cluster
the user has up is never touched), runs each named drill in turn on it — each with its own
run of the flows example — and tears it down at the end, also on failure or Ctrl-C. After
each drill it heals what the drill injected, lets the stream finish, checks the invariants
(:mod:`dpmigrate.drill.invariants`) and, if the drill left an agent dead, starts it again so
that the next drill finds a whole cluster (said in the failed drill's detail).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dpmigrate.drill import invariants
from dpmigrate.drill.faults import FaultError
from dpmigrate.drill.scenarios import DRILLS, NODES, Drill, DrillResult, Options, describe
from dpmigrate.errors import DpmigrateError
from dpmigrate.runtime.cluster import LocalCluster, private_state_dir
from dpmigrate.runtime.manifest import App

__all__ = ["DRILLS", "DrillResult", "Options", "describe", "run_drills"]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "flows"
#: After the drill, how long the rest of the stream may take beyond its nominal length.
FINISH_SLACK_S = 60.0
#: How long stray processes may take to go after a run is stopped and cleaned up.
CLEAN_TIMEOUT_S = 10.0
#: Where the checker's input starts losing messages under Options.drop_checker_input.
DROP_FROM = 1000

_DROPPING_CHECKER = '''

class DrillDroppingChecker(Checker):
    """Written by `dpmigrate drill` for its own test only: drops {n} message(s) of its input
    from index {start} on before the real checker sees them — a loss the drill must report."""

    def process(self, port, batch, emit):  # type: ignore[no-untyped-def]
        seen = self.state.get("drill_seen", 0)
        kept = [m for i, m in enumerate(batch, seen) if not {start} <= i < {start} + {n}]
        self.state["drill_seen"] = seen + len(batch)
        super().process(port, kept, emit)
'''


def write_app(folder: Path, total: int, rate: int, standby: str | None = None,
              drop: int = 0) -> App:  # fmt: skip
    """The flows example with ``total`` packets at ``rate``/s (the table's standby on
    ``standby``; ``drop``: the test hook that breaks exactly-once on purpose)."""
    folder.mkdir(parents=True, exist_ok=True)
    stages = (EXAMPLE / "stages.py").read_text()
    text = (EXAMPLE / "app.toml").read_text()
    text = text.replace("total = 20000", f"total = {total}, rate = {rate}")
    table = 'entry = "stages:FlowTable"\nnode = "node2"'
    if f"total = {total}" not in text or table not in text or "stages:Checker" not in text:
        raise DpmigrateError(f"{EXAMPLE / 'app.toml'} is not the flows example the drills know")
    if standby:
        text = text.replace(table, f'{table}\nstandby = "{standby}"')
    if drop:
        stages += _DROPPING_CHECKER.format(n=drop, start=DROP_FROM)
        text = text.replace("stages:Checker", "stages:DrillDroppingChecker")
    (folder / "stages.py").write_text(stages)
    (folder / "app.toml").write_text(text)
    return App.load(folder / "app.toml")


class _References:
    """The checker's digest of an uninterrupted in-process run, per stream length (cached:
    pacing changes when packets go out, never which, so the reference runs unpaced)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._digests: dict[int, str] = {}

    def digest(self, total: int) -> str:
        if total not in self._digests:
            from dpmigrate.runtime import inprocess

            app = write_app(self.folder / f"ref-{total}", total, 0)
            stages = inprocess.summary(inprocess.run(app))["stages"]
            self._digests[total] = next(s["metrics"]["digest"] for s in stages
                                        if s["name"] == "check")  # fmt: skip
        return self._digests[total]


def _downtime(check: dict[str, Any], since: float | None) -> float | None:
    """The checker's longest input gap that ended after the first fault."""
    if since is None:
        return None
    gaps = [b - a for a, b in check.get("input_gaps") or [] if b >= since]
    return round(max(gaps), 4) if gaps else 0.0


def _clean_after(cluster: LocalCluster, before: list[str]) -> list[str]:
    """What the drill left unclean (not already so before it), waiting briefly for strays."""
    deadline = time.monotonic() + CLEAN_TIMEOUT_S
    while True:
        left = [x for x in invariants.cluster_clean(cluster) if x not in before]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def _repair(cluster: LocalCluster) -> list[str]:
    """Start again every agent that is gone, so that the next drill has a whole cluster."""
    done = []
    for node in cluster.nodes:
        try:
            if cluster.restart_agent(node.name):
                done.append(f"restarted the agent of {node.name} after the drill")
        except DpmigrateError as err:
            done.append(f"could not restart the agent of {node.name}: {err}")
    return done


def run_one(name: str, cluster: LocalCluster, workdir: Path, options: Options,
            refs: _References) -> DrillResult:  # fmt: skip
    """One drill: inject, heal, finish the stream, check every invariant."""
    d = Drill(name, cluster, workdir, options, write_app, lambda d: _finish(d, refs))
    before = invariants.cluster_clean(cluster)
    t0 = time.monotonic()
    result = d.result
    try:
        DRILLS[name](d)
    except (DpmigrateError, FaultError, AssertionError, OSError) as err:
        d.fail(f"drill stopped: {type(err).__name__}: {err}")
    finally:
        d.faults.heal()
        result.failures += [f"heal failed: {f}" for f in d.faults.heal_failures]
        try:
            d.end_traffic()
        except DpmigrateError as err:
            d.fail(f"could not finish the run: {err}")
    if d.fault_at is None:
        d.fail("no fault was injected")
    repairs = _repair(cluster)
    result.failures += [f"left unclean: {x}" for x in _clean_after(cluster, before)]
    if repairs:
        result.failures += repairs
    result.time_s = round(time.monotonic() - t0, 2)
    result.passed = not result.failures
    result.detail = _detail(result)
    return result


def _finish(d: Drill, refs: _References) -> None:
    """Let the stream finish (bounded), then check the checker and the stages; stop and
    clean up the run whatever happened."""
    run, result = d.run, d.result
    assert run is not None
    stages: list[dict[str, Any]] = []
    try:
        run.wait(duration=d.total / 10_000 + FINISH_SLACK_S)
        stages = run.status()
        check = next((s for s in stages if s["name"] == "check"), {})
        metrics = dict(check.get("metrics", {}))
        result.checker = metrics
        result.lost, result.duplicated = metrics.get("lost"), metrics.get("duplicated")
        result.downtime_s = _downtime(check, d.fault_at)
        result.failures += invariants.checker(metrics, d.total, refs.digest(d.total))
        result.failures += invariants.stages_finished(stages, len(run.app.stages))
    except DpmigrateError as err:
        d.fail(f"could not read the run's end: {err}")
    finally:
        try:
            run.stop()
            run.cleanup()
        except DpmigrateError as err:
            d.fail(f"could not stop the run: {err}")


def _detail(r: DrillResult) -> str:
    if r.failures:
        return "; ".join(r.failures)[:1500]
    shown = [f"{k}={v}" for k, v in r.evidence.items() if k != "per_target"][:4]
    return ("; ".join(shown))[:400]


def run_drills(
    names: list[str], repeat: int = 1, options: Options | None = None,
    say: Callable[[str], None] = lambda m: None,
) -> list[DrillResult]:  # fmt: skip
    """Run ``names`` (``repeat`` times over) on one private local cluster; one result each."""
    unknown = [n for n in names if n not in DRILLS]
    if unknown:
        raise DpmigrateError(f"unknown drill(s) {', '.join(unknown)}; `dpmigrate drill --list`")
    options = options or Options()
    results: list[DrillResult] = []
    with private_state_dir("dpm-drill-", "s") as state:  # a private cluster
        refs = _References(state / "refs")
        say(f"bringing up a local cluster of {NODES} nodes")
        with LocalCluster(NODES) as cluster:
            for i in range(max(1, repeat)):
                for name in names:
                    say(f"drill {name}" + (f" (round {i + 1})" if repeat > 1 else ""))
                    result = run_one(name, cluster, state / "work" / f"{i}", options, refs)
                    say(f"drill {name}: {'PASS' if result.passed else 'FAIL'} {result.detail}")
                    results.append(result)
    return results
