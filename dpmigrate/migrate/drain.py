"""Drain a node: cordon it, then move every stage off it, one at a time, with the engine.

Two parts, kept apart so that the decision can be tested without a cluster:

* :func:`plan_drain` — pure: from what the cluster looks like (:class:`NodeView`,
  :class:`StageView`) it decides every move before anything moves, or refuses
  (:class:`~dpmigrate.errors.PlacementRefused`) naming each stage that has nowhere to go and,
  for each node, why not. A drain that cannot finish is better refused than half done: a
  half-drained node is still needed, and its operator finds out only at the end.
* :class:`Drain` — the side effects: it cordons the node (so that no failover or other
  placement chooses it meanwhile), surveys the cluster, plans, and runs one
  :class:`~dpmigrate.migrate.engine.Migration` per stage. A stage whose migration fails is
  rolled back by the engine and stays where it was; the rest go on. A refused plan leaves
  the node's cordon as it was before the drain: nothing changed.

**Order: sinks first** (by distance to the app's sinks, nearest first). A migration freezes
one stage; its inputs' windows fill meanwhile and, once it wakes, it releases a burst of
backlog downstream. Moving the downstream stages first means that burst always flows into
stages that already run at their final place — never into one that is about to be frozen
itself, which would stack a second stall onto the first and let backpressure reach the
source twice for one freeze. It also keeps upstream running during each move, so that the
engine's ``verify`` (messages reach the restored stage) is answered at once.

**Destination**: among the other nodes, one that is alive (its agent answers and it holds
its lease), not cordoned, runs no replica of that stage (a standby or a statesync target:
the engine refuses a stage onto its own standby), has room in its folder for what the
strategy writes there, has the CPUs the stage's ``resources.cpus`` names, and memory
available for its ``resources.memory`` limit (counting the limits of the moves already
planned onto it). Of those, the least loaded by stage count, the moves already planned
included, so that a node holding many stages spreads them out; ties go to the node name
that sorts first, so the plan is reproducible.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import Any

from dpmigrate.cluster import cordon
from dpmigrate.errors import DpmigrateError, PlacementRefused
from dpmigrate.migrate.engine import FLOW_TIMEOUT_S, Migration
from dpmigrate.migrate.report import MigrationReport
from dpmigrate.migrate.strategies import STRATEGIES
from dpmigrate.runtime.cluster import LocalCluster
from dpmigrate.runtime.manifest import App

#: Seconds an agent may take to answer the survey's status call before its node counts dead.
SURVEY_TIMEOUT_S = 5.0


@dataclasses.dataclass(frozen=True)
class NodeView:
    """One node as the plan sees it. ``None`` facts are unknown and not checked."""

    name: str
    alive: bool
    cordoned: bool
    stages: int  # primaries it runs now
    free_bytes: int | None = None  # free space in its folder (where images go)
    cpus: frozenset[int] | None = None  # CPUs its stages may run on
    mem_available_bytes: int | None = None


@dataclasses.dataclass(frozen=True)
class StageView:
    """One stage on the node to drain."""

    app: str
    name: str
    #: longest path, in rings, from the stage to a sink of its app (a sink is 0)
    sink_distance: int = 0
    #: nodes that run a replica of it (hot standby, statesync target)
    replica_nodes: tuple[str, ...] = ()
    memory_bytes: int = 0  # its resident memory now
    cpus: str | None = None  # its resources.cpus, e.g. "0-1"
    memory_limit: int | None = None  # its resources.memory, bytes

    @property
    def key(self) -> str:
        return f"{self.app}/{self.name}"


@dataclasses.dataclass(frozen=True)
class Move:
    stage: str  # APP/STAGE
    source: str
    destination: str
    strategy: str
    why: str  # why this destination, for the plan's reader

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class DrainPlan:
    node: str
    strategy: str
    moves: tuple[Move, ...]
    #: what the drain leaves on the node and why (replicas of other nodes' stages)
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"node": self.node, "strategy": self.strategy,
                "moves": [m.as_dict() for m in self.moves], "notes": list(self.notes)}  # fmt: skip


def drain_order(stages: Iterable[StageView]) -> list[StageView]:
    """Sinks first (see the module docstring), then by app and stage name."""
    return sorted(stages, key=lambda s: (s.sink_distance, s.app, s.name))


def sink_distances(app: App) -> dict[str, int]:
    """Each stage's longest distance, in rings, to a sink of ``app`` (its stages are in
    topological order, sources first, so one pass from the end is enough)."""
    downstream: dict[str, list[str]] = {s.name: [] for s in app.stages}
    for ring in app.rings:
        downstream[ring.src_stage].append(ring.dst_stage)
    distance: dict[str, int] = {}
    for spec in reversed(app.stages):
        distance[spec.name] = max((distance[d] + 1 for d in downstream[spec.name]), default=0)
    return distance


def plan_drain(
    node: str,
    stages: Iterable[StageView],
    nodes: Iterable[NodeView],
    strategy: str = "stop-and-copy",
    space_needed: Callable[[int], int] | None = None,
) -> DrainPlan:
    """Every move of the drain of ``node``, in the order they will run; PlacementRefused
    (nothing decided, nothing to undo) when some stage has nowhere to go, naming each such
    stage and every node's reason. ``space_needed(memory_bytes)``: what the strategy needs
    free on the destination (default: the strategy's own rule)."""
    _check_strategy(strategy)
    needed = space_needed or (lambda memory: _strategy_space(strategy, memory))
    others = sorted((n for n in nodes if n.name != node), key=lambda n: n.name)
    load = {n.name: n.stages for n in others}
    limits_planned = {n.name: 0 for n in others}  # memory limits of the moves planned there
    moves: list[Move] = []
    refusals: list[str] = []
    for stage in drain_order(stages):
        fits, reasons = [], []
        for candidate in others:
            why_not = _why_not(candidate, stage, needed, limits_planned[candidate.name])
            if why_not is None:
                fits.append(candidate)
            else:
                reasons.append(why_not)
        if not fits:
            why = "; ".join(reasons) or "the cluster has no other node"
            refusals.append(f"stage {stage.key} has nowhere to go ({why})")
            continue
        best = min(fits, key=lambda n: (load[n.name], n.name))
        why = f"least loaded: {best.name} runs {load[best.name]} stage(s)"
        moves.append(Move(stage.key, node, best.name, strategy, why))
        load[best.name] += 1
        limits_planned[best.name] += stage.memory_limit or 0
    if refusals:
        raise PlacementRefused(
            f"drain of {node} refused, nothing was moved: "
            + "; ".join(refusals)
            + ". Uncordon or add a node, free space, or stop the stage, then drain again"
        )
    return DrainPlan(node, strategy, tuple(moves))


def _why_not(
    node: NodeView, stage: StageView, needed: Callable[[int], int], limits_planned: int
) -> str | None:
    """Why ``stage`` cannot go to ``node`` (None: it can)."""
    if not node.alive:
        return f"{node.name} is not alive"
    if node.cordoned:
        return f"{node.name} is cordoned"
    if node.name in stage.replica_nodes:
        return f"{node.name} runs its standby"
    want = needed(stage.memory_bytes)
    if node.free_bytes is not None and node.free_bytes < want:
        return f"{node.name} has {node.free_bytes >> 20} MiB free, it needs {want >> 20} MiB"
    if stage.cpus and node.cpus is not None:
        missing = _cpu_set(stage.cpus) - node.cpus
        if missing:
            return f"{node.name} lacks CPU(s) {sorted(missing)} of its resources.cpus"
    if stage.memory_limit and node.mem_available_bytes is not None:
        free = node.mem_available_bytes - limits_planned
        if free < stage.memory_limit:
            return (f"{node.name} has {max(free, 0) >> 20} MiB memory available, its "
                    f"resources.memory is {stage.memory_limit >> 20} MiB")  # fmt: skip
    return None


def _cpu_set(text: str) -> frozenset[int]:
    """``"0-1,3"`` as {0, 1, 3} (the manifest validated the syntax)."""
    cpus: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return frozenset(cpus)


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise DpmigrateError(
            f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}"
        )


