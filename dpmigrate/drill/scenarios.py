"""The drills: one small function each, run by :class:`Drill` against a shared local cluster.

Every drill starts its own run of the flows example (gen on node1, table on node2, check on
node3; node4 is the spare destination or standby), injects its fault while traffic flows,
records evidence that the fault really happened, and returns; :mod:`dpmigrate.drill` then
heals whatever the drill left, lets the stream finish and checks the invariants
(:mod:`dpmigrate.drill.invariants`). A drill that cannot inject its fault fails: a fault that
did not happen proves nothing.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dpmigrate.drill import faults
from dpmigrate.drill.faults import FaultError, wait_for
from dpmigrate.errors import DpmigrateError
from dpmigrate.migrate import STRATEGIES, Migration, MigrationReport
from dpmigrate.runtime.cluster import AGENT_PORT, LocalCluster
from dpmigrate.runtime.multinode import MultiNodeRun

RATE = 10_000  # packets per second
STAGE = "table"
SOURCE, SPARE, GEN, CHECK = "node2", "node4", "node1", "node3"
NODES = 4
#: Bounded waits of the drills (seconds).
INPUT_TIMEOUT_S = 60.0
TAKEOVER_TIMEOUT_S = 30.0
IN_SYNC_TIMEOUT_S = 60.0


@dataclasses.dataclass
class DrillResult:
    """One drill's outcome; ``as_dict`` is its JSON form."""

    name: str
    passed: bool = False
    lost: int | None = None
    duplicated: int | None = None
    downtime_s: float | None = None  # the checker's longest input gap after the first fault
    time_s: float = 0.0
    detail: str = ""
    #: what shows that the fault happened (PIDs killed, qdisc seen, file corrupted, ...)
    evidence: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: each invariant that broke, with what the product reported
    failures: list[str] = dataclasses.field(default_factory=list)
    migrations: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    checker: dict[str, Any] = dataclasses.field(default_factory=dict)
    total: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Options:
    """What the command line may change about the drills."""

    strategies: tuple[str, ...] = tuple(STRATEGIES)
    #: a test hook: the checker skips this many messages of its input (index 1000 on),
    #: so that the exactly-once invariant must break and the drill must fail
    drop_checker_input: int = 0


