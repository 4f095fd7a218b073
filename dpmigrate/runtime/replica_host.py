"""A replica of a stage: a process that holds the stage's state, kept current by the
state-synchronization protocol, ready to take over (DESIGN.md §5).

Two roles, one mechanism:

* ``standby`` — a hot standby named in the manifest (``standby = "node3"``). Its primary gates
  its input acknowledgements on it; when the primary's node dies, this node's agent promotes
  it (compare-and-swap of the placement's epoch) and wakes it.
* ``target`` — the destination of a ``statesync`` migration: it catches up while the source
  runs; the migration wakes it once the source is quiesced and the placement names this node.

A replica opens no ring: it only receives. It keeps its own journal in the run folder of its
node (the snapshot when one completes, then one record per applied point), so that once
promoted it is a primary like any other — a crash after the takeover restarts it from there.

Its control surface is the stage's: SIGUSR1 wakes it (take over: the placement must name this
node now), SIGTERM stops it. Its status file says ``phase: standby`` (or ``target``), with how
far it is and its lag behind the primary.
"""

from __future__ import annotations

import argparse
import signal
import time
from typing import Any

from dpmigrate import atomic
from dpmigrate.config import Config
from dpmigrate.errors import DpmigrateError
from dpmigrate.eventlog import EventLog
from dpmigrate.runtime import stagehost
from dpmigrate.runtime.journal import StageJournal
from dpmigrate.runtime.manifest import App
from dpmigrate.runtime.registry import LOCAL_AGENT, AgentResolver, stage_credential
from dpmigrate.statesync.point import Point
from dpmigrate.statesync.receiver import StateReceiver
from dpmigrate.statesync.state import Delta, State

#: How often a replica writes its status.
STATUS_INTERVAL_S = 0.2
#: The longest a replica's loop waits in the receiver: a wake (SIGUSR1) is noticed between
#: two steps, and a takeover's latency is the downtime of a statesync migration.
STEP_S = 0.005


class Takeover:
    """What a promoted replica hands to the stage host: the state and the point it is at."""

    def __init__(self, state: State, point: Point) -> None:
        self.state = state
        self.point = point


class ReplicaHost:
    """The replica process's loop."""

    def __init__(
        self,
        args: argparse.Namespace,
        settings: Config,
        log: EventLog,
        status_path: Any,
        journal: StageJournal,
    ) -> None:
        self.args = args
        self.role = args.role
        self.app = App.load(args.manifest, ring_capacity=settings.ring_capacity)
        self.spec = self.app.stage(args.stage)
        self.key = f"{self.app.name}/{self.spec.name}"
        self.log = log
        self.status_path = status_path
        self.journal = journal
        credential = stage_credential(self.app.name, self.spec.name, args.stage_key)
        self.resolver = AgentResolver(LOCAL_AGENT, credential)
        info = self.resolver.node_info()
        self.node = str(info["node"])
        self.flags = {"stop": False, "wake": False}
        state, point = self._resume()
        channel = stagehost.statesync_name(self.app.name, self.spec.name)
        secret = self.resolver.ring_key(channel).hex()  # the channel's own, not the token
        self.receiver = StateReceiver(
            self.key, secret, self.node, self._primary_address, role=self.role,
            state=state, point=point, log=log, on_snapshot=self._journal_snapshot,
            on_point=self._journal_point,
        )  # fmt: skip
        self.wake_refused: str | None = None

    # -- where the primary is; what we already hold -----------------------------------------
    def _primary_address(self) -> tuple[str, int]:
        name = stagehost.statesync_name(self.app.name, self.spec.name)
        endpoint = self.resolver.lookup(name, timeout=1.0)
        host, _, port = endpoint.address.rpartition(":")
        return host, int(port)

    def _resume(self) -> tuple[State | None, Point | None]:
        """A replica restarted on its node resumes from its journal (the primary then sends
        only what follows); a new one starts empty and gets a snapshot."""
        if self.journal.is_empty():
            return None, None
        state, inputs, outputs = self.journal.load()
        state.digest()  # see _journal_snapshot
        self.log("replica resumed from its journal", state_version=state.version)
        return state, Point(state.version, None, inputs, outputs)

    def _journal_snapshot(self, state: State, point: Point) -> None:
        self.journal.start_at(state, point.inputs, point.outputs)
        # Hash the whole state now, while the primary runs: from here on the digest follows
        # each applied delta, and the takeover reports it without hashing the state again.
        state.digest()

    def _journal_point(self, point: Point) -> None:
        deltas: list[Delta] = [point.delta] if point.delta is not None else []
        self.journal.append(deltas, point.inputs, point.outputs, None)

    # -- the loop -----------------------------------------------------------------------
    def run(self) -> Takeover | None:
        """Receive until woken (returns the takeover) or stopped (returns None)."""
        signal.signal(signal.SIGTERM, lambda *_: self.flags.update(stop=True))
        signal.signal(signal.SIGUSR1, lambda *_: self.flags.update(wake=True))
        self.log("replica started", role=self.role, node=self.node)
        next_status = 0.0
        while not self.flags["stop"]:
            if self.flags["wake"]:
                self.flags["wake"] = False
                takeover = self._take_over()
                if takeover is not None:
                    return takeover
            try:
                self.receiver.step(STEP_S)
            except DpmigrateError as err:  # the receiver reports and retries; never fatal
                self.log("replica step failed", level="warning", error=str(err))
                time.sleep(0.05)
            now = time.monotonic()
            if now >= next_status:
                self.write_status()
                next_status = now + STATUS_INTERVAL_S
        self.receiver.close()
        self.journal.close()
        self.write_status(phase="stopped")
        self.log("replica stopped")
        return None

    def _take_over(self) -> Takeover | None:
        """Woken: take over only with a complete state and only once the cluster store
        places the stage here; otherwise stay a replica and say why in the status."""
        problem = None
        if not self.receiver.synced or self.receiver.point is None:
            problem = "it holds no complete state yet (its snapshot has not arrived)"
        else:
            placed = self.resolver.placement(self.app.name).get(self.spec.name)
            if placed is None or placed.get("node") != self.node:
                problem = (
                    f"the cluster store places the stage on {placed and placed.get('node')}, "
                    f"not on {self.node}"
                )
        if problem is not None:
            self.wake_refused = problem
            self.log("replica not taking over", level="warning", reason=problem)
            self.write_status()
            return None
        self.receiver.close()
        self.journal.close()
        self.resolver.close()
        point = self.receiver.point
        assert point is not None
        self.log("replica taking over", role=self.role, state_version=point.version,
                 inputs=point.inputs, outputs=point.outputs)  # fmt: skip
        return Takeover(self.receiver.state, point)

    # -- reporting ----------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        point = self.receiver.point
        return {
            "stage": self.spec.name,
            "phase": self.role,
            "role": self.role,
            "node": self.node,
            "time": time.time(),
            "synced": self.receiver.synced,
            "state_version": self.receiver.state.version,
            "point": None if point is None else {
                "n": point.n, "version": point.version, "inputs": point.inputs,
                "outputs": point.outputs,
            },
            "lag": self.receiver.lag(),
            "sync": self.receiver.stats(),
            "wake_refused": self.wake_refused,
            "msgs_in": 0,
            "msgs_out": 0,
            "rings": [],
        }  # fmt: skip

    def write_status(self, **extra: Any) -> None:
        atomic.write_json(self.status_path, {**self.status(), **extra})