def _strategy_space(strategy: str, memory: int) -> int:
    """The strategy's own rule for the free space a destination needs."""
    return STRATEGIES[strategy].space_needed(memory)


# -- running it ---------------------------------------------------------------------------


@dataclasses.dataclass
class MoveResult:
    move: Move
    #: "moved", "rolled back" (it stays, everything undone), "NOT UNDONE" (the rollback left
    #: something: the rest of the drain is skipped), "gone" (it no longer ran: nothing to
    #: move), "skipped" (not tried: interrupted, or after a move that was not undone)
    result: str
    report: MigrationReport | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"move": self.move.as_dict(), "result": self.result, "error": self.error,
                "report": self.report.as_dict() if self.report else None}  # fmt: skip


@dataclasses.dataclass
class DrainResult:
    node: str
    strategy: str
    #: "drained" (every stage left), "partial" (some stayed), "refused" (nothing moved)
    result: str
    plan: DrainPlan | None
    moves: list[MoveResult]
    was_cordoned: bool
    cordoned: bool
    total_time_s: float = 0.0
    error: str | None = None

    @property
    def exit_status(self) -> int:
        """0: every stage left; 1: some stayed (each rolled back, or not tried); 2: refused
        before anything moved."""
        return {"drained": 0, "partial": 1}.get(self.result, 2)

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.node, "strategy": self.strategy, "result": self.result,
            "exit_status": self.exit_status, "error": self.error,
            "cordoned": self.cordoned, "was_cordoned": self.was_cordoned,
            "total_time_s": self.total_time_s,
            "plan": self.plan.as_dict() if self.plan else None,
            "moves": [m.as_dict() for m in self.moves],
        }  # fmt: skip