class Drill:
    """The context a drill function works in: the cluster, its own run, faults, evidence."""

    def __init__(self, name: str, cluster: LocalCluster, workdir: Path, options: Options,
                 app_factory: Callable[..., Any],
                 finisher: Callable[[Drill], None]) -> None:  # fmt: skip
        self.name = name
        self.cluster = cluster
        self.workdir = workdir
        self.options = options
        self.result = DrillResult(name)
        self.faults = faults.Faults()
        self.run: MultiNodeRun | None = None
        self.fault_at: float | None = None  # wall clock of the first fault
        self._app_factory = app_factory
        self._finisher = finisher
        self.total = 0
        #: the migration in progress (fault hooks read its folders)
        self.current: Migration | None = None

    # -- traffic --------------------------------------------------------------------------
    def traffic(self, seconds: float, standby: str | None = None) -> MultiNodeRun:
        """Start this drill's flows run: ``seconds`` of stream at RATE packets/s (a drill
        with several runs: the previous one is finished and checked first)."""
        self.end_traffic()
        self.total = int(seconds * RATE)
        self.result.total = self.total
        app = self._app_factory(self.workdir / self.name, self.total, RATE, standby,
                                self.options.drop_checker_input)  # fmt: skip
        self.run = MultiNodeRun(app, self.cluster)
        self.run.start()
        return self.run

    def end_traffic(self) -> None:
        """Finish the current run (bounded), check its invariants, stop and clean it up."""
        if self.run is not None:
            self._finisher(self)
            self.run = None

    def stage(self, name: str = STAGE) -> dict[str, Any]:
        assert self.run is not None
        return next((s for s in self.run.status() if s["name"] == name), {})

    def wait_input(self, more: int, name: str = STAGE) -> None:
        """Until stage ``name`` took in ``more`` messages more than now (bounded)."""
        start = self.stage(name).get("msgs_in", 0)
        wait_for(lambda: self.stage(name).get("msgs_in", 0) >= start + more,
                 f"{name} to take in {more} more messages", INPUT_TIMEOUT_S)  # fmt: skip

    def standby_in_sync(self, node: str = SPARE) -> bool:
        return any(s.get("node") == node and s.get("in_sync")
                   for s in self.stage().get("standbys", []))  # fmt: skip

    def placed(self, stage: str = STAGE) -> str | None:
        assert self.run is not None
        placed = self.cluster.store().placement(self.run.app.name, stage)
        return placed.node if placed else None

    def on_node(self, node: str, stage: str = STAGE, role: str = "primary") -> dict[str, Any]:
        """The stage as ``node``'s agent alone reports it."""
        with self.cluster.client(node, timeout=5) as agent:
            found = [s for s in agent.call("status")["stages"]
                     if s["name"] == stage and s.get("role", "primary") == role]  # fmt: skip
        return found[0] if found else {}

    # -- faults and evidence --------------------------------------------------------------
    def fault(self, key: str, value: Any) -> None:
        """Record evidence that a fault happened (the first one starts the downtime clock)."""
        if self.fault_at is None:
            self.fault_at = time.time()
            self.result.evidence["received_at_fault"] = (
                self.stage("check").get("metrics", {}).get("received")
            )
        self.result.evidence[key] = value

    def fail(self, what: str) -> None:
        self.result.failures.append(what)

    def migrate(self, to: str, strategy: str = "stop-and-copy", may_roll_back: bool = False,
                on_phase: Callable[[str], None] | None = None,
                on_step: Callable[[str], None] | None = None,
                flow_timeout: float = 5.0) -> MigrationReport:  # fmt: skip
        """One migration of the table, checked (lost, dup, digest, rollback complete)."""
        from dpmigrate.drill import invariants

        migration = Migration(self.cluster, STAGE, to, strategy, on_phase=on_phase,
                              on_step=on_step, flow_timeout=flow_timeout)  # fmt: skip
        self.current = migration
        report = migration.run()
        self.result.migrations.append({
            "strategy": report.strategy, "from": report.source, "to": report.destination,
            "rolled_back": report.rolled_back, "error": report.error,
            "downtime_s": report.downtime_s, "lost": report.lost,
            "duplicated": report.duplicated, "digest_kept": report.rolled_back
            or report.state_digest_before == report.state_digest_after,
            "rollback_failures": report.rollback_failures,
        })  # fmt: skip
        self.result.failures += invariants.migration(report, may_roll_back)
        return report


# -- the drills ----------------------------------------------------------------------------


def migrate_loop(d: Drill) -> None:
    """Every strategy, back and forth: node2 → node4 → node2 under traffic."""
    d.traffic(4 + 3.5 * len(d.options.strategies))
    d.wait_input(3000)
    for strategy in d.options.strategies:
        for to in (SPARE, SOURCE):
            d.fault(f"migrated with {strategy} to {to}", True)
            report = d.migrate(to, strategy)
            if report.rolled_back:
                return
            d.wait_input(2000)
    hops = [f"{m['from']}→{m['to']} {m['strategy']}" for m in d.result.migrations]
    d.result.evidence["hops"] = hops


def _kill_agent_mid_migration(d: Drill, node: str, phase: str | None, step: str | None) -> None:
    d.traffic(12)
    d.wait_input(3000)
    killed: list[int] = []

    def kill_it(name: str) -> None:
        if killed or name not in (phase, step):
            return
        pid = d.cluster.node(node).agent_pid
        assert pid is not None
        faults.kill(pid)
        killed.append(pid)
        d.fault(f"{node}'s agent SIGKILLed at {name}", pid)

    d.migrate(SPARE, may_roll_back=True, on_phase=kill_it if phase else None,
              on_step=kill_it if step else None)  # fmt: skip
    if not killed:
        raise FaultError(f"the migration never reached {phase or step}: no agent was killed")
    agent = d.cluster.node(node).agent_pid
    d.result.evidence[f"{node}'s agent after the migration"] = agent
    if agent == killed[0] or agent is None or not faults.alive(agent):
        d.fail(f"nobody restarted {node}'s agent after it was killed mid-migration")


def kill_source_agent_mid_migration(d: Drill) -> None:
    """The source's agent SIGKILLed right after the dump (the sleeping source has nobody to
    wake it): the migration rolls back (or completes) and someone restarts the agent."""
    _kill_agent_mid_migration(d, SOURCE, None, "dumped")


def kill_destination_agent_mid_migration(d: Drill) -> None:
    """The destination's agent SIGKILLed as the restore starts."""
    _kill_agent_mid_migration(d, SPARE, "restore", None)


