"""Live migration of one stage to another node (DESIGN.md §6).

Phases, each timed and named in the report and the logs:

1. ``preflight`` — the stage runs on its source node and is healthy; the destination is
   another live node; its CRIU is not older than the source's, it has every CPU flag the
   source has, lazy pages when the strategy needs them, and room for the images.
2. ``quiesce`` — the stage, and every peer whose ring to it changes transport (shm between
   stages on one node, tcp between nodes), stop at a batch boundary with everything
   acknowledged and their rings detached. Peers go first in pipeline order, so that each
   drain still has a running consumer.
3. ``transfer`` — CRIU dumps the stage, leaving the source asleep (quiesced, not killed):
   stop-and-copy streams its memory to a page server on the destination, post-copy keeps it
   at the source for lazy pages. The source's agent seals the rest (images, state, context) in
   its own folder of the migration; the destination's agent pulls it from there over the
   agent-to-agent channel and verifies every file (see :mod:`dpmigrate.migrate.stage_transfer`).
   The orchestrator names the migration (:attr:`Migration.id`); it creates no folder.
4. ``restore`` — the destination's agent writes the stage's journal from the shipped state,
   restores it (not yet woken) and adopts it.
5. ``reconnect`` — the run's placement now says the destination; the restored stage and the
   quiesced peers wake and reopen their rings by name through their local agents, with the
   transport the new placement calls for; sequence numbers continue.
6. ``verify`` — the restored stage runs, its state digest equals the source's at the freeze,
   and (unless the stream is over) messages flow through it again.

**Point of no return**: after ``verify``. Until then any failure rolls back — the restored
copy (if any) is discarded, the placement put back, the source and the peers woken where they
were — and the stage keeps running on the source with nothing lost (its state and positions
were never released). After it, ``cleanup`` ends the sleeping source. Either way each agent
removes its own folder of the migration; a removal that fails is logged and listed in the
report's ``warnings``, never ignored.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dpmigrate.cluster.store import Placement
from dpmigrate.errors import DpmigrateError, MigrationError
from dpmigrate.runtime.cluster import LocalCluster
from dpmigrate.runtime.manifest import App
from dpmigrate.runtime.stagehost import ring_transport

log = logging.getLogger("dpmigrate.migrate")

STRATEGIES = ("stop-and-copy", "post-copy")
PHASES = ("preflight", "quiesce", "transfer", "restore", "reconnect", "verify", "cleanup")
#: How long verification waits to see messages flow through the restored stage.
FLOW_TIMEOUT_S = 15.0
#: How long a woken stage may take to reopen its rings before the migration gives up on it.
WAKE_TIMEOUT_S = 10.0


@dataclasses.dataclass
class MigrationReport:
    """What one migration did; the JSON keys use CRIU's / QEMU's vocabulary."""

    strategy: str
    stage: str
    source: str
    destination: str
    total_time_s: float = 0.0
    downtime_s: float | None = None
    frozen_time_s: float = 0.0
    transferred_bytes: int = 0
    pages_written: int = 0
    lost: int | None = None
    duplicated: int | None = None
    state_digest_before: str | None = None
    state_digest_after: str | None = None
    rolled_back: bool = False
    #: from the placement's compare-and-swap to the last ring of the stage reconnected (both
    #: ends), as the ring ends' clocks say: what the push of a move costs
    reconnect_after_placement_s: float | None = None
    phases: dict[str, float] = dataclasses.field(default_factory=dict)
    error: str | None = None
    started_at: float = 0.0  # wall clock, for timelines
    ended_at: float = 0.0
    phase_times: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    #: clean-up and rollback steps that failed (each also logged), e.g. a folder not removed
    warnings: list[str] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _Placed:
    app: str
    stage: str
    node: str
    run_dir: Path


class Migration:
    """One migration; ``run()`` returns its report (and raises MigrationError on rollback
    only when ``raise_on_rollback``)."""

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
        that inject faults."""
        if strategy not in STRATEGIES:
            raise DpmigrateError(
                f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}"
            )
        self.cluster = cluster
        self.strategy = strategy
        self.destination = destination
        self.on_phase = on_phase or (lambda name: None)
        self.on_step = on_step or (lambda name: None)
        self.flow_timeout = flow_timeout
        #: This migration's name: each agent keeps its files under ``migrations/<id>``.
        self.id = "m" + secrets.token_hex(6)
        #: The source's sealed folder and the destination's received one, as each agent
        #: names them in its own view (set once they exist).
        self.source_bundle: str | None = None
        self.destination_bundle: str | None = None
        self._woken_version: int | None = None
        self._woken: set[str] = set()  # stages woken with the new placement
        node, app, name = cluster.find_stage(stage)
        self.report = MigrationReport(strategy, f"{app}/{name}", node, destination)
        self.app_name, self.stage = app, name
        self.source = node
        self._quiesced: list[_Placed] = []  # in the order they were quiesced
        self._with_files: list[str] = []  # nodes that may hold a folder of this migration
        self._lazy_source: list[Any] | None = None  # post-copy: the source's page server
        self._page_server = False
        self._restored = False
        self._old_placement: dict[str, str] = {}
        self._placed: Placement | None = None  # the stage's placement as we changed it last
        self.placement_changed_at: float | None = None  # wall clock of the compare-and-swap

    # -- helpers ------------------------------------------------------------------------
    def _call(self, node: str, op: str, **args: Any) -> Any:
        with self.cluster.client(node, timeout=300) as agent:
            return agent.call(op, **args)

    def _stages(self, include_finished: bool = False) -> dict[str, dict[str, Any]]:
        """This app's stages by name (as their agents report them), running ones unless
        ``include_finished`` (a stage that left by checkpoint never counts)."""
        found = {}
        for node in self.cluster.nodes:
            for info in self._call(node.name, "status")["stages"]:
                if info.get("app") != self.app_name or info.get("moved"):
                    continue
                if include_finished or not info.get("finished"):
                    found[info["name"]] = info
        return found

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

    # -- the migration ------------------------------------------------------------------
    def run(self) -> MigrationReport:
        report = self.report
        report.started_at = time.time()
        t0 = time.monotonic()
        before = self._checker()
        phase = "preflight"
        try:
            with self._phase("preflight"):
                stages, app = self._preflight()
            phase = "quiesce"
            with self._phase("quiesce"):
                frozen = self._quiesce(stages, app)
            phase = "transfer"
            with self._phase("transfer"):
                self._transfer(frozen)
            phase = "restore"
            with self._phase("restore"):
                self._restore()
            phase = "reconnect"
            with self._phase("reconnect"):
                self._reconnect()
            phase = "verify"
            with self._phase("verify"):
                self._verify(frozen)
        except Exception as err:  # any failure before the point of no return: roll back
            report.error = f"{phase}: {err}"
            report.rolled_back = True
            with self._phase("rollback"):
                self._rollback()
        else:
            # -- point of no return: the destination runs the stage; end the source --------
            log.info("migration %s: point of no return passed (verified on %s)",
                     report.stage, self.destination)  # fmt: skip
            with self._phase("cleanup"):
                self._cleanup()
        report.total_time_s = round(time.monotonic() - t0, 4)
        report.ended_at = time.time()
        self._measure(before)
        return report

    def _preflight(self) -> tuple[dict[str, dict[str, Any]], App]:
        nodes = {n.name for n in self.cluster.nodes}
        if self.destination not in nodes:
            raise MigrationError(f"no node {self.destination!r} (nodes: {sorted(nodes)})")
        if self.destination == self.source:
            raise MigrationError(f"stage {self.report.stage} already runs on {self.source}")
        stages = self._stages()
        me = stages.get(self.stage)
        if me is None or me.get("phase") != "running" or not me.get("pid"):
            raise MigrationError(f"stage {self.report.stage} is not running and healthy: {me}")
        src, dst = self._call(self.source, "facts"), self._call(self.destination, "facts")
        if _version(dst["criu_version"]) < _version(src["criu_version"]):
            raise MigrationError(
                f"{self.destination}'s CRIU {dst['criu_version']} is older than "
                f"{self.source}'s {src['criu_version']}"
            )
        missing = sorted(set(src["cpu_flags"]) - set(dst["cpu_flags"]))
        if missing:
            raise MigrationError(f"{self.destination} lacks CPU flags {missing[:8]}")
        if self.strategy == "post-copy" and not dst["lazy_pages"]:
            raise MigrationError(f"{self.destination} has no userfaultfd: no post-copy there")
        if dst["free_bytes"] < 512 << 20:
            raise MigrationError(f"{self.destination} has under 512 MiB free for the images")
        app = App.load(me["manifest"])
        self._downstream = {r.dst_stage for r in app.rings if r.src_stage == self.stage}
        # A gap is only seen by a consumer that had received something before it.
        self._watchers_had_input = any(
            stages.get(n, {}).get("msgs_in", 0) > 0 for n in (self._downstream or {self.stage})
        )
        return stages, app

    def _quiesce(self, stages: dict[str, dict[str, Any]], app: App) -> dict[str, Any]:
        run_dir = Path(stages[self.stage]["run_dir"])
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
        self._old_placement = dict(placement)
        moved = {**placement, self.stage: self.destination}
        peers = set()
        for ring in app.rings:
            if self.stage in (ring.src_stage, ring.dst_stage):
                peer = ring.dst_stage if ring.src_stage == self.stage else ring.src_stage
                if ring_transport(app, ring, "multi-node", placement) != ring_transport(
                    app, ring, "multi-node", moved
                ):
                    peers.add(peer)
        order = [s.name for s in app.stages if s.name in peers or s.name == self.stage]
        frozen: dict[str, Any] = {}
        for name in order:  # pipeline order: every drain still has a running consumer
            info = stages[name]
            result = self._call(info["node"], "quiesce_stage", app=self.app_name, stage=name)
            self._quiesced.append(_Placed(self.app_name, name, info["node"], run_dir))
            if name == self.stage:
                frozen = result
        self._moved_placement = moved
        self._run_dir = run_dir
        self.report.state_digest_before = frozen["state_digest"]
        return frozen

    def _transfer(self, frozen: dict[str, Any]) -> None:
        me = {"app": self.app_name, "stage": self.stage, "migration": self.id}
        if self.strategy == "post-copy":
            # the source's CRIU stays behind as the page server; pages move after the restore
            self._with_files.append(self.source)
            result = self._call(self.source, "lazy_dump", **me, quiesced=frozen)
            self._lazy_source = [result["address"], result["port"]]
            self.source_bundle = result["bundle"]
            self.report.transferred_bytes = self._pull(me)
            return
        self._with_files.append(self.destination)
        server = self._call(self.destination, "page_server", **me)
        self._page_server = True
        self._with_files.append(self.source)
        result = self._call(
            self.source, "dump_to_page_server", **me,
            page_server=[server["address"], server["port"]], quiesced=frozen,
        )  # fmt: skip
        self.source_bundle = result["bundle"]
        done = self._call(self.destination, "finish_page_server", app=self.app_name,
                          stage=self.stage)  # fmt: skip
        self._page_server = False
        criu = result["criu"]
        self.report.frozen_time_s = round(criu["frozen_time"] / 1e6, 4)
        self.report.pages_written = int(criu["pages_written"])
        self.report.transferred_bytes = int(done["pages_bytes"]) + self._pull(me)

    def _pull(self, me: dict[str, str]) -> int:
        """The destination's agent pulls the source's sealed folder from the source's agent
        and verifies it; the bytes it copied."""
        self.on_step("dumped")
        if self.destination not in self._with_files:
            self._with_files.append(self.destination)
        source = self.cluster.node(self.source).agent_address
        pulled = self._call(self.destination, "pull_migration", **me, source=source)
        self.destination_bundle = pulled["bundle"]
        return int(pulled["copied_bytes"])

    def _restore(self) -> None:
        self._call(self.destination, "restore_images", app=self.app_name, stage=self.stage,
                   migration=self.id, lazy_source=self._lazy_source)  # fmt: skip
        self._restored = True

    def _reconnect(self) -> None:
        """Place the stage on the destination, then wake every quiesced stage at once: each
        reopens its rings by name, a consumer waiting in its agent until its producer has
        registered (the watch tells it at once), so no order is needed and no wake waits
        for another."""
        self._move_placement(self.destination)

        def wake(placed: _Placed) -> dict[str, Any]:
            node = self.destination if placed.stage == self.stage else placed.node
            return self._call(node, "wake_stage", app=placed.app, stage=placed.stage,
                              timeout=WAKE_TIMEOUT_S)  # fmt: skip

        with concurrent.futures.ThreadPoolExecutor(max(1, len(self._quiesced))) as pool:
            futures = {placed.stage: pool.submit(wake, placed) for placed in self._quiesced}
        errors = []
        for stage, future in futures.items():
            try:
                woken = future.result()
            except DpmigrateError as err:
                errors.append(f"{stage}: {err}")
                continue
            self._woken.add(stage)
            if stage == self.stage:  # its state as it woke, before any new batch
                self.report.state_digest_after = woken["state_digest"]
                self._woken_version = woken["state_version"]
        if errors:
            raise MigrationError("wake failed: " + "; ".join(errors))

    def _move_placement(self, node: str) -> None:
        """Compare-and-swap the stage's placement to ``node`` (epoch + 1): only if nobody
        changed it since we read it; every agent's watch learns of it at once."""
        store = self.cluster.store()
        self._placed = store.place(self.app_name, self.stage, node, self._placed)
        self.placement_changed_at = time.time()
        log.info("migration %s: placed on %s, epoch %d", self.report.stage, node,
                 self._placed.epoch)  # fmt: skip

    def _on_destination(self) -> dict[str, Any] | None:
        """The stage as the destination's agent reports it (the sleeping source shares its
        status file, so ask the node, not the file)."""
        for info in self._call(self.destination, "status")["stages"]:
            mine = info.get("app") == self.app_name and info.get("name") == self.stage
            if mine and not info.get("finished"):
                return info
        return None

    def _verify(self, frozen: dict[str, Any]) -> None:
        me = self._on_destination()
        if me is None or me.get("node") != self.destination or me.get("phase") != "running":
            raise MigrationError(f"the restored stage does not run on {self.destination}: {me}")
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
            time.sleep(0.05)
        raise MigrationError(f"no message reached the restored stage within {self.flow_timeout} s")

    def _rollback(self) -> None:
        """Restored copy away, placement back, then in pipeline order: the source woken (it
        catches up with the journal if its copy got further), every peer still asleep woken,
        every peer already woken under the new placement restarted from its journal (it
        reopens its rings the old way; nothing it sent unacknowledged is lost: it regenerates
        it)."""
        me = {"app": self.app_name, "stage": self.stage}
        if self._lazy_source is not None:  # first: the source resumes (asleep, quiesced)
            self._undo(self.source, "lazy_abort", **me)
        if self._restored:
            self._undo(self.destination, "discard_stage", **me)
        if self._restored or self._page_server or self._lazy_source is not None:
            self._undo(self.destination, "cancel_transfer", **me)
        if self._placed is not None and self._placed.node != self.source:
            try:
                self._move_placement(self.source)
            except DpmigrateError as err:
                log.error("rollback of %s: could not place it back on %s: %s",
                          self.report.stage, self.source, err)  # fmt: skip
                raise
        for placed in self._quiesced:  # pipeline order, as in _reconnect
            if placed.stage != self.stage and placed.stage in self._woken:
                self._undo(placed.node, "restart_stage", app=placed.app, stage=placed.stage)
            else:
                self._undo(placed.node, "wake_stage", app=placed.app, stage=placed.stage,
                           timeout=WAKE_TIMEOUT_S)  # fmt: skip
        self._remove_files()

    def _cleanup(self) -> None:
        me = {"app": self.app_name, "stage": self.stage}
        if self._lazy_source is not None:
            # post-copy: the source serves pages until the destination pulled them all
            done = self._call(self.source, "lazy_finish", **me)
            self._call(self.destination, "lazy_destination_done", **me)
            criu = done["criu"]
            self.report.frozen_time_s = round(criu["frozen_time"] / 1e6, 4)
            self.report.pages_written = int(criu.get("pages_lazy", 0)) + int(
                criu.get("pages_written", 0)
            )
            self.report.transferred_bytes += self.report.pages_written * 4096
        self._call(self.source, "discard_stage", **me)
        self._remove_files()

    def _remove_files(self) -> None:
        """Each agent that may hold a folder of this migration removes its own."""
        for node in dict.fromkeys(self._with_files):
            self._undo(node, "remove_migration", migration=self.id)

    def _undo(self, node: str, op: str, **args: Any) -> Any:
        """One step of a rollback or clean-up that must not stop the next ones: a failure is
        logged and listed in the report's warnings (None is returned then)."""
        try:
            return self._call(node, op, **args)
        except DpmigrateError as err:
            warning = f"{op} on {node} failed: {err}"
            log.warning("migration %s (%s): %s", self.report.stage, self.id, warning)
            self.report.warnings.append(warning)
            return None

    # -- measuring ----------------------------------------------------------------------
    def _checker(self) -> dict[str, Any] | None:
        with contextlib.suppress(DpmigrateError):
            for info in self._stages(include_finished=True).values():
                metrics = info.get("metrics", {})
                if {"lost", "duplicated"} <= set(metrics):
                    return {"name": info["name"], **metrics}
        return None

    def _measure(self, before: dict[str, Any] | None) -> None:
        """Downtime: the longest input gap the stage's downstream peer saw during the
        migration (its status is written every 0.5 s, so wait for a fresh one)."""
        time.sleep(0.6)
        stages = {}
        with contextlib.suppress(DpmigrateError):
            stages = self._stages(include_finished=True)
        window = (self.report.started_at, self.report.ended_at + 0.5)
        # the stage's consumers saw the gap in its output; a sink's own input shows it
        seen_by = getattr(self, "_downstream", set()) or {self.stage}
        watchers = [s for n, s in stages.items() if n in seen_by and s.get("input_gaps")]
        gaps = [
            end - start
            for s in watchers
            for start, end in s["input_gaps"]
            if end >= window[0] and start <= window[1]
        ]
        if gaps:
            self.report.downtime_s = round(max(gaps), 4)
        elif getattr(self, "_watchers_had_input", False):
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


def _has_inputs(info: dict[str, Any]) -> bool:
    return any(r.get("role") == "consumer" for r in info.get("rings", []))


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())