class Drain:
    """``Drain(cluster, node, strategy).run()``: the drain of one node (see the module).

    ``on_plan(plan)`` is called once the plan is made, before the first move; ``on_move(move)``
    as each move starts, returning that move's ``on_phase`` callback (for a progress line);
    ``on_done(result)`` as each ends."""

    def __init__(
        self,
        cluster: LocalCluster,
        node: str,
        strategy: str = "stop-and-copy",
        on_move: Callable[[Move], Callable[[str], None]] | None = None,
        on_done: Callable[[MoveResult], None] | None = None,
        flow_timeout: float = FLOW_TIMEOUT_S,
        on_plan: Callable[[DrainPlan], None] | None = None,
    ) -> None:
        _check_strategy(strategy)
        cluster.node(node)  # one clear error for an unknown node
        self.cluster = cluster
        self.node = node
        self.strategy = strategy
        self.on_move = on_move or (lambda move: lambda phase: None)
        self.on_done = on_done or (lambda result: None)
        self.on_plan = on_plan or (lambda plan: None)
        self.flow_timeout = flow_timeout

    def survey(self) -> tuple[list[StageView], list[NodeView], tuple[str, ...]]:
        """The node's stages, every node's view, and notes on replicas left on the node."""
        store = self.cluster.store()
        members, _ = store.get_prefix("nodes/")
        fenced = set(cordon.cordoned(store))
        reports: dict[str, dict[str, Any] | None] = {}
        for n in self.cluster.nodes:
            try:
                with self.cluster.client(n.name, timeout=SURVEY_TIMEOUT_S) as agent:
                    reports[n.name] = agent.call("status")
            except DpmigrateError:
                reports[n.name] = None
        if reports.get(self.node) is None:
            raise PlacementRefused(
                f"drain of {self.node} refused, nothing was moved: its agent does not answer, "
                "so its stages cannot be moved live; a stage with a hot standby fails over "
                "by itself, others can be restored from a checkpoint (`dpmigrate restore`)"
            )
        replicas: dict[str, set[str]] = {}
        counts: dict[str, int] = {}
        for name, report in reports.items():
            for info in (report or {}).get("stages", []):
                key = f"{info.get('app')}/{info.get('name')}"
                if info.get("finished") or info.get("moved") or info.get("fenced"):
                    continue
                if info.get("role", "primary") != "primary":
                    replicas.setdefault(key, set()).add(name)
                else:
                    counts[name] = counts.get(name, 0) + 1
        stages, notes, distances = [], [], {}
        own = reports[self.node] or {}
        for info in own.get("stages", []):
            key = f"{info.get('app')}/{info.get('name')}"
            if info.get("finished") or info.get("moved") or info.get("fenced"):
                continue
            if info.get("role", "primary") != "primary":
                notes.append(
                    f"a {info.get('role')} of {key} stays on {self.node}: on a cordoned node it "
                    f"does not take over; `dpmigrate standby {key} --off {self.node}` and "
                    "`--on NODE` to move it"
                )
                continue
            manifest = str(info.get("manifest", ""))
            if manifest not in distances:
                distances[manifest] = sink_distances(App.load(manifest))
            limits = (info.get("resources") or {}).get("limits") or {}
            stages.append(StageView(
                app=str(info["app"]), name=str(info["name"]),
                sink_distance=distances[manifest].get(str(info["name"]), 0),
                replica_nodes=tuple(sorted(replicas.get(key, set()))),
                memory_bytes=int(info.get("rss_bytes") or 0),
                cpus=limits.get("cpus"), memory_limit=limits.get("memory"),
            ))  # fmt: skip
        nodes = []
        for n in self.cluster.nodes:
            alive = reports.get(n.name) is not None and f"nodes/{n.name}" in members
            facts: dict[str, Any] = {}
            if alive and n.name != self.node and n.name not in fenced:
                try:
                    with self.cluster.client(n.name, timeout=60) as agent:
                        facts = agent.call("facts")
                except DpmigrateError:
                    alive = False
            cpus = facts.get("cpus")
            nodes.append(NodeView(
                name=n.name, alive=alive, cordoned=n.name in fenced, stages=counts.get(n.name, 0),
                free_bytes=facts.get("free_bytes"),
                cpus=frozenset(cpus) if isinstance(cpus, list) else None,
                mem_available_bytes=facts.get("mem_available_bytes"),
            ))  # fmt: skip
        return stages, nodes, tuple(notes)

    def run(self) -> DrainResult:
        """Cordon, plan, move. Raises nothing for a refused plan: the result says
        ``refused`` (exit status 2) with the reason, and the cordon is as it was."""
        t0 = time.monotonic()
        store = self.cluster.store()
        was = cordon.is_cordoned(store, self.node)
        cordon.cordon(store, self.node, reason="drain")
        try:
            stages, nodes, notes = self.survey()
            plan = plan_drain(self.node, stages, nodes, self.strategy)
        except PlacementRefused as err:
            if not was:
                cordon.uncordon(store, self.node)
            return DrainResult(self.node, self.strategy, "refused", None, [], was, was,
                               round(time.monotonic() - t0, 4), str(err))  # fmt: skip
        plan = dataclasses.replace(plan, notes=notes)
        self.on_plan(plan)
        results: list[MoveResult] = []
        stop: str | None = None
        for move in plan.moves:
            if stop is not None:
                outcome = MoveResult(move, "skipped", error=stop)
            else:
                outcome = self._move(move)
                if outcome.result == "NOT UNDONE":
                    stop = f"not tried: the move of {move.stage} could not be undone"
                elif outcome.report is not None and "interrupted by" in (outcome.error or ""):
                    stop = "not tried: the drain was interrupted"
            results.append(outcome)
            self.on_done(outcome)
        stayed = [r for r in results if r.result not in ("moved", "gone")]
        return DrainResult(self.node, self.strategy, "partial" if stayed else "drained", plan,
                           results, was, True, round(time.monotonic() - t0, 4))  # fmt: skip

    def _move(self, move: Move) -> MoveResult:
        on_phase = self.on_move(move)
        try:
            migration = Migration(self.cluster, move.stage, move.destination, move.strategy,
                                  on_phase=on_phase, flow_timeout=self.flow_timeout)  # fmt: skip
        except DpmigrateError as err:  # it no longer runs (its stream ended): nothing to move
            return MoveResult(move, "gone", error=str(err))
        if migration.source != move.source:
            return MoveResult(move, "gone", error=f"it runs on {migration.source} now")
        report = migration.run()
        if not report.rolled_back:
            return MoveResult(move, "moved", report)
        result = "NOT UNDONE" if report.rollback_failures else "rolled back"
        return MoveResult(move, result, report, report.error)