def kill_stage(d: Drill) -> None:
    """The table SIGKILLed under traffic: its agent restarts it from its journal."""
    d.traffic(6)
    d.wait_input(3000)
    old = d.stage()
    faults.kill(int(old["pid"]))
    d.fault("killed_pid", old["pid"])
    wait_for(lambda: d.stage().get("pid") not in (None, old["pid"])
             and d.stage().get("phase") == "running", "the table restarted", 30)  # fmt: skip
    new = d.stage()
    d.fault("restarted_pid", new["pid"])
    d.result.evidence["restarts"] = new.get("restarts")


def pause_stage(d: Drill) -> None:
    """node2's agent and table SIGSTOPped past the node's lease: the standby on node4 takes
    over; SIGCONT: the old table must be fenced (stop, persist nothing)."""
    d.traffic(14, standby=SPARE)
    wait_for(d.standby_in_sync, "the standby in sync", IN_SYNC_TIMEOUT_S, 0.1)
    d.wait_input(5000)
    old = d.stage()
    agent = d.cluster.node(SOURCE).agent_pid
    assert agent is not None
    d.fault("stopped_pids", [agent, old["pid"]])  # first: it asks the agents for the counts
    faults.pause(d.faults, [agent, int(old["pid"])])
    wait_for(lambda: d.placed() == SPARE, "the standby's takeover", TAKEOVER_TIMEOUT_S)
    try:
        wait_for(lambda: d.on_node(SPARE).get("phase") == "running", "the table on node4",
                 TAKEOVER_TIMEOUT_S)  # fmt: skip
    except FaultError as err:
        seen = {k: d.on_node(SPARE).get(k) for k in ("phase", "pid", "role", "restarts")}
        replica = {k: d.on_node(SPARE, role="standby").get(k) for k in ("phase", "pid")}
        raise FaultError(f"{err}: placed on {d.placed()}, node4 reports the table as {seen}, "
                         f"its standby as {replica}") from err
    d.fault("placement_after_pause", d.placed())
    d.faults.heal()  # SIGCONT both
    d.fault("continued", True)
    wait_for(lambda: not faults.alive(int(old["pid"])), "the old table to stop", 30)
    wait_for(lambda: d.on_node(SOURCE).get("fenced"), "node2's agent to see it fenced", 10)
    d.fault("old_copy_fenced", d.on_node(SOURCE).get("fenced"))
    restarts = d.on_node(SOURCE).get("restarts")
    if restarts:
        d.fail(f"the fenced copy on node2 was restarted {restarts} times")


def node_loss_with_standby(d: Drill) -> None:
    """node2 dies (link cut, agent and stages SIGKILLed): the standby on node4 takes over;
    the node comes back (link up, agent started again) while traffic still flows."""
    d.traffic(14, standby=SPARE)
    wait_for(d.standby_in_sync, "the standby in sync", IN_SYNC_TIMEOUT_S, 0.1)
    d.wait_input(5000)
    assert d.run is not None
    node = d.cluster.node(SOURCE)
    pids = [s["pid"] for s in d.run.status() if s.get("node") == SOURCE and s.get("pid")]
    hub = f"dpm{d.cluster.id}-hub"
    veth = f"veth{SOURCE.removeprefix('node')}"
    faults.run(["ip", "-n", hub, "link", "set", veth, "down"])
    d.faults.on_heal(f"{veth} up", lambda: faults.run(["ip", "-n", hub, "link", "set", veth,
                                                         "up"]))  # fmt: skip
    assert node.agent_pid is not None
    doomed = [p for p in (node.keeper_pid, node.agent_pid, *pids) if p]  # keeper first
    for pid in doomed:
        faults.kill(pid)
    d.fault("killed_pids", doomed)
    d.fault("link", faults.run(["ip", "-n", hub, "-o", "link", "show", veth]).stdout.split(
        "link/")[0].strip())  # fmt: skip
    t0 = time.monotonic()
    wait_for(lambda: d.placed() == SPARE, "the standby's takeover", TAKEOVER_TIMEOUT_S)
    wait_for(lambda: d.on_node(SPARE).get("phase") == "running", "the table on node4",
             TAKEOVER_TIMEOUT_S)  # fmt: skip
    d.result.evidence["takeover_s"] = round(time.monotonic() - t0, 3)
    d.faults.heal()  # link up
    if d.cluster.restart_agent(SOURCE):
        d.result.evidence["node2_agent_restarted"] = d.cluster.node(SOURCE).agent_pid
    d.wait_input(2000)


