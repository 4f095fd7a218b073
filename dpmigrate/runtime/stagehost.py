"""One stage in its own process: `python -m dpmigrate.runtime.stagehost`.

It loads the app, resumes the stage from its journal (state, input and output positions),
opens its rings — shm to stages on the same node, tcp to stages on other nodes — finding
peers by ring name through the run's registry, and runs batches until its inputs end (or, for a
source, until it finishes). It writes a status file about twice a second.

Signals, the stage's whole control surface (nothing else reaches into a running stage):

* SIGTERM (twelve-factor disposability): the current batch finishes, the point is persisted as
  far as downstream acknowledged it, the rings are detached (not closed: the peers wait for a
  new instance) and the process exits 0.
* SIGUSR2 — *quiesce* before a checkpoint (DESIGN.md §4): stop taking input, hand every output
  to its ring and wait until downstream acknowledged all of it, persist, acknowledge the
  inputs, detach every ring and close every file and socket, so the process holds no
  connection to anything outside it. Status phase ``quiesced``; then it sleeps in
  ``sigwaitinfo``.
* SIGUSR1 — *wake* (after a restore, maybe on another node, or to resume in place): ask the
  local agent (the one of whatever network namespace it now runs in) where the peers are and
  reopen the rings from the same positions. Status phase ``running``.

The stage's output goes to its log file by open-append-close per event, never through an open
descriptor, so a checkpointed image does not hold a file that keeps growing (CRIU refuses to
restore a file whose size changed).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpmigrate import atomic, config, transports
from dpmigrate.config import Config
from dpmigrate.errors import ConfigError, DpmigrateError
from dpmigrate.eventlog import EventLog
from dpmigrate.runtime.control import Credential
from dpmigrate.runtime.journal import Positions, StageJournal
from dpmigrate.runtime.manifest import App, RingSpec
from dpmigrate.runtime.registry import (
    LOCAL_AGENT,
    STAGE_KEY_ENV,
    AgentResolver,
    stage_credential,
)
from dpmigrate.runtime.runner import StageRunner
from dpmigrate.statesync.gate import StandbyGate
from dpmigrate.statesync.point import Point, point_number
from dpmigrate.statesync.sender import StateSender
from dpmigrate.transports.base import RingReceiver, RingSender
from dpmigrate.transports.resolver import DirectoryResolver, Endpoint, Resolver
from dpmigrate.transports.tcp import tls_context_from_pem

if TYPE_CHECKING:
    from dpmigrate.runtime.replica_host import ReplicaHost, Takeover

STATUS_INTERVAL_S = 0.2
#: The roles of a replica of a stage (DESIGN.md §5): a hot standby, a statesync migration's
#: target. Everything else runs as the stage itself, its primary.
ROLES = ("standby", "target")
#: Exit status of a stage instance that found itself stale (its placement moved on): the
#: supervisor must not restart it.
FENCED_EXIT = 3
#: How long a quiesce may wait for downstream to acknowledge everything before it gives up
#: (the stage then keeps running where it is).
QUIESCE_TIMEOUT_S = 15.0
#: How long a quiesce waits for its replicas (a migration's target) to apply the last point.
REPLICA_SYNC_TIMEOUT_S = 5.0
#: How long a gating standby may stay disconnected before the primary records it out of sync
#: and acknowledges inputs without it again (meanwhile it acknowledges nothing).
STANDBY_DROP_S = 5.0
#: The longest the loop blocks in a ring: a signal (quiesce, stop) is obeyed between two
#: waits, so this bounds how late a quiesce starts — part of a migration's downtime.
LOOP_WAIT_S = 0.01
#: How often a primary waiting for a lost standby asks whether it was itself replaced.
FENCE_CHECK_S = 0.25


def ring_transport(
    app: App, ring: RingSpec, model: str, placement: dict[str, str] | None = None
) -> str:
    """The transport a ring uses in ``model``: the manifest's hint, else by locality — shm
    between stages on one node, tcp between nodes. ``placement`` (stage → node) is where the
    stages are now; it differs from the manifest after a migration, and then a ring that
    was shm continues as tcp (or back), its sequence numbers continuing.

    A ring of a stage with a standby is tcp even within one node: a failover moves the stage
    while its node is dead, so no peer can be asked to reopen its ring the other way."""
    if ring.transport != "auto":
        return ring.transport
    if model == "in-process":
        return "mem"
    if model == "multi-process":
        return "shm"
    if app.stage(ring.src_stage).standbys or app.stage(ring.dst_stage).standbys:
        return "tcp"
    where = placement or {}
    src = where.get(ring.src_stage, app.stage(ring.src_stage).node)
    dst = where.get(ring.dst_stage, app.stage(ring.dst_stage).node)
    return "shm" if src == dst else "tcp"


def peers_changing_transport(
    app: App, stage: str, before: dict[str, str], after: dict[str, str]
) -> set[str]:
    """The stages whose ring to ``stage`` changes transport (shm <-> tcp) when the placement
    goes from ``before`` to ``after``: they must reopen that ring the new way."""
    peers = set()
    for ring in app.rings:
        if stage not in (ring.src_stage, ring.dst_stage):
            continue
        peer = ring.dst_stage if ring.src_stage == stage else ring.src_stage
        if ring_transport(app, ring, "multi-node", before) != ring_transport(
            app, ring, "multi-node", after
        ):
            peers.add(peer)
    return peers


def command(
    manifest: str, stage: str, run_dir: str, model: str, registry: str = "dir",
    role: str = "primary",
) -> list[str]:  # fmt: skip
    """The arguments after ``python`` that run ``stage`` in a process of its own (``role``:
    ``primary``, or a replica: ``standby``, ``target``)."""
    argv = ["-m", "dpmigrate.runtime.stagehost", "--manifest", manifest, "--stage", stage,
            "--run-dir", run_dir, "--model", model, "--registry", registry]  # fmt: skip
    return argv if role == "primary" else [*argv, "--role", role]


def status_path(run_dir: str | Path, stage: str) -> Path:
    """Where a stage writes its status (about five times a second)."""
    return Path(run_dir) / "status" / f"{stage}.json"


def read_status(run_dir: str | Path, stage: str) -> dict[str, Any]:
    """A stage's last status ({} before it wrote one)."""
    try:
        return json.loads(status_path(run_dir, stage).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


class Fenced(DpmigrateError):
    """This instance of the stage is stale: the cluster store places the stage elsewhere or
    with a newer epoch. It must stop without emitting, acknowledging or persisting."""


def ring_name(app: App, ring: RingSpec) -> str:
    return f"{app.name}.{ring.name}"


def statesync_name(app: str, stage: str) -> str:
    """The registry name under which a primary publishes its state-synchronization server."""
    return f"{app}.{stage}.statesync"


class StageHost:
    """The stage process: rings, runner, journal, signals.

    ``settings`` is what :func:`main` read from the environment: the capacity of a ring the
    manifest gives none (``ring_capacity``), how long a ring end waits for a lost peer
    (``reconnect_timeout``) and the log level. A stage under an agent reaches it with its
    own key, never the cluster token.
    ``log`` is the stage's event stream (default: its ``--log`` file, else stdout, at
    ``settings.log_level``).
    """

    def __init__(
        self,
        args: argparse.Namespace,
        settings: Config,
        log: EventLog | None = None,
        takeover: Takeover | None = None,
    ) -> None:
        """``takeover``: this process was a replica and now takes over the stage from the
        state and point it holds (its journal is already there)."""
        self.args = args
        self.settings = settings
        self.app = App.load(args.manifest, ring_capacity=settings.ring_capacity)
        self.spec = self.app.stage(args.stage)
        self.log = log or EventLog(
            settings.log_level, write=event_writer(args.log), stage=self.spec.name
        )
        self.run_dir = Path(args.run_dir)
        self.journal = StageJournal(self.run_dir / "stages" / self.spec.name)
        self.status_path = status_path(self.run_dir, self.spec.name)
        self.status_path.parent.mkdir(parents=True, exist_ok=True)
        self.phase = "starting"
        self.woken: dict[str, Any] | None = None
        self.flags = {"stop": False, "quiesce": False}
        self.resolver: Resolver | None = None
        self.placement: dict[str, str] = {}  # stage -> node, where the store says they are
        self.epoch = 0
        self.node: str | None = None
        self.host: str | None = None  # this node's address, for tcp rings
        self.sender: StateSender | None = None
        self.gate: StandbyGate | None = None
        self._marks: AgentResolver | None = None  # the gate's own connection to the agent
        self._tls: dict[bool, Any] = {}  # ring_tls: the producer's and the consumer's context
        self.credential: Credential | None = None  # this stage's own, when it uses an agent
        self._next_fence_check = 0.0
        self.check_placement()  # before anything is read or written: a stale copy stops here
        if takeover is None:
            state, in_pos, out_pos = self.journal.load()
        else:
            state, in_pos, out_pos = takeover.state, takeover.point.inputs, takeover.point.outputs
        inputs, outputs = self.open_rings(in_pos, out_pos)
        service = self.app.service_class(self.spec.name)()
        self.runner = StageRunner(
            self.spec.name, service, inputs, outputs, state=state, config=self.spec.config,
            batch=self.spec.batch, journal=self.journal, on_commit=self._publish,
        )  # fmt: skip
        self.start_sync(in_pos, out_pos)
        if takeover is not None:
            self.woken = {"at": time.time(), "node": self.node, "state_version": state.version,
                          "state_digest": state.digest(), "inputs": in_pos, "outputs": out_pos,
                          "took_over": True}  # fmt: skip
        self.event("stage started", state_version=state.version, inputs=in_pos, outputs=out_pos,
                   took_over=takeover is not None)  # fmt: skip

    # -- rings --------------------------------------------------------------------------
    def open_rings(
        self, in_pos: Positions, out_pos: Positions
    ) -> tuple[dict[str, RingReceiver], dict[str, RingSender]]:
        """Open every ring end at the given positions, producers first (they are the servers
        their consumers look up)."""
        args, app = self.args, self.app
        assert self.resolver is not None
        host, placement = self.host, self.placement
        outputs: dict[str, RingSender] = {}
        inputs: dict[str, RingReceiver] = {}
        reconnect = self.settings.reconnect_timeout
        for ring in app.rings:
            if ring.src_stage == self.spec.name:
                transport = ring_transport(app, ring, args.model, placement)
                extra = (self._tcp_options(ring_name(app, ring), server_side=True)
                         if transport == "tcp" else {})  # fmt: skip
                if transport == "tcp" and host:
                    extra["host"] = host
                tx = outputs[ring.src_port] = transports.open_sender(
                    transport, ring_name(app, ring), resolver=self.resolver,
                    capacity=ring.capacity, next_seq=out_pos.get(ring.src_port, 0),
                    reconnect_timeout=reconnect, **extra,
                )  # fmt: skip
                self._ring_opened(tx, ring.src_port, out_pos.get(ring.src_port, 0))
        for ring in app.rings:
            if ring.dst_stage == self.spec.name:
                transport = ring_transport(app, ring, args.model, placement)
                extra = (self._tcp_options(ring_name(app, ring), server_side=False)
                         if transport == "tcp" else {})  # fmt: skip
                if transport == "tcp":
                    extra["before_reconnect"] = self._before_reconnect
                rx = inputs[ring.dst_port] = transports.open_receiver(
                    transport, ring_name(app, ring),
                    resolver=self.resolver, auto_commit=False,
                    next_expected=in_pos.get(ring.dst_port, 0), connect_timeout=60.0,
                    reconnect_timeout=reconnect, **extra,
                )  # fmt: skip
                self._ring_opened(rx, ring.dst_port, in_pos.get(ring.dst_port, 0))
        return inputs, outputs

    def _tcp_options(self, name: str, server_side: bool) -> dict[str, Any]:
        """A tcp ring under an agent is authenticated: both ends fetch its credential from
        their agents, so a stranger that reaches the port cannot take the consumer's place.
        With ring_tls the link is TLS too (the agent hands over the rings' certificate)."""
        if not isinstance(self.resolver, AgentResolver):
            return {}
        options: dict[str, Any] = {"key": self.resolver.ring_key(name)}
        if self.settings.ring_tls:
            if server_side not in self._tls:
                pem = self.resolver.ring_tls()
                self._tls[server_side] = tls_context_from_pem(
                    pem["ca"], pem["cert"], pem["key"], server_side=server_side
                )
            options["tls"] = self._tls[server_side]
        return options

    def _ring_opened(self, end: RingSender | RingReceiver, port: str, position: int) -> None:
        """A debug event per ring end opened, with what it got (a consumer learns the
        capacity, the producer's, only when it connects). A shm ring that wanted 2 MB
        pages and got 4 KB ones says so: a warning when a reservation was short, info when
        the host has none reserved at all."""
        fallback = None
        if end.transport == "shm" and isinstance(end, RingSender):  # the one that maps memory
            fallback = end.statistics().extra.get("page_fallback")
        if fallback:
            level = "info" if fallback.startswith("no 2 MB") else "warning"
            self.log("ring on 4 KB pages", level=level, ring=end.name, port=port, why=fallback)
        if not self.log.enabled("debug"):
            return
        stats = end.statistics()
        got = {"capacity": stats.capacity} if stats.role == "producer" else {}
        self.log("ring opened", level="debug", ring=stats.name, port=port, role=stats.role,
                 transport=stats.transport, reconnect_timeout=stats.reconnect_timeout,
                 position=position, **got)  # fmt: skip

    def check_placement(self) -> None:
        """Ask the local agent where the app's stages are (fresh from the cluster store) and
        which epoch this stage has; raise Fenced when the store places it on another node.

        Called at the start and at every wake, before the journal is touched: a copy restored
        from an old bundle, or a source woken after its migration, stops here."""
        if self.args.registry != "agent":
            if self.resolver is None:
                self.resolver = DirectoryResolver(self.run_dir / "registry")
            return
        if not isinstance(self.resolver, AgentResolver):
            self.credential = stage_credential(self.app.name, self.spec.name,
                                               self.args.stage_key)  # fmt: skip
            self.resolver = AgentResolver(LOCAL_AGENT, self.credential)
        info = self.resolver.node_info()
        self.node, self.host = str(info["node"]), str(info["address"])
        stages = self.resolver.placement(self.app.name)
        self.placement = {name: str(p["node"]) for name, p in stages.items()}
        mine = stages.get(self.spec.name)
        if mine is None:  # an agent without a cluster store: nothing to fence against
            return
        if mine["node"] != self.node:
            self.event("stage fenced", level="warning", node=self.node, epoch=self.epoch,
                       placed_on=mine["node"], placed_epoch=mine["epoch"])  # fmt: skip
            atomic.write_json(self.status_path, {
                "stage": self.spec.name, "phase": "fenced", "time": time.time(),
                "stale": {"node": self.node, "epoch": self.epoch, "placed_on": mine["node"],
                           "placed_epoch": mine["epoch"]},
            })  # fmt: skip
            raise Fenced(
                f"stage {self.app.name}/{self.spec.name} on {self.node} (epoch {self.epoch}) is "
                f"stale: the cluster store places it on {mine['node']} with epoch "
                f"{mine['epoch']}; this copy stops without emitting, acknowledging or persisting"
            )
        self.epoch = int(mine["epoch"])
        self.resolver.owner = (f"{self.app.name}/{self.spec.name}", self.epoch)

    # -- state synchronization (DESIGN.md §5) --------------------------------------------
    def start_sync(self, in_pos: Positions, out_pos: Positions) -> None:
        """In a cluster, serve the stage's state to its replicas — its standbys, a statesync
        migration's target — and gate the persisted points on the standbys in sync."""
        if not isinstance(self.resolver, AgentResolver) or self.host is None:
            return
        state = self.runner.state
        start = Point(state.version, None, in_pos, out_pos)
        key = f"{self.app.name}/{self.spec.name}"
        name = statesync_name(self.app.name, self.spec.name)
        secret = self.resolver.ring_key(name).hex()  # the channel's own, not the token
        # The start point's outputs are acknowledged (a persisted point, a replica's safe one
        # or a drained quiesce); later points are marked safe as downstream acknowledges them.
        self.sender = StateSender(key, secret, state, start, host=self.host, log=self.log,
                                  marks_safe=True)  # fmt: skip
        self.runner.on_outputs_acked = self.sender.mark_safe
        host, port = self.sender.address
        self.resolver.register(name, Endpoint("statesync", f"{host}:{port}", time.time_ns()))
        marks = AgentResolver(LOCAL_AGENT, self.credential)  # its own connection
        marks.owner = self.resolver.owner
        self.gate = StandbyGate(self.app.name, self.spec.name, self.sender, self.resolver,
                                STANDBY_DROP_S, self.log, marks=marks)  # fmt: skip
        self._marks = marks
        self.runner.gate = self.gate.allowed

    def _before_reconnect(self) -> None:
        """A consumer end is about to connect again. After a stall (this copy was paused or
        starved while standbys gate) a standby may have taken over meanwhile: connecting
        would take the producer's link from the new primary, so check first (Fenced)."""
        self.revalidate_if_stalled()

    def revalidate_if_stalled(self) -> None:
        """Paused or starved while standbys gate: one of them may have taken over meanwhile.
        Nothing is persisted (the gate says so) until this copy checked its placement
        (Fenced if it was replaced)."""
        if self.gate is not None and self.gate.stalled:
            self.check_placement()
            self.gate.revalidated()

    def stop_sync(self) -> None:
        if self.gate is not None:
            self.gate.close()
        if self._marks is not None:
            self._marks.close()
            self._marks = None
        if self.sender is not None:
            self.sender.close()
        self.sender = None
        self.gate = None
        self.runner.gate = None
        self.runner.on_outputs_acked = None

    def _publish(self, point: Point) -> None:
        if self.sender is not None:
            self.sender.publish(point, self.runner.state)

    def serve_sync(self) -> None:
        """From the idle loop: a snapshot asked for meanwhile, the gating standbys, and — while
        a gating standby is lost — whether this copy was replaced (then it stops, Fenced)."""
        if self.sender is None or self.gate is None:
            return
        self.sender.poll(self.runner.state)
        self.gate.update(self.runner.persisted_n)
        if self.gate.waiting_for() and time.monotonic() >= self._next_fence_check:
            self._next_fence_check = time.monotonic() + FENCE_CHECK_S
            self.check_placement()

    def sync_replicas(self) -> dict[str, Any]:
        """Quiescing: wait until every connected replica applied the last point (bounded)."""
        if self.sender is None:
            return {}
        in_pos, out_pos = self.positions()
        last = point_number(self.runner.state.version, in_pos, out_pos)
        acked, sent = {}, {}
        for replica in self.sender.replicas():
            if replica.get("connected"):
                node = str(replica["node"])
                self.sender.wait_acked(node, last, REPLICA_SYNC_TIMEOUT_S)
                acked[node] = self.sender.acked(node)
        for replica in self.sender.replicas():
            sent[str(replica["node"])] = replica.get("bytes_sent")
        return {"n": last, "acked": acked, "bytes_sent": sent}

    def positions(self) -> tuple[Positions, Positions]:
        r = self.runner
        return (
            {port: rx.next_expected for port, rx in r.inputs.items()},
            {port: tx.next_seq for port, tx in r.outputs.items()},
        )

    def detach_all(self) -> None:
        for end in [*self.runner.outputs.values(), *self.runner.inputs.values()]:
            end.detach()
        if isinstance(self.resolver, AgentResolver):
            self.resolver.close()

    # -- the loop -----------------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self.flags.update(stop=True))
        signal.signal(signal.SIGUSR2, lambda *_: self.flags.update(quiesce=True))
        self.phase = "running"
        runner = self.runner
        next_status = 0.0
        while not runner.done and not self.flags["stop"]:
            self.revalidate_if_stalled()
            if self.flags["quiesce"]:
                self.flags["quiesce"] = False
                self.quiesce_and_wait()
                continue
            if not runner.step(wait=LOOP_WAIT_S) and not runner.done:
                # Idle: serve the output rings (a reconnecting consumer, acks), then persist.
                for tx in runner.outputs.values():
                    tx.service(0.005)
                self.serve_sync()
                runner.persist()
            elif self.gate is not None:
                self.gate.update(runner.persisted_n)
            now = time.monotonic()
            if now >= next_status:
                self.write_status()
                next_status = now + STATUS_INTERVAL_S
        return self.finish()

    def finish(self) -> int:
        """A finished stream closes the rings (downstream sees EndOfRing); a stage told to
        stop detaches instead, so a restarted or moved instance resumes from its journal."""
        runner = self.runner
        runner.persist()
        self.stop_sync()
        if runner.done:
            for rx in runner.inputs.values():
                rx.close()
        else:
            self.detach_all()
        self.journal.close()
        self.phase = "finished" if runner.done else "stopped"
        self.write_status()
        self.event("stage stopped", done=runner.done)
        return 0

    # -- quiesce and wake ---------------------------------------------------------------
    def drain(self, timeout: float) -> bool:
        """Everything out and acknowledged, inputs acknowledged up to the same point."""
        runner = self.runner
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.gate is not None:
                self.gate.update(runner.persisted_n)
            runner.persist()
            outbox_empty = runner.flush(wait=0.01)
            acked = all(tx.acked >= tx.next_seq for tx in runner.outputs.values())
            if outbox_empty and acked:
                runner.persist()
                if runner.settled or self.gate is None or not self.gate.gating:
                    return runner.settled
                # the last points wait for a gating standby's acknowledgement (its thread
                # receives it): look again shortly
            for tx in runner.outputs.values():
                tx.service(0.005)
            if not runner.outputs:
                time.sleep(0.001)
        return False

    def quiesce_and_wait(self) -> None:
        started = time.monotonic()
        if not self.drain(QUIESCE_TIMEOUT_S):
            self.event("quiesce failed", level="warning", reason="downstream did not "
                       f"acknowledge within {QUIESCE_TIMEOUT_S} s; still running")  # fmt: skip
            self.write_status(quiesce_error="downstream did not acknowledge in time")
            return
        in_pos, out_pos = self.positions()
        replicas = self.sync_replicas()
        self.stop_sync()
        self.detach_all()
        self.journal.close()
        self.phase = "quiesced"
        self.write_status(quiesced={"inputs": in_pos, "outputs": out_pos, "replicas": replicas,
                                    "drain_s": round(time.monotonic() - started, 4)})  # fmt: skip
        self.event("stage quiesced", inputs=in_pos, outputs=out_pos)
        # Sleep until woken (SIGUSR1) — a checkpoint is taken while we sit here — or stopped.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGTERM})
        try:
            info = signal.sigwaitinfo({signal.SIGUSR1, signal.SIGTERM})
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1, signal.SIGTERM})
        if info.si_signo == signal.SIGTERM:
            self.flags["stop"] = True
        # CRIU restores the parent-death signal `unshare --kill-child` gave us, but after a
        # restore our parent is the restoring agent's (short-lived) thread: drop it.
        _clear_parent_death_signal()
        if self.flags["stop"]:
            self.phase = "stopped"
            self.write_status()
            return
        self.check_placement()  # moved meanwhile? then this copy is stale (raises Fenced)
        in_pos, out_pos = self.catch_up_with_journal(in_pos, out_pos)
        inputs, outputs = self.open_rings(in_pos, out_pos)
        self.runner.inputs, self.runner.outputs = inputs, outputs
        self.start_sync(in_pos, out_pos)
        self.phase = "running"
        node = self.node_name()
        # Kept in every later status: whoever woke us reads the state as it was at the wake,
        # even if batches (and status writes) follow at once.
        self.woken = {"at": time.time(), "node": node, "state_version": self.runner.state.version,
                      "state_digest": self.runner.state.digest(), "inputs": in_pos,
                      "outputs": out_pos}  # fmt: skip
        self.event("stage woken", inputs=in_pos, outputs=out_pos, node=node)
        self.write_status()

    def catch_up_with_journal(
        self, in_pos: Positions, out_pos: Positions
    ) -> tuple[Positions, Positions]:
        """Woken from an older checkpoint while the original ran on (``--leave-running``):
        the journal then holds a later persisted point, and the upstream producers no longer
        retain the inputs between the two. Continue from the journal's point: same state the
        original had there, same positions, so nothing is lost or duplicated."""
        state, j_in, j_out = self.journal.load()
        if state.version <= self.runner.state.version:
            return in_pos, out_pos
        self.event("caught up with journal", from_version=self.runner.state.version,
                   to_version=state.version)  # fmt: skip
        self.runner.state = state
        self.runner.service.setup(state, dict(self.spec.config))
        return {**in_pos, **j_in}, {**out_pos, **j_out}

    def node_name(self) -> str | None:
        return self.node

    # -- reporting ----------------------------------------------------------------------
    def event(self, name: str, *, level: str = "info", **fields: Any) -> None:
        """One event in the stage's log, if ``level`` is at or above the configured one."""
        self.log(name, level=level, **fields)

    def write_status(self, **extra: Any) -> None:
        runner = self.runner
        data = {
            "stage": runner.name,
            "phase": self.phase,
            "host_pid_ns_pid": os.getpid(),
            "state_version": runner.state.version,
            "state_digest": runner.state.digest(),
            "msgs_in": runner.stats.msgs_in,
            "msgs_out": runner.stats.msgs_out,
            "batches": runner.stats.batches,
            "done": runner.done,
            "input_gaps": [list(g) for g in runner.stats.gaps],
            "metrics": runner.metrics(),
            "rings": [end.statistics().as_dict()
                      for end in [*runner.inputs.values(), *runner.outputs.values()]],
            "time": time.time(),
            "woken": self.woken,
            "epoch": self.epoch,
            "role": "primary",
            "standbys": self.gate.status() if self.gate is not None else [],
            "replicas": self.sender.replicas() if self.sender is not None else [],
            **extra,
        }  # fmt: skip
        atomic.write_json(self.status_path, data)


