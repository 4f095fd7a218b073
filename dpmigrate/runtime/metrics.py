"""The agent's Prometheus metrics: what its node runs, read afresh on every scrape.

A :class:`AgentCollector` (a prometheus-client custom collector) has no thread and keeps no
copy: each scrape reads the agent's current view — its supervisor's stages, each stage's
status file (rings, state version, epoch, a replica's lag), the stage process's CPU time and
resident memory from ``/proc``, its control group's usage where it has one, and the node's
record of the migrations that came to it (:mod:`dpmigrate.runtime.migration_record`) — and
turns it into metric families. So a scrape costs a few small file reads, and what it shows is
never older than the stages' own status (written five times a second).

Naming follows Prometheus' conventions: the ``dpmigrate_`` prefix, base units in the name
(``_seconds``, ``_bytes``, ``_messages``, ``_points``), ``_total`` on counters, ``_info``
for a constant 1 carrying labels. Labels are bounded by what the node runs: ``app``,
``stage`` (and ``role``: primary, standby or target), ``ring`` and ``direction`` (``in`` for
the stage's consumer end, ``out`` for its producer end), ``standby`` (a node name),
``phase``, ``strategy``, ``source``, ``outcome``. A value that is not measured is absent,
never a made-up 0: a stage without a control group has no ``cgroup`` series, a replica that
has not yet applied a point has no lag, a stage without a process has no CPU time.

Counters count from the start of what they measure (a ring end, a stage process, an agent),
so they reset when that restarts — Prometheus' ``rate()`` and ``increase()`` handle resets.

The read-only HTTP endpoint that serves them is :mod:`dpmigrate.runtime.metrics_http`;
:func:`register` wires both, and the ``record_migration`` operation, into an agent.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector

from dpmigrate import __version__
from dpmigrate.eventlog import EventLog
from dpmigrate.runtime import stagehost
from dpmigrate.runtime.migration_record import RECORD, MigrationDone, MigrationRecord
from dpmigrate.runtime.supervisor import process_resident_bytes

if TYPE_CHECKING:
    from dpmigrate.runtime.agent import Agent
    from dpmigrate.runtime.metrics_http import MetricsServer

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_STAGE = ("app", "stage", "role")
_RING = ("app", "stage", "ring", "direction")
_MIGRATION = ("app", "stage", "strategy", "source", "outcome")
#: A problem while collecting is logged at most this often (a scrape every few seconds must
#: not flood the agent's log with the same line).
_PROBLEM_LOG_INTERVAL_S = 60.0


@dataclasses.dataclass(frozen=True)
class StageView:
    """One stage of the node as the agent sees it at the moment of a scrape."""

    app: str
    stage: str
    role: str
    pid: int | None  # host PID of the stage process; None while it does not run
    restarts: int
    ooms: int
    status: dict[str, Any]  # its status file ({} before it wrote one)
    resources: dict[str, Any] | None  # its control group's limits and usage; None: no group


def stage_views(agent: Agent) -> list[StageView]:
    """The stages the agent lists now, except those that left this node (checkpointed away
    or migrated: their status file here is only their past) and stale copies that stopped
    themselves (fenced: the stage runs elsewhere) — as ``dpmigrate status`` lists them."""
    views = []
    for key, proc in list(agent.supervisor.stages.items()):
        args = agent.stage_args.get(key)
        if proc.moved or proc.fenced or args is None:
            continue
        app, _, name = key.partition("/")
        status = stagehost.read_status(args[1], name)
        views.append(StageView(
            app=app, stage=name, role=agent.roles.get(key, "primary"),
            pid=None if proc.finished else proc.stage_pid, restarts=proc.restarts,
            ooms=proc.ooms, status=status if isinstance(status, dict) else {},
            resources=proc.resources(),
        ))  # fmt: skip
    return views


def process_cpu_seconds(pid: int) -> float | None:
    """User and system CPU time of one process (all its threads), from ``/proc``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime
    except (OSError, IndexError, ValueError):
        return None