def partition_node(d: Drill) -> None:
    """nftables drops everything on node2's eth0 for 2.5 s under traffic (longer than its
    lease), then node4's for 2 s from the start of a migration's transfer."""
    d.traffic(16)
    d.wait_input(3000)
    ns2 = d.cluster.node(SOURCE).netns
    faults.partition(d.faults, ns2)
    d.fault("partitioned", f"{SOURCE} (traffic)")
    time.sleep(2.5)
    d.result.evidence[f"{SOURCE} drops"] = faults.partition_counters(ns2)
    d.faults.heal()
    d.wait_input(3000)
    ns4 = d.cluster.node(SPARE).netns

    def cut(phase: str) -> None:
        if phase == "transfer" and f"{SPARE} drops" not in d.result.evidence:
            faults.partition(d.faults, ns4)
            d.result.evidence[f"{SPARE} drops"] = "partitioned at transfer"
            faults.timer(d.faults, 2.0, f"heal {SPARE}", lambda: _counted_heal(d, ns4))

    d.migrate(SPARE, may_roll_back=True, on_phase=cut)
    d.faults.heal()
    if f"{SPARE} drops" not in d.result.evidence:
        raise FaultError("the migration never reached its transfer: node4 was not partitioned")


def _counted_heal(d: Drill, netns: str) -> None:
    d.result.evidence[f"{SPARE} drops"] = faults.partition_counters(netns)
    faults.heal_partition(netns)


NETEM = ["delay", "20ms", "10ms", "loss", "2%", "duplicate", "2%", "reorder", "10%", "corrupt",
         "1%"]  # fmt: skip


def netem(d: Drill) -> None:
    """tc netem (delay 20±10 ms, loss 2 %, duplication 2 %, reordering 10 %, corruption 1 %)
    on the table's node's link for 4 s under traffic. On a kernel without netem
    (CONFIG_NET_SCH_NETEM unset) what it still has: a tbf bandwidth limit, and nftables
    dropping 2 % and duplicating 2 % of packets at random; the detail names what could not
    be injected (delay, reordering, corruption)."""
    d.traffic(9)
    d.wait_input(3000)
    ns = d.cluster.node(SOURCE).netns
    try:
        faults.netem(d.faults, ns, NETEM)
        d.fault("netem", " ".join(NETEM))
        native = True
    except FaultError as err:
        if faults.netem_supported(err):
            raise
        native = False
        d.result.evidence["not_injected"] = ("delay, reordering, corruption: this kernel has no "
                                             "netem qdisc (CONFIG_NET_SCH_NETEM unset)")
        faults.lossy_link(d.faults, ns, loss_pct=2, dup_pct=2, rate="5mbit")
        d.fault("injected", "bandwidth 5 Mbit/s (tbf), loss 2 % each way, duplication 2 % (nft)")
    time.sleep(4.0)
    seen = faults.qdisc(ns)
    d.fault("qdisc", " ".join(seen.split()))
    if ("netem" if native else "tbf") not in seen:
        raise FaultError(f"no {'netem' if native else 'tbf'} qdisc on {ns}'s eth0: {seen}")
    if not native:
        counters = faults.lossy_counters(ns)
        d.fault("nft", counters)
        if "packets 0 " in counters:
            raise FaultError(f"a loss or duplication rule never matched: {counters}")
    d.faults.heal()


def corrupt_image(d: Drill) -> None:
    """The largest file of the source's sealed migration folder flipped after the dump: the
    destination's verification must refuse it and the migration roll back."""
    d.traffic(10)
    d.wait_input(3000)

    def corrupt(step: str) -> None:
        if step != "dumped":
            return
        m = d.current
        assert m is not None and m.source_bundle is not None
        folder = d.cluster.host_path(m.source, m.source_bundle)
        d.fault("corrupted", faults.corrupt_file(faults.largest_file(folder)))

    report = d.migrate(SPARE, may_roll_back=True, on_step=corrupt)
    if "corrupted" not in d.result.evidence:
        raise FaultError("the migration never reached its dump: nothing was corrupted")
    d.result.evidence["refused"] = report.error
    if not report.rolled_back:
        d.fail("a migration with a corrupted image completed (the corruption went unnoticed)")


