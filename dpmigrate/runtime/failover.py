"""Hot standby on the agent's side: the standby record, and the takeover when a primary's
node dies (DESIGN.md §5).

The cluster store holds, per stage with standbys, ``standby/<app>/<stage>``::

    {"nodes": ["node3", ...],      # where standbys run, listed by the manifest or the operator
     "in_sync": ["node3"]}         # the ones the primary gates its acknowledgements on

Only the stage's current primary changes ``in_sync`` (:class:`MarkStandby`, checked against
the placement: node and epoch), and it marks a standby in sync only after it started to gate
on it — so a standby found in sync holds every point the primary ever acknowledged upstream.

Each agent watches the nodes' membership keys (``nodes/<name>``, on their leases). When the
node of a stage's primary is gone — its lease expired: the agent died, or was cut off or
paused for longer than the TTL — every agent with a standby of that stage that is in sync
and complete, on a node that is not cordoned (:mod:`dpmigrate.cluster.cordon`: a takeover is
a placement decision too), tries the takeover: a compare-and-swap of the placement from
(dead node, epoch) to (itself, epoch + 1). Exactly one wins; it takes itself out of the
record (it is the primary now; the other standbys must catch up with it before they gate
again) and wakes its standby, which opens the rings at its point and runs. The old primary,
if it comes back, is fenced by the epoch. This is Patroni's leader lease with the placement
as the leader key.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

from dpmigrate.cluster import cordon
from dpmigrate.cluster.store import PlacementConflict, Store, StoreUnavailable, Watch
from dpmigrate.errors import DpmigrateError, ProtocolError
from dpmigrate.runtime import stagehost
from dpmigrate.runtime.agent import StageRef
from dpmigrate.runtime.operations import Name

if TYPE_CHECKING:
    from dpmigrate.runtime.agent import Agent

#: How often the takeover conditions are checked even without a watch event.
CHECK_S = 0.5
#: Attempts at a compare-and-swap of the standby record before giving up.
_CAS_ATTEMPTS = 8


def record_key(app: str, stage: str) -> str:
    return f"standby/{app}/{stage}"


def update_record(store: Store, app: str, stage: str, change: Any) -> dict[str, Any]:
    """Read-modify-write the stage's standby record by compare-and-swap; ``change(record)``
    edits the dict in place. Returns what was written."""
    key = record_key(app, stage)
    for _ in range(_CAS_ATTEMPTS):
        found = store.get(key)
        value, revision = found if found is not None else ({}, 0)
        record = {"nodes": list(value.get("nodes", [])), "in_sync": list(value.get("in_sync", []))}
        change(record)
        if store.swap(key, revision, record):
            return record
    raise DpmigrateError(f"the standby record of {app}/{stage} kept changing; try again")


@dataclasses.dataclass(frozen=True)
class MarkStandby(StageRef):
    node: Name
    in_sync: bool
    epoch: int  # the caller's placement epoch: only the current primary may mark


class StandbyService:
    """The agent's standby operations and its failover watcher."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._refused: dict[str, str] = {}  # stage -> why it could not take over (logged once)
        self._watch: Watch | None = None
        self._thread = threading.Thread(target=self._run, name="failover", daemon=True)

    @property
    def store(self) -> Store:
        store = self.agent.store.store
        if store is None:
            raise DpmigrateError(f"node {self.agent.node}'s agent runs without a cluster store")
        return store

    # -- operations ---------------------------------------------------------------------
    def standbys(self, req: StageRef) -> dict[str, Any]:
        """From the agent's watched copy: a stage asks about once a second and must never
        wait for etcd (its loop would stall while etcd is away)."""
        with self.agent.store.changed:
            value = dict(self.agent.store.standbys.get(req.key, {}))
        return {"nodes": list(value.get("nodes", [])), "in_sync": list(value.get("in_sync", []))}

    def mark_standby(self, req: MarkStandby) -> dict[str, Any]:
        placed = self.store.placement(req.app, req.stage)
        if placed is None or placed.node != self.agent.node or placed.epoch != req.epoch:
            raise ProtocolError(
                f"only the current primary of {req.key} marks its standbys; the store places "
                f"it on {placed.node if placed else 'no node'} with epoch "
                f"{placed.epoch if placed else 0}, not on {self.agent.node} with epoch {req.epoch}"
            )

        def change(record: dict[str, Any]) -> None:
            in_sync = [n for n in record["in_sync"] if n != req.node]
            if req.in_sync and req.node in record["nodes"]:
                in_sync.append(req.node)
            record["in_sync"] = in_sync

        return update_record(self.store, req.app, req.stage, change)

    # -- the failover watcher -----------------------------------------------------------
    def start(self) -> None:
        if self.agent.store.store is None:
            return
        try:
            _, revision = self.store.get_prefix("nodes/")
        except StoreUnavailable:
            revision = 0
        self._watch = Watch(self.store, "nodes/", revision, self._on_node_event).start()
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._watch is not None:
            self._watch.stop()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)

    def _on_node_event(self, event: Any) -> None:
        if event.value is None:  # a node left (its lease expired or was revoked)
            self._wake.set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(CHECK_S)
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                self.check()
            except StoreUnavailable:
                pass  # no takeover without the store: that is the point of the lease
            except Exception as err:  # the watcher must survive anything; say what happened
                self.agent.log("failover check failed", level="error", error=repr(err))

    def _standbys_here(self) -> list[tuple[str, int]]:
        """(key, pid) of each standby replica this agent runs."""
        found = []
        with self.agent.lock:
            for key, proc in self.agent.supervisor.stages.items():
                if self.agent.roles.get(key) == "standby" and not proc.finished:
                    pid = proc.stage_pid
                    if pid is not None:
                        found.append((key, pid))
        return found

    def check(self) -> None:
        standbys = self._standbys_here()
        if not standbys:
            return
        live, _ = self.store.get_prefix("nodes/")
        live_nodes = {k.rsplit("/", 1)[1] for k in live}
        for key, pid in standbys:
            app, _, stage = key.partition("/")
            placed = self.store.placement(app, stage)
            if placed is None:
                continue
            if placed.node == self.agent.node:  # we won earlier but the wake was lost
                self._wake_replica(key, pid, placed.epoch, time.time())
                continue
            if placed.node in live_nodes:
                self._refused.pop(key, None)
                continue
            self._take_over(key, pid, app, stage, placed)

    def _take_over(self, key: str, pid: int, app: str, stage: str, placed: Any) -> None:
        started = time.time()
        found = self.store.get(record_key(app, stage))  # fresh: it decides a takeover
        record, revision = found if found is not None else ({}, 0)
        why = self._not_ready(key, app, stage, record)
        if why is not None:
            if self._refused.get(key) != why:
                self._refused[key] = why
                self.agent.log("standby cannot take over", level="warning", stage=key,
                               dead_node=placed.node, reason=why)  # fmt: skip
            return
        try:  # only if nobody moved the stage and its primary did not drop us meanwhile
            now = self.store.place(app, stage, self.agent.node, placed,
                                   unchanged={record_key(app, stage): revision})  # fmt: skip
        except PlacementConflict:
            return  # another standby (or an operator, or the primary's drop) was first
        me = self.agent.node

        def leave(record: dict[str, Any]) -> None:
            record["nodes"] = [n for n in record["nodes"] if n != me]
            record["in_sync"] = []  # the others gate again once caught up with the new primary

        try:
            update_record(self.store, app, stage, leave)
        except DpmigrateError as err:
            self.agent.log("standby record not updated", level="warning", stage=key,
                           error=str(err))  # fmt: skip
        self.agent.log("failover", stage=key, dead_node=placed.node, epoch=now.epoch)
        self._wake_replica(key, pid, now.epoch, started)

    def _not_ready(self, key: str, app: str, stage: str, record: dict[str, Any]) -> str | None:
        if cordon.is_cordoned(self.store, self.agent.node):  # read fresh: it decides a takeover
            return (f"its node is cordoned (unschedulable); `dpmigrate uncordon "
                    f"{self.agent.node}` lets it take over")  # fmt: skip
        if self.agent.node not in record.get("in_sync", []):
            return "it is not in sync (its primary did not gate on it)"
        _manifest, run_dir, _model = self.agent.stage_args[key]
        status = stagehost.read_status(run_dir, stage)
        if not status.get("synced"):
            return "it holds no complete state"
        return None

    def _wake_replica(self, key: str, pid: int, epoch: int, started: float) -> None:
        self.agent.took_over(key)
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            self.agent.log("standby gone before its wake", level="warning", stage=key)
            return
        self.agent.log("standby woken to take over", stage=key, epoch=epoch,
                       decided_s=round(time.time() - started, 4))  # fmt: skip


def register(agent: Agent) -> StandbyService:
    service = StandbyService(agent)
    agent.operations.register("standbys", StageRef, service.standbys)
    agent.operations.register("mark_standby", MarkStandby, service.mark_standby)
    return service
