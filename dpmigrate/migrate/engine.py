"""The migration engine: one stage to another node, phase by phase, with an undo log
(DESIGN.md §6). What differs between ways of moving a stage is a strategy
(:mod:`dpmigrate.migrate.strategies`); everything else is here, once.

Phases, each timed and named in the report and the logs:

1. ``preflight`` — the stage runs on its source node and is healthy; the destination is
   another live node; its CRIU is not older than the source's, it has every CPU flag the
   source has, lazy pages when the strategy needs them, and room for what the strategy writes
   there (from the stage's memory); the cluster store answers and places the stage on the source.
2. ``prepare`` — only for a strategy that works while the source runs (state sync).
3. ``quiesce`` — the stage, and every peer whose ring to it changes transport (shm between
   stages on one node, tcp between nodes), stop at a batch boundary with everything
   acknowledged and their rings detached. Peers go first in pipeline order, so that each
   drain still has a running consumer.
4. ``transfer`` — the strategy's cutover: CRIU dumps the stage, leaving the source asleep; the
   source's agent seals the rest (images, state, context) as one checksummed bundle in its own
   folder of the migration and the destination's agent pulls and verifies it before CRIU sees
   anything (:mod:`dpmigrate.migrate.stage_transfer`). The engine names the migration
   (:attr:`Migration.id`); it creates no folder.
5. ``restore`` — the destination's agent writes the stage's journal from the shipped state,
   restores it (not yet woken) and adopts it.
6. ``reconnect`` — the placement in etcd names the destination (compare-and-swap, epoch + 1);
   every quiesced stage wakes at once and reopens its rings by name through its local agent.
7. ``verify`` — the restored stage runs, its state as it woke equals the frozen one, and
   (unless the stream is over) messages flow through it again.

**Point of no return**: after ``verify``. Until then any failure — an error, an agent gone, a
full disk, SIGINT or SIGTERM — runs the undo log newest first: each step is logged and its
outcome reported (``rollback_steps``), one that fails does not stop the next, and the rollback
ends by checking that every stage of the app runs again; whatever could not be undone or does
not run is in ``rollback_failures``, with why. After the point of no return, ``cleanup`` lets
the strategy finish, ends the sleeping source and has each agent remove its own folder of the
migration (a failure there is a ``warning``: the stage runs on the destination either way).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from dpmigrate.cluster import cordon
from dpmigrate.cluster.store import Placement
from dpmigrate.errors import AgentUnreachable, DpmigrateError, MigrationError
from dpmigrate.migrate.report import MigrationReport
from dpmigrate.migrate.strategies import STRATEGIES, Strategy
from dpmigrate.migrate.undo import UndoLog
from dpmigrate.runtime.cluster import LocalCluster
from dpmigrate.runtime.manifest import App
from dpmigrate.runtime.stagehost import STATUS_INTERVAL_S, peers_changing_transport

log = logging.getLogger("dpmigrate.migrate")

PHASES = ("preflight", "prepare", "quiesce", "transfer", "restore", "reconnect", "verify",
          "cleanup")  # fmt: skip
#: How long verification waits to see messages flow through the restored stage.
FLOW_TIMEOUT_S = 15.0
#: How long a woken stage may take to reopen its rings before the migration gives up on it.
WAKE_TIMEOUT_S = 10.0
#: Bound on the wait for the downstream's first status written after the migration.
_FRESH_STATUS_TIMEOUT_S = 2.0


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived during a migration. A BaseException, so that no step's
    ``except DpmigrateError`` can swallow it: only the engine catches it, and rolls back."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


@dataclasses.dataclass
class _Placed:
    app: str
    stage: str
    node: str


class Migration:
    """One migration; ``run()`` returns its report (it never raises for a failure: the report
    says ``rolled_back``, ``error`` and what could not be undone)."""

    def __init__(
        self,
        cluster: LocalCluster,
        stage: str,
        destination: str,
        strategy: str = "stop-and-copy",
        on_phase: Callable[[str], None] | None = None,
        flow_timeout: float = FLOW_TIMEOUT_S,
        on_step: Callable[[str], None] | None = None,
    ) -> None:
        """``on_phase(name)`` is called as each phase starts; ``on_step(name)`` inside a phase,
        between its steps: ``dumped`` (transfer: the source has sealed its outgoing folder,
        :attr:`source_bundle`; the destination has not pulled it yet). Both are for tests
        that inject faults and for progress display."""
        kind = STRATEGIES.get(strategy)
        if kind is None:
            raise DpmigrateError(
                f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}"
            )
        self.cluster = cluster
        self.destination = destination
        self.on_phase = on_phase or (lambda name: None)
        self.on_step = on_step or (lambda name: None)
        self.flow_timeout = flow_timeout
        #: This migration's name: each agent keeps its files under ``migrations/<id>``.
        self.id = "m" + secrets.token_hex(6)
        node, app, name = cluster.find_stage(stage)
        self.app_name, self.stage, self.source = app, name, node
        self.report = MigrationReport(strategy, f"{app}/{name}", node, destination)
        self.undo = UndoLog(f"{app}/{name} ({self.id})")
        self.strategy: Strategy = kind(self)
        #: The source's sealed folder and the destination's received one, as each agent
        #: names them in its own view (set once they exist).
        self.source_bundle: str | None = None
        self.destination_bundle: str | None = None
        self.page_size = 4096  # the destination's, from its facts
        self.placement_changed_at: float | None = None  # wall clock of the compare-and-swap
        self._placed: Placement | None = None  # the stage's placement as we changed it last
        self._quiesced: list[_Placed] = []  # in the order they were quiesced
        self._woken: set[str] = set()  # stages woken under the new placement
        self._woken_version: int | None = None
        self._with_files: list[str] = []  # nodes that may hold a folder of this migration
        self._downstream: set[str] = set()
        self._watchers_had_input = False
        self._asleep_from: float | None = None  # the stage's quiesced answer (wall clock)
        self._asleep_until: float | None = None  # the start of its wake
        self._healing = False  # rolling back: an agent found gone is started again
        self._heal_lock = threading.Lock()
        self._healed: set[str] = set()

    # -- what strategies use ------------------------------------------------------------
    @property
    def stage_ref(self) -> dict[str, str]:
        return {"app": self.app_name, "stage": self.stage}

    @property
    def me(self) -> dict[str, str]:
        """The arguments that name this stage's migration in the agents' operations."""
        return {**self.stage_ref, "migration": self.id}

    def call(self, node: str, op: str, **args: Any) -> Any:
        try:
            with self.cluster.client(node, timeout=300) as agent:
                return agent.call(op, **args)
        except AgentUnreachable:
            if not self._healing:
                raise
        # Rolling back and the node's agent is gone (killed mid-migration): start it again;
        # it takes over the stages its predecessor left running, asleep ones included.
        with self._heal_lock:
            if node not in self._healed and self.cluster.restart_agent(node):
                self._healed.add(node)
                log.warning("migration %s: the agent of %s was gone; restarted it",
                            self.report.stage, node)  # fmt: skip
                self.report.rollback_steps.append(f"ok: restarted the agent of {node}")
        with self.cluster.client(node, timeout=300) as agent:
            return agent.call(op, **args)

    def _instance_on(self, node: str, primary: bool) -> dict[str, Any] | None:
        """The stage itself (``primary``) or a replica of it, as ``node``'s agent reports it."""
        for info in self.call(node, "status")["stages"]:
            mine = (info.get("app"), info.get("name")) == (self.app_name, self.stage)
            if mine and (info.get("role", "primary") == "primary") == primary:
                return info
        return None

    def source_info(self) -> dict[str, Any]:
        """The stage as the source's agent reports it now."""
        info = self._instance_on(self.source, primary=True)
        if info is None:
            raise MigrationError(f"stage {self.report.stage} no longer runs on {self.source}")
        return info

    def replica_on_destination(self) -> dict[str, Any] | None:
        """The stage's replica on the destination (a statesync target), as its agent says."""
        return self._instance_on(self.destination, primary=False)

    def holds_files(self, node: str) -> None:
        """``node``'s agent may now hold a folder of this migration (removed at the end)."""
        if node not in self._with_files:
            self._with_files.append(node)

    def pull(self) -> int:
        """The destination's agent pulls the source's sealed folder from the source's agent
        and verifies it; the bytes it copied."""
        self.on_step("dumped")
        self.holds_files(self.destination)
        source = self.cluster.node(self.source).agent_address
        pulled = self.call(self.destination, "pull_migration", **self.me, source=source)
        self.destination_bundle = pulled["bundle"]
        return int(pulled["copied_bytes"])

    # -- the migration ------------------------------------------------------------------
    def run(self) -> MigrationReport:
        report = self.report
        report.started_at = time.time()
        t0 = time.monotonic()
        before = self._checker()
        phase = "preflight"
        app: App | None = None
        with self._signals_interrupt():
            try:
                with self._phase("preflight"):
                    stages, app = self._preflight()
                if self.strategy.prepares:
                    phase = "prepare"
                    with self._phase("prepare"):
                        self.strategy.prepare()
                phase = "quiesce"
                with self._phase("quiesce"):
                    frozen = self._quiesce(stages, app)
                phase = "transfer"
                with self._phase("transfer"):
                    self.strategy.cutover(frozen)
                phase = "restore"
                with self._phase("restore"):
                    self.strategy.restore()
                phase = "reconnect"
                with self._phase("reconnect"):
                    self._reconnect()
                phase = "verify"
                with self._phase("verify"):
                    self._verify(frozen)
            except (Exception, Interrupted) as err:  # before the point of no return
                report.error = f"{phase}: {err}"
                report.rolled_back = True
                with self._signals_deferred(), self._phase("rollback"):
                    self._rollback(app)
            else:
                log.info("migration %s: point of no return passed (verified on %s)",
                         report.stage, self.destination)  # fmt: skip
                self.undo.forget()
                with self._signals_deferred(), self._phase("cleanup"):
                    self._cleanup()
        report.total_time_s = round(time.monotonic() - t0, 4)
        report.ended_at = time.time()
        self._measure(before)
        self._record()
        return report

    def _record(self) -> None:
        """Hand the finished migration's numbers to the destination's agent, which keeps the
        last one per stage for its metrics (dpmigrate.runtime.migration_record): nothing else
        keeps a report. Best effort — the migration is over either way; a failure is logged."""
        r = self.report
        try:
            with self.cluster.client(self.destination, timeout=5) as agent:
                agent.call("record_migration", app=self.app_name, stage=self.stage,
                           strategy=r.strategy, source=self.source,
                           outcome="rolled_back" if r.rolled_back else "moved",
                           phases=dict(r.phases), total_time_s=r.total_time_s,
                           downtime_s=r.downtime_s, frozen_time_s=r.frozen_time_s,
                           transferred_bytes=r.transferred_bytes,
                           ended_at=r.ended_at)  # fmt: skip
        except DpmigrateError as err:
            log.warning("migration %s: not recorded for %s's metrics: %s", r.stage,
                        self.destination, err)  # fmt: skip

    @contextlib.contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        log.info("migration %s %s→%s: phase %s", self.report.stage, self.source,
                 self.destination, name)  # fmt: skip
        self.on_phase(name)
        start, wall = time.monotonic(), time.time()
        try:
            yield
        finally:
            self.report.phases[name] = round(time.monotonic() - start, 4)
            self.report.phase_times[name] = [wall, time.time()]

    def _signals_interrupt(self) -> contextlib.AbstractContextManager[None]:
        """SIGINT and SIGTERM raise Interrupted."""

        def interrupt(signum: int, _frame: FrameType | None) -> None:
            raise Interrupted(signum)

        return _handling_signals(interrupt)

    def _signals_deferred(self) -> contextlib.AbstractContextManager[None]:
        """While undoing or cleaning up, a signal is noted, not obeyed: stopping half-way
        would leave stages asleep."""

        def note(signum: int, _frame: FrameType | None) -> None:
            log.warning("migration %s: %s ignored while the migration %s", self.report.stage,
                        signal.Signals(signum).name,
                        "rolls back" if self.report.rolled_back else "cleans up")  # fmt: skip

        return _handling_signals(note)

    def _stages(
        self, include_finished: bool = False, reachable_only: bool = False
    ) -> dict[str, dict[str, Any]]:
        """This app's stages by name (as their agents report them), running ones unless
        ``include_finished`` (a stage that left by checkpoint or was fenced never counts).
        ``reachable_only``: skip a node whose agent does not answer (measuring after a
        fault), instead of failing."""
        found = {}
        for node in self.cluster.nodes:
            try:
                reply = self.call(node.name, "status")
            except DpmigrateError as err:
                if not reachable_only:
                    raise
                log.warning("migration %s: node %s not asked: %s", self.report.stage,
                            node.name, err)  # fmt: skip
                continue
            for info in reply["stages"]:
                if info.get("app") != self.app_name or info.get("moved") or info.get("fenced"):
                    continue
                if info.get("role", "primary") != "primary":
                    continue  # a replica (standby, statesync target) is not the stage
                if include_finished or not info.get("finished"):
                    found[info["name"]] = info
        return found

    def _preflight(self) -> tuple[dict[str, dict[str, Any]], App]:
        nodes = {n.name for n in self.cluster.nodes}
        if self.destination not in nodes:
            raise MigrationError(f"no node {self.destination!r} (nodes: {sorted(nodes)})")
        if self.destination == self.source:
            raise MigrationError(f"stage {self.report.stage} already runs on {self.source}")
        self.cluster.store().health()  # placement changes need the store: fail here if away
        cordon.refuse_if_cordoned(self.cluster.store(), self.destination,
                                  f"migrating {self.report.stage} there")  # fmt: skip
        stages = self._stages()
        me = stages.get(self.stage)
        if me is None or me.get("phase") != "running" or not me.get("pid"):
            raise MigrationError(f"stage {self.report.stage} is not running and healthy: {me}")
        src, dst = self.call(self.source, "facts"), self.call(self.destination, "facts")
        if self.strategy.uses_criu:
            self._preflight_criu(src, dst)
        self.page_size = int(dst.get("page_size", self.page_size))
        memory = int(me.get("rss_bytes") or 0)
        needed = self.strategy.space_needed(memory)
        if dst["free_bytes"] < needed:
            raise MigrationError(
                f"{self.destination} has {dst['free_bytes'] >> 20} MiB free in its folder; "
                f"{self.strategy.name} of a stage using {memory >> 20} MiB needs "
                f"{needed >> 20} MiB there: free space or choose another node"
            )
        standbys = self.call(self.source, "standbys", **self.stage_ref)
        if self.destination in standbys.get("nodes", []):
            raise MigrationError(
                f"{self.destination} runs a standby of {self.report.stage}; move the stage to "
                "another node, or stop that standby first"
            )
        app = App.load(me["manifest"])
        self._downstream = {r.dst_stage for r in app.rings if r.src_stage == self.stage}
        # A gap is only seen by a consumer that had received something before it.
        self._watchers_had_input = any(
            stages.get(n, {}).get("msgs_in", 0) > 0 for n in (self._downstream or {self.stage})
        )
        return stages, app

    def _preflight_criu(self, src: dict[str, Any], dst: dict[str, Any]) -> None:
        if _version(dst["criu_version"]) < _version(src["criu_version"]):
            raise MigrationError(
                f"{self.destination}'s CRIU {dst['criu_version']} is older than "
                f"{self.source}'s {src['criu_version']}"
            )
        missing = sorted(set(src["cpu_flags"]) - set(dst["cpu_flags"]))
        if missing:
            raise MigrationError(f"{self.destination} lacks CPU flags {missing[:8]}")
        if self.strategy.needs_lazy_pages and not dst["lazy_pages"]:
            raise MigrationError(
                f"{self.destination} has no userfaultfd: no {self.strategy.name} there"
            )

    def _quiesce(self, stages: dict[str, dict[str, Any]], app: App) -> dict[str, Any]:
        store = self.cluster.store()
        placed = store.placements(self.app_name)
        self._placed = store.placement(self.app_name, self.stage)
        if self._placed is None or self._placed.node != self.source:
            raise MigrationError(
                f"the cluster store places {self.report.stage} on "
                f"{self._placed.node if self._placed else 'no node'}, not on {self.source}"
            )
        placement = {s.name: s.node for s in app.stages}
        placement.update({name: p.node for name, p in placed.items()})
        moved = {**placement, self.stage: self.destination}
        peers = peers_changing_transport(app, self.stage, placement, moved)
        order = [s.name for s in app.stages if s.name in peers or s.name == self.stage]
        # Pushed once, before anything sleeps: it wakes whichever were quiesced, all at once.
        self.undo.push("wake the quiesced stages where they were", self._wake_quiesced)
        frozen: dict[str, Any] = {}
        for name in order:  # pipeline order: every drain still has a running consumer
            info = stages[name]
            result = self.call(info["node"], "quiesce_stage", app=self.app_name, stage=name)
            self._quiesced.append(_Placed(self.app_name, name, info["node"]))
            if name == self.stage:
                frozen = result
                self._asleep_from = time.time()
        self.report.state_digest_before = frozen["state_digest"]
        return frozen

    def _wake_quiesced(self) -> None:
        """Undo of the quiesce: every stage still asleep where it was wakes (all at once: a
        consumer's wake waits for its producer). A peer already woken under the new
        placement was restarted by the reconnect's undo instead."""
        asleep = [p for p in self._quiesced if p.stage not in self._woken or p.stage == self.stage]
        if asleep:
            self._wake_all([(p, p.node) for p in asleep])

    def _wake_all(self, targets: list[tuple[_Placed, str]]) -> dict[str, dict[str, Any]]:
        """Wake every (stage, node) at once; MigrationError naming each that failed."""

        def wake(placed: _Placed, node: str) -> dict[str, Any]:
            return self.call(node, "wake_stage", app=placed.app, stage=placed.stage,
                             timeout=WAKE_TIMEOUT_S)  # fmt: skip

        with concurrent.futures.ThreadPoolExecutor(max(1, len(targets))) as pool:
            futures = {p.stage: pool.submit(wake, p, node) for p, node in targets}
        woken, errors = {}, []
        for stage, future in futures.items():
            try:
                woken[stage] = future.result()
            except DpmigrateError as err:
                errors.append(f"{stage}: {err}")
        if errors:
            raise MigrationError("wake failed: " + "; ".join(errors))
        return woken

    def _reconnect(self) -> None:
        """Place the stage on the destination, then wake every quiesced stage at once: each
        reopens its rings by name, a consumer waiting in its agent until its producer has
        registered (the watch tells it at once), so no wake waits for another."""
        self.undo.push(f"place {self.report.stage} back on {self.source} and restart the "
                       "peers woken under the new placement", self._place_back)  # fmt: skip
        self._move_placement(self.destination)
        self.undo.push(f"end the copy on {self.destination} and hand its committed point back "
                       f"to {self.source}", self._hand_back)  # fmt: skip
        self._asleep_until = time.time()
        targets = [
            (p, self.destination if p.stage == self.stage else p.node) for p in self._quiesced
        ]
        # Counted as woken under the new placement from the moment we ask (a wake that timed
        # out may still happen): the undo restarts these peers rather than waking them.
        self._woken |= {p.stage for p, _ in targets}
        me = self._wake_all(targets).get(self.stage, {})
        self.report.state_digest_after = me.get("state_digest")
        self._woken_version = me.get("state_version")

    def _hand_back(self) -> None:
        """Undo of the wake on the destination (runs before the placement goes back). The
        copy that woke there may have processed and acknowledged inputs, which the producers
        then forgot: it is ended first, so it acknowledges nothing more, and its committed
        point becomes the source's, which catches up with it when it wakes."""
        if self.stage not in self._woken:
            return
        self.call(self.destination, "discard_stage", **self.stage_ref)
        point = self.call(self.destination, "journal_point", **self.stage_ref)
        adopted = self.call(self.source, "adopt_journal_point", **self.stage_ref, point=point)
        log.info("migration %s: the source takes the destination's point (%s)",
                 self.report.stage, adopted)  # fmt: skip

    def _place_back(self) -> None:
        """Undo of the reconnect: the placement goes back, and the peers woken under the new
        one restart from their journals."""
        if self._placed is not None and self._placed.node != self.source:
            self._move_placement(self.source)
        for placed in self._quiesced:
            if placed.stage != self.stage and placed.stage in self._woken:
                # woken with the stage's new place: restart from its journal, the old way
                self.call(placed.node, "restart_stage", app=placed.app, stage=placed.stage)

    def _move_placement(self, node: str) -> None:
        """Compare-and-swap the stage's placement to ``node`` (epoch + 1): only if nobody
        changed it since we read it; every agent's watch learns of it at once."""
        store = self.cluster.store()
        self._placed = store.place(self.app_name, self.stage, node, self._placed)
        self.placement_changed_at = time.time()
        log.info("migration %s: placed on %s, epoch %d", self.report.stage, node,
                 self._placed.epoch)  # fmt: skip

    def _on_destination(self) -> dict[str, Any] | None:
        """The stage as the destination's agent reports it."""
        for info in self.call(self.destination, "status")["stages"]:
            mine = info.get("app") == self.app_name and info.get("name") == self.stage
            if mine and not info.get("finished"):
                return info
        return None

    def _verify(self, frozen: dict[str, Any]) -> None:
        me = self._on_destination()
        if me is None or me.get("node") != self.destination or me.get("phase") != "running":
            raise MigrationError(f"the restored stage does not run on {self.destination}: {me}")
        limits = me.get("resources")  # what its control group there holds (None: no limits)
        self.report.resources = None if limits is None else {
            k: limits.get(k) for k in ("group", "limits", "applied", "unsupported")
        }  # fmt: skip
        if (self.report.state_digest_after, self._woken_version) != (
            frozen["state_digest"],
            frozen["state_version"],
        ):
            raise MigrationError(
                f"the restored state (version {self._woken_version}, digest "
                f"{self.report.state_digest_after}) is not the frozen one (version "
                f"{frozen['state_version']}, digest {frozen['state_digest']})"
            )
        self._wait_flow(me)

    def _wait_flow(self, me: dict[str, Any]) -> None:
        """Messages move through the restored stage again (unless its inputs are over)."""
        start_in = me.get("msgs_in", 0)
        deadline = time.monotonic() + self.flow_timeout
        while time.monotonic() < deadline:
            now = self._on_destination()
            if now is None:
                return  # finished its stream already
            if now.get("msgs_in", 0) > start_in or now.get("done") or not _has_inputs(now):
                return
            upstream_done = all(s.get("done") for n, s in self._stages().items() if n != self.stage)
            if upstream_done:
                return
            time.sleep(0.01)
        raise MigrationError(f"no message reached the restored stage within {self.flow_timeout} s")

    def _rollback(self, app: App | None) -> None:
        self._healing = True
        steps, failures = self.undo.rollback()
        self.report.rollback_steps += steps
        self.report.rollback_failures += failures
        self._remove_files(self.report.rollback_failures)
        if app is not None:
            self.report.rollback_failures += self._not_running(app)

    def _not_running(self, app: App) -> list[str]:
        """Each stage of the app that does not run after the rollback, and why."""
        try:
            stages = self._stages(include_finished=True, reachable_only=True)
        except DpmigrateError as err:
            return [f"cannot tell which stages run: {err}"]
        problems = []
        for spec in app.stages:
            info = stages.get(spec.name)
            if info is None:
                problems.append(f"stage {app.name}/{spec.name} runs nowhere")
            elif info.get("failed"):
                problems.append(f"stage {app.name}/{spec.name} on {info['node']} failed "
                                f"(see its log {info.get('log')})")  # fmt: skip
            elif info.get("phase") not in ("running", "finished") and not info.get("done"):
                problems.append(f"stage {app.name}/{spec.name} on {info['node']} is "
                                f"{info.get('phase')}, not running")  # fmt: skip
        return problems

    def _cleanup(self) -> None:
        """Past the point of no return the stage runs on the destination: a step that fails
        here is a warning (reported, logged), and the next step still runs."""
        steps = (
            (f"{self.strategy.name}: finish", self.strategy.finish),
            (f"end the sleeping source on {self.source}",
             lambda: self.call(self.source, "discard_stage", **self.stage_ref)),
        )  # fmt: skip
        for what, step in steps:
            try:
                step()
            except DpmigrateError as err:
                text = f"{what} failed: {err}"
                log.warning("migration %s (%s): %s", self.report.stage, self.id, text)
                self.report.warnings.append(text)
        self._remove_files(self.report.warnings)

    def _remove_files(self, problems: list[str]) -> None:
        """Each agent that may hold a folder of this migration removes its own."""
        for node in self._with_files:
            try:
                self.call(node, "remove_migration", migration=self.id)
            except DpmigrateError as err:
                text = f"remove_migration on {node} failed: {err}"
                log.warning("migration %s (%s): %s", self.report.stage, self.id, text)
                problems.append(text)

    # -- measuring ----------------------------------------------------------------------
    def _checker(self) -> dict[str, Any] | None:
        with contextlib.suppress(DpmigrateError):
            for info in self._stages(include_finished=True, reachable_only=True).values():
                metrics = info.get("metrics", {})
                if {"lost", "duplicated"} <= set(metrics):
                    return {"name": info["name"], **metrics}
        return None

    def _fresh_stages(self) -> dict[str, dict[str, Any]]:
        """The stages once the downstream ones wrote a status after the migration ended
        (they write one every STATUS_INTERVAL_S), within a bound."""
        seen_by = self._downstream or {self.stage}
        deadline = time.monotonic() + _FRESH_STATUS_TIMEOUT_S
        stages: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(DpmigrateError):
                stages = self._stages(include_finished=True, reachable_only=True)
            watchers = [s for n, s in stages.items() if n in seen_by]
            if watchers and all(
                s.get("time", 0) > self.report.ended_at or s.get("done") for s in watchers
            ):
                break
            time.sleep(STATUS_INTERVAL_S / 4)
        return stages

    def _measure(self, before: dict[str, Any] | None) -> None:
        """Downtime: the longest input gap the stage's downstream peer saw during the
        migration, and never less than the time the stage was known to be asleep (the
        downstream may have restarted meanwhile and forgotten its gap)."""
        stages = self._fresh_stages()
        window = (self.report.started_at, self.report.ended_at + 0.5)
        seen_by = self._downstream or {self.stage}
        gaps = [
            end - start
            for n, s in stages.items()
            if n in seen_by
            for start, end in s.get("input_gaps") or []
            if end >= window[0] and start <= window[1]
        ]
        asleep = None
        if self._asleep_from is not None and self._asleep_until is not None:
            asleep = round(self._asleep_until - self._asleep_from, 4)
        elif self._asleep_from is not None and self.report.rolled_back:
            asleep = round(self.report.ended_at - self._asleep_from, 4)  # until the rollback
        self.report.asleep_s = asleep
        if gaps or asleep is not None:
            self.report.downtime_s = round(max([*gaps, asleep or 0.0]), 4)
        elif self._watchers_had_input:
            self.report.downtime_s = 0.0
        else:  # nothing had reached the consumer yet: no gap could be seen, so say unknown
            self.report.downtime_s = None
        self._measure_reconnect(stages)
        after = self._checker()
        if before is not None and after is not None:
            self.report.lost = int(after["lost"]) - int(before["lost"])
            self.report.duplicated = int(after["duplicated"]) - int(before["duplicated"])

    def _measure_reconnect(self, stages: dict[str, dict[str, Any]]) -> None:
        changed = self.placement_changed_at
        me = stages.get(self.stage)
        if self.report.rolled_back or changed is None or me is None:
            return
        mine = {r["name"] for r in me.get("rings", [])}
        times = [
            float(r.get("connected_at", 0.0))
            for info in stages.values()
            for r in info.get("rings", [])
            if r["name"] in mine
        ]
        after = [t - changed for t in times if t >= changed]
        if after:
            self.report.reconnect_after_placement_s = round(max(after), 4)


@contextlib.contextmanager
def _handling_signals(handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    """``handler`` for SIGINT and SIGTERM meanwhile (only the main thread can take signals;
    elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _has_inputs(info: dict[str, Any]) -> bool:
    return any(r.get("role") == "consumer" for r in info.get("rings", []))


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())