def corrupt_bundle(d: Drill) -> None:
    """A checkpoint bundle of the table with one file corrupted: the restore must refuse it
    and change nothing; the intact bundle then restores and the stream goes on."""
    d.traffic(10)
    d.wait_input(3000)
    good = d.workdir / f"{d.name}-good.bundle"
    bad = d.workdir / f"{d.name}-bad.bundle"
    d.cluster.checkpoint(STAGE, good)
    d.fault("checkpointed", str(good))
    shutil.copytree(good, bad)
    d.fault("corrupted", faults.corrupt_file(faults.largest_file(bad / "images")
                                             if (bad / "images").is_dir()
                                             else faults.largest_file(bad)))  # fmt: skip
    try:
        d.cluster.restore(bad, node=SOURCE)
        d.fail("the restore of a corrupted bundle was accepted")
    except DpmigrateError as err:
        d.result.evidence["refused"] = str(err).splitlines()[0][:300]
    if d.stage():
        d.fail(f"a stage runs after the refused restore: {d.stage().get('pid')}")
    info = d.cluster.restore(good, node=SOURCE)
    d.result.evidence["restored_pid"] = info.get("pid")
    d.wait_input(2000)


def disk_full(d: Drill) -> None:
    """The destination's migrations folder is a 64 KiB tmpfs (its agent's view) during the
    transfer: the migration must roll back, the table run on where it was."""
    from dpmigrate.cluster import nodefs

    d.traffic(10)
    d.wait_input(3000)

    def fill(phase: str) -> None:
        if phase == "transfer" and "mount" not in d.result.evidence:
            folder = str(nodefs.node_dir(d.cluster.state_dir) / "migrations")
            agent = d.cluster.node(SPARE).agent_pid
            assert agent is not None
            d.fault("mount", faults.full_tmpfs(d.faults, agent, folder))

    report = d.migrate(SPARE, may_roll_back=True, on_phase=fill)
    if "mount" not in d.result.evidence:
        raise FaultError("the migration never reached its transfer: no disk was filled")
    d.result.evidence["refused"] = report.error
    d.faults.heal()
    if not report.rolled_back:
        d.fail("the migration completed onto a full disk")


def agent_restart(d: Drill) -> None:
    """node2's agent SIGKILLed under traffic and started again: the new agent adopts the
    running table (same PID, no restart), and can migrate it."""
    d.traffic(12)
    d.wait_input(3000)
    before = d.stage()
    old = d.cluster.node(SOURCE).agent_pid
    assert old is not None
    faults.kill(old)
    wait_for(lambda: not faults.alive(old), f"agent {old} to die", 10)
    d.cluster.restart_agent(SOURCE)  # waits for its keeper's restart (bounded)
    new = d.cluster.node(SOURCE).agent_pid
    d.fault("agents", {"killed": old, "started": new})
    if new in (None, old):
        d.fail(f"{SOURCE}'s agent was not started again after {old} was killed")
    after = d.on_node(SOURCE)
    d.result.evidence["table_pid"] = [before.get("pid"), after.get("pid")]
    if after.get("pid") != before.get("pid"):
        d.fail(f"the new agent did not adopt the table (pid {before.get('pid')} → "
               f"{after.get('pid')})")  # fmt: skip
    d.wait_input(2000)
    d.migrate(SPARE)


def etcd_restart(d: Drill) -> None:
    """etcd SIGKILLed for 1.5 s and started again under traffic, then again for 1 s from the
    start of a migration's transfer."""
    d.traffic(16)
    d.wait_input(3000)
    d.fault("traffic", faults.restart_etcd(d.cluster, 1.5))
    d.wait_input(3000)
    done: list[dict[str, Any]] = []

    def restart(phase: str) -> None:
        if phase == "transfer" and not done:
            done.append(faults.restart_etcd(d.cluster, 1.0))

    d.migrate(SPARE, may_roll_back=True, on_phase=restart)
    if not done:
        raise FaultError("the migration never reached its transfer: etcd was not restarted")
    d.result.evidence["migration"] = done[0]


#: CRIU's own fault points (criu/include/fault-injection.h, as zdtm's --fault uses them)
CRIU_DUMP_FAULTS = {"1": "FI_DUMP_EARLY", "3": "FI_DUMP_PAGES"}
#: (FI_RESTORE_ROOT_ONLY, 2, does nothing to a stage: its tree is one process)
CRIU_RESTORE_FAULTS = {"6": "FI_POST_RESTORE"}