def _number(value: object) -> float | None:
    """``value`` if it is a real number (a bool or None is not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class _Families:
    """The families of one scrape, made on first use, yielded in the order first used."""

    def __init__(self) -> None:
        self._made: dict[str, Metric] = {}

    def add(self, kind: str, name: str, doc: str, labels: Iterable[str],
            values: Iterable[str], value: object) -> None:  # fmt: skip
        number = _number(value)
        if number is None:
            return  # not measured: absent, never 0
        family = self._made.get(name)
        if family is None:
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            family = cls(name, doc, labels=list(labels))
            self._made[name] = family
        family.add_metric(list(values), number)

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._made.values())


class AgentCollector:
    """A prometheus-client collector over one agent's view; see the module docstring."""

    def __init__(
        self,
        node: str,
        views: Callable[[], list[StageView]],
        record: MigrationRecord,
        log: EventLog,
        store_reachable: Callable[[], bool | None] = lambda: None,
    ) -> None:
        self.node = node
        self.views = views
        self.record = record
        self.log = log
        self.store_reachable = store_reachable
        self.errors = 0  # collection problems so far (each also logged, rate-limited)
        self._last_problem = 0.0

    def collect(self) -> Iterator[Metric]:
        info = InfoMetricFamily("dpmigrate_agent", "The agent serving these metrics.")
        info.add_metric([], {"node": self.node, "version": __version__})
        yield info
        fams = _Families()
        reachable = self.store_reachable()
        if reachable is not None:
            fams.add("gauge", "dpmigrate_agent_store_reachable",
                     "1 while the agent's watches on the cluster store (etcd) are connected.",
                     (), (), int(reachable))  # fmt: skip
        try:
            views = self.views()
        except Exception as err:  # never fail a scrape: say it, and count it
            self._problem("stages", err)
            views = []
        for view in views:
            try:
                self._stage(fams, view)
            except Exception as err:
                self._problem(f"{view.app}/{view.stage}", err)
        histograms: list[Metric] = []
        try:
            self._migrations(fams)
            histograms = list(self._histograms())
        except Exception as err:
            self._problem("migrations", err)
        yield from fams
        yield from histograms
        errors = CounterMetricFamily("dpmigrate_metrics_collect_errors",
                                     "Problems met while collecting these metrics (each is "
                                     "logged by the agent).")  # fmt: skip
        errors.add_metric([], self.errors)
        yield errors

    def _problem(self, what: str, err: Exception) -> None:
        self.errors += 1
        now = time.monotonic()
        if now - self._last_problem >= _PROBLEM_LOG_INTERVAL_S:
            self._last_problem = now
            self.log("metrics collection problem", level="warning", part=what,
                     error=f"{type(err).__name__}: {err}")  # fmt: skip

    # -- one stage ------------------------------------------------------------------------
    def _stage(self, fams: _Families, v: StageView) -> None:
        labels = (v.app, v.stage, v.role)
        status = v.status
        fams.add("gauge", "dpmigrate_stage_running",
                 "1 while the stage's process runs on this node, 0 once it finished, "
                 "stopped or failed.", _STAGE, labels, int(v.pid is not None))  # fmt: skip
        fams.add("counter", "dpmigrate_stage_restarts",
                 "Times this node's agent restarted the stage after it died (crash, kill, "
                 "OOM), since the agent started.", _STAGE, labels, v.restarts)  # fmt: skip
        fams.add("gauge", "dpmigrate_stage_state_version",
                 "Version of the stage's explicit state (one per committed batch that changed "
                 "it), as its last status says.", _STAGE, labels,
                 status.get("state_version"))  # fmt: skip
        fams.add("gauge", "dpmigrate_stage_epoch",
                 "The stage's placement epoch as the stage last saw it (+1 per move).",
                 _STAGE, labels, status.get("epoch"))  # fmt: skip
        fams.add("gauge", "dpmigrate_stage_status_timestamp_seconds",
                 "When the stage last wrote its status (Unix time); it does so 5 times a "
                 "second while it runs.", _STAGE, labels, status.get("time"))  # fmt: skip
        if v.pid is not None:
            fams.add("counter", "dpmigrate_stage_cpu_seconds",
                     "User and system CPU time of the stage's process since it (re)started.",
                     _STAGE, labels, process_cpu_seconds(v.pid))  # fmt: skip
            fams.add("gauge", "dpmigrate_stage_resident_memory_bytes",
                     "Resident memory of the stage's process (what a CRIU dump of it moves).",
                     _STAGE, labels, process_resident_bytes(v.pid))  # fmt: skip
        self._cgroup(fams, v, labels)
        for ring in status.get("rings") or []:
            if isinstance(ring, dict):
                self._ring(fams, v, ring)
        lag = status.get("lag")
        if v.role != "primary" and isinstance(lag, dict):
            fams.add("gauge", "dpmigrate_standby_lag_points",
                     "Committed points the primary published that this replica has not yet "
                     "applied.", _STAGE, labels, lag.get("lag_points"))  # fmt: skip
            fams.add("gauge", "dpmigrate_standby_lag_seconds",
                     "How far, in the primary's commit time, this replica's applied point is "
                     "behind the primary's last announced one.", _STAGE, labels,
                     lag.get("lag_s"))  # fmt: skip
        for standby in status.get("standbys") or []:
            if isinstance(standby, dict) and isinstance(standby.get("node"), str):
                fams.add("gauge", "dpmigrate_standby_in_sync",
                         "1 while the primary gates its acknowledgements on this standby "
                         "(it holds every point acknowledged upstream).",
                         ("app", "stage", "standby"), (v.app, v.stage, standby["node"]),
                         int(bool(standby.get("in_sync"))))  # fmt: skip

    def _cgroup(self, fams: _Families, v: StageView, labels: tuple[str, ...]) -> None:
        if not v.resources:
            return
        fams.add("counter", "dpmigrate_stage_oom_kills",
                 "Times the stage was killed by its memory limit (and restarted), since the "
                 "agent started.", _STAGE, labels, v.ooms)  # fmt: skip
        usage = v.resources.get("usage")
        if not isinstance(usage, dict):
            return
        fams.add("counter", "dpmigrate_stage_cgroup_cpu_seconds",
                 "CPU time of every task in the stage's control group.", _STAGE, labels,
                 usage.get("cpu_seconds"))  # fmt: skip
        fams.add("gauge", "dpmigrate_stage_cgroup_memory_bytes",
                 "Memory charged to the stage's control group (page cache included).",
                 _STAGE, labels, usage.get("memory_bytes"))  # fmt: skip
        fams.add("counter", "dpmigrate_stage_cgroup_throttled_periods",
                 "CFS periods in which the stage's group was throttled by its CPU quota.",
                 _STAGE, labels, usage.get("throttled_periods"))  # fmt: skip
        fams.add("counter", "dpmigrate_stage_cgroup_throttled_seconds",
                 "Time the stage's group spent throttled by its CPU quota.", _STAGE, labels,
                 usage.get("throttled_seconds"))  # fmt: skip

    def _ring(self, fams: _Families, v: StageView, ring: dict[str, Any]) -> None:
        name, role = ring.get("name"), ring.get("role")
        if not isinstance(name, str) or role not in ("producer", "consumer"):
            return
        labels = (v.app, v.stage, name, "out" if role == "producer" else "in")
        fams.add("counter", "dpmigrate_ring_messages",
                 "Messages through this ring end: sent (out; first transmissions only) or "
                 "delivered to the stage (in).", _RING, labels, ring.get("messages"))  # fmt: skip
        fams.add("counter", "dpmigrate_ring_bytes",
                 "Payload bytes of those messages.", _RING, labels,
                 ring.get("bytes"))  # fmt: skip
        fams.add("gauge", "dpmigrate_ring_occupancy_messages",
                 "Messages held at this end now: retained until acknowledged (out) or "
                 "received and not yet delivered (in).", _RING, labels,
                 ring.get("occupancy"))  # fmt: skip
        fams.add("gauge", "dpmigrate_ring_capacity_messages",
                 "The ring's window: how many unacknowledged messages it retains at most.",
                 _RING, labels, ring.get("capacity"))  # fmt: skip
        fams.add("counter", "dpmigrate_ring_reconnects",
                 "Times this end reconnected to its peer (after a break, a migration, a "
                 "restart of either end).", _RING, labels, ring.get("reconnects"))  # fmt: skip
        if role == "producer":
            fams.add("counter", "dpmigrate_ring_resent_messages",
                     "Messages transmitted again after a reconnection (out).", _RING, labels,
                     ring.get("resent"))  # fmt: skip
        else:
            fams.add("counter", "dpmigrate_ring_duplicates_dropped_messages",
                     "Messages that arrived again below the next expected sequence number "
                     "and were dropped (in).", _RING, labels,
                     ring.get("duplicates_dropped"))  # fmt: skip

    # -- migrations to this node --------------------------------------------------------
    def _migrations(self, fams: _Families) -> None:
        for (strategy, outcome), n in sorted(self.record.counts().items()):
            fams.add("counter", "dpmigrate_migrations",
                     "Migrations to this node that ended, by strategy and outcome (moved, "
                     "rolled_back).", ("strategy", "outcome"), (strategy, outcome),
                     n)  # fmt: skip
        for m in self.record.last():
            labels = tuple(str(m[k]) for k in ("app", "stage", "strategy", "source", "outcome"))
            for phase, seconds in sorted(m["phases"].items()):
                fams.add("gauge", "dpmigrate_last_migration_phase_seconds",
                         "Duration of each phase of the stage's last migration to this node.",
                         (*_MIGRATION, "phase"), (*labels, phase), seconds)  # fmt: skip
            fams.add("gauge", "dpmigrate_last_migration_downtime_seconds",
                     "Downtime of the stage's last migration to this node: the longest gap "
                     "in its output as its downstream saw it.", _MIGRATION, labels,
                     m.get("downtime_s"))  # fmt: skip
            fams.add("gauge", "dpmigrate_last_migration_duration_seconds",
                     "Total time of the stage's last migration to this node.", _MIGRATION,
                     labels, m.get("total_time_s"))  # fmt: skip
            fams.add("gauge", "dpmigrate_last_migration_frozen_seconds",
                     "CRIU's frozen time in the stage's last migration to this node (0 for "
                     "statesync, which does not freeze it).", _MIGRATION, labels,
                     m.get("frozen_time_s"))  # fmt: skip
            fams.add("gauge", "dpmigrate_last_migration_transferred_bytes",
                     "Bytes moved by the stage's last migration to this node.", _MIGRATION,
                     labels, m.get("transferred_bytes"))  # fmt: skip
            fams.add("gauge", "dpmigrate_last_migration_end_timestamp_seconds",
                     "When the stage's last migration to this node ended (Unix time).",
                     _MIGRATION, labels, m.get("ended_at"))  # fmt: skip

    def _histograms(self) -> Iterator[Metric]:
        """Over every migration that moved a stage to this node, by strategy."""
        docs = {
            "phase": ("dpmigrate_migration_phase_seconds", ("strategy", "phase"),
                      "Phase durations of the migrations that moved a stage to this node."),
            "downtime": ("dpmigrate_migration_downtime_seconds", ("strategy",),
                         "Downtimes of the migrations that moved a stage to this node."),
            "duration": ("dpmigrate_migration_duration_seconds", ("strategy",),
                         "Total times of the migrations that moved a stage to this node."),
        }  # fmt: skip
        made: dict[str, HistogramMetricFamily] = {}
        for key, (buckets, total) in sorted(self.record.histograms().items()):
            name, labels, doc = docs[key[0]]
            if key[0] not in made:
                made[key[0]] = HistogramMetricFamily(name, doc, labels=list(labels))
            made[key[0]].add_metric(list(key[1:]), buckets, total)
        yield from made.values()