def _clear_parent_death_signal() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, 0, 0, 0, 0)  # PR_SET_PDEATHSIG, none


def event_writer(path: str | None) -> Callable[[str], None]:
    """Where a stage's event lines go: appended to ``path`` — opened and closed per line, so
    no checkpoint holds a growing file — or, without one, printed on stdout."""
    if path is None:
        return lambda line: print(line, flush=True)

    def append(line: str) -> None:
        with open(path, "a") as log:
            log.write(line + "\n")

    return append


def _quiet_stdio() -> None:
    """Point stdout/stderr at /dev/null: the image then holds no growing log descriptor."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpmigrate.runtime.stagehost")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--stage", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--model", required=True, choices=["multi-process", "multi-node"])
    parser.add_argument(
        "--registry",
        choices=["dir", "agent"],
        default="dir",
        help="where ring endpoints are registered: the run folder or the agent",
    )
    parser.add_argument("--log", help="append the stage's events here (else stdout)")
    parser.add_argument(
        "--role",
        choices=["primary", *ROLES],
        default="primary",
        help="run the stage, or a replica of it: a hot standby, a statesync migration's target",
    )
    args = parser.parse_args(argv)
    # the stage's own key from its agent: read once, and not passed on to any child
    args.stage_key = os.environ.pop(STAGE_KEY_ENV, "")
    try:  # the environment is read here, once (DESIGN.md §9), and passed down
        settings = config.load()
    except ConfigError as err:
        print(f"stage {args.stage}: {err}", file=sys.stderr, flush=True)
        return 2
    log = EventLog(settings.log_level, write=event_writer(args.log), stage=args.stage)
    try:
        takeover = None
        if args.role in ROLES:
            if args.log:
                _quiet_stdio()
            takeover = replica(args, settings, log).run()
            if takeover is None:
                return 0
        host = StageHost(args, settings, log, takeover)
        if args.log:
            _quiet_stdio()
        return host.run()
    except Fenced as err:
        _last_word(log("stage stopped: fenced", level="warning", reason=str(err)))
        return FENCED_EXIT
    except Exception as err:
        text = "".join(traceback.format_exception(err))
        _last_word(log("stage failed", level="error", error=str(err), traceback=text))
        return 1


def replica(args: argparse.Namespace, settings: Config, log: EventLog) -> ReplicaHost:
    """The replica loop of this stage, with the journal and status file a primary uses."""
    from dpmigrate.runtime.replica_host import ReplicaHost

    if args.registry != "agent":
        raise ConfigError("a replica needs a cluster (--registry agent) to find its primary")
    run_dir = Path(args.run_dir)
    folder = status_path(run_dir, args.stage)
    folder.parent.mkdir(parents=True, exist_ok=True)
    return ReplicaHost(args, settings, log, folder, StageJournal(run_dir / "stages" / args.stage))


def _last_word(line: str | None) -> None:
    """Why the stage ends, also on stderr (the supervisor's log of an early failure)."""
    if line is not None:
        print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