def criu_fault(d: Drill) -> None:
    """CRIU_FAULT in the environment of the source's agent (dump points) or of the
    destination's (restore point), one run each: each migration must roll back cleanly.
    The node's keeper is restarted with the variable before the run starts (its agent, and
    the criu it runs, inherit it; a stage adopted by a new keeper could not be dumped)."""
    points = [(SOURCE, k, v) for k, v in CRIU_DUMP_FAULTS.items()]
    points += [(SPARE, k, v) for k, v in CRIU_RESTORE_FAULTS.items()]
    for node, code, name in points:
        d.end_traffic()
        pid = faults.restart_agent_with(d.cluster, node, {"CRIU_FAULT": code})
        d.faults.on_heal(f"{node}'s agent without CRIU_FAULT", _without_fault(d, node))
        seen = faults.agent_env(pid).get("CRIU_FAULT")
        if seen != code:
            raise FaultError(f"{node}'s agent {pid} runs without CRIU_FAULT={code} ({seen!r}): "
                             "the fault cannot reach its criu")  # fmt: skip
        d.traffic(7)
        d.wait_input(3000)
        d.fault(f"{name} ({code}) on {node}", f"agent {pid} CRIU_FAULT={seen}")
        report = d.migrate(SPARE, may_roll_back=True)
        d.result.evidence[f"{name} error"] = (report.error or "")[:300]
        if not report.rolled_back:
            d.fail(f"CRIU_FAULT={code} ({name}) on {node}: the migration completed anyway")
        d.end_traffic()
        d.faults.heal()


def _without_fault(d: Drill, node: str) -> Callable[[], None]:
    def heal() -> None:
        faults.restart_agent_with(d.cluster, node, {"CRIU_FAULT": ""})

    return heal


def strangers(d: Drill) -> None:
    """Unauthenticated clients and connect floods at every agent's port and every ring's
    (and statesync's) listening address, from the hub, while traffic flows."""
    d.traffic(8)
    d.wait_input(3000)
    rings, _ = d.cluster.store().get_prefix("rings/")
    targets = [f"{n.address}:{AGENT_PORT}" for n in d.cluster.nodes]
    targets += sorted({str(v["address"]) for v in rings.values() if v.get("address")})
    before = {s["name"]: (s.get("pid"), s.get("restarts")) for s in d.run.status()}  # type: ignore[union-attr]
    d.fault("targets", targets)
    report = faults.strangers(f"dpm{d.cluster.id}-hub", targets, seconds=4.0, flood=150)
    d.result.evidence["connections"] = sum(r.get("flood_connections", 0) for r in report.values())
    d.result.evidence["per_target"] = {t: {"flood": r.get("flood_connections"),
                                           "idle": r.get("idle_held"),
                                           "answers": {k: bool(p.get("answer"))
                                                       for k, p in r["probes"].items()}}
                                       for t, r in report.items()}  # fmt: skip
    if not d.result.evidence["connections"]:
        raise FaultError("no stranger got a connection: nothing was attacked")
    after = {s["name"]: (s.get("pid"), s.get("restarts")) for s in d.run.status()}  # type: ignore[union-attr]
    if after != before:
        d.fail(f"stages changed under the strangers: {before} → {after}")


DRILLS: dict[str, Callable[[Drill], None]] = {
    "migrate-loop": migrate_loop,
    "kill-source-agent-mid-migration": kill_source_agent_mid_migration,
    "kill-destination-agent-mid-migration": kill_destination_agent_mid_migration,
    "kill-stage": kill_stage,
    "pause-stage": pause_stage,
    "node-loss-with-standby": node_loss_with_standby,
    "partition-node": partition_node,
    "netem": netem,
    "corrupt-image": corrupt_image,
    "corrupt-bundle": corrupt_bundle,
    "disk-full": disk_full,
    "agent-restart": agent_restart,
    "etcd-restart": etcd_restart,
    "criu-fault": criu_fault,
    "strangers": strangers,
}


def describe(name: str) -> str:
    """The drill's one-line summary (its docstring's first sentence)."""
    doc = (DRILLS[name].__doc__ or "").strip()
    return " ".join(doc.split())