def registry_for(collector: AgentCollector) -> CollectorRegistry:
    """A registry of its own (not the process-global one) holding ``collector`` and the
    agent process's own CPU, memory and file descriptors (``process_*``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry


class MetricsService:
    """The exporter as an agent service: started once the agent joined its store, stopped
    when it shuts down. Off (no listener) when the port is 0."""

    def __init__(self, agent: Agent, port: int) -> None:
        self.agent = agent
        self.port = port
        self.record = MigrationRecord(agent.run_dir / RECORD)
        self.collector = AgentCollector(
            agent.node, lambda: stage_views(agent), self.record, agent.log,
            store_reachable=lambda: _reachable(agent),
        )  # fmt: skip
        self.registry = registry_for(self.collector)
        self.server: MetricsServer | None = None

    def start(self) -> None:
        if not self.port:
            self.agent.log("metrics off", port=0)
            return
        from dpmigrate.runtime.metrics_http import MetricsServer

        self.server = MetricsServer(self.agent.address, self.port, self.registry, self.agent.log)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    def record_migration(self, req: MigrationDone) -> None:
        self.record.add(req)
        self.agent.log("migration recorded", stage=f"{req.app}/{req.stage}",
                       strategy=req.strategy, outcome=req.outcome)  # fmt: skip


def _reachable(agent: Agent) -> bool | None:
    if agent.store.store is None:
        return None  # no store at all: nothing to say
    return bool(agent.store.health().get("reachable"))


def register(agent: Agent, port: int) -> MetricsService:
    """Wire the metrics into ``agent``: the ``record_migration`` operation (the engine's
    report of a migration that came here) and the exporter, a service of the agent."""
    service = MetricsService(agent, port)
    agent.operations.register("record_migration", MigrationDone, service.record_migration)
    return service
