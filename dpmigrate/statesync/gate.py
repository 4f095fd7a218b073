"""Which points a primary with hot standbys may persist (DESIGN.md §5, exactly-once).

A standby can take over without loss only if upstream still retains every input after the
standby's point. So the primary acknowledges its inputs (persists a point) only up to the
point each *gating* standby has acknowledged. Which standbys gate is recorded in the cluster
store (``standby/<app>/<stage>``: ``nodes`` listed, ``in_sync`` gating), because the agent
that promotes a standby after its primary's node died must know the standby is complete:

* a listed standby starts to gate once it has acknowledged every point persisted so far; the
  primary gates on it first and records it as in sync after (never the other way round);
* a gating standby that stays disconnected longer than ``drop_after`` is recorded as out of
  sync first, and only then stops gating — until then the primary acknowledges nothing more
  (upstream holds what follows; its rings fill and it waits), which is the price of never
  losing a message to a failover;
* a primary (re)starting gates at once on every standby the store says is in sync.

The record is read through the stage's agent, about once a second, from the agent's watched
copy; writes go through the agent too, which accepts them only from the stage's current
placement (node and epoch), and are made by a thread of the gate's own (:class:`_Marker`):
a write goes to etcd, and the stage's loop never waits for etcd.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from dpmigrate.errors import DpmigrateError

if TYPE_CHECKING:
    from dpmigrate.statesync.sender import StateSender

#: How often the standby record is read again (standbys added or removed by the operator).
REFRESH_S = 1.0
#: How often the loop's update looks at the replicas (it runs after every batch).
UPDATE_S = 0.01
#: A primary whose loop did not run for this long (paused, frozen, starved) may have been
#: replaced meanwhile: it persists nothing until it has checked its placement again.
STALL_S = 0.5


class StandbyRecord(Protocol):
    """The stage's view of its standby record, through its agent."""

    def standbys(self, app: str, stage: str) -> dict[str, Any]: ...

    def mark_standby(self, app: str, stage: str, node: str, in_sync: bool) -> None: ...


class _Marker:
    """Writes the in-sync marks of the standby record in a thread of its own. ``request``
    says whether the store holds a mark already; until it does, the gate acts as if not."""

    def __init__(
        self, app: str, stage: str, record: StandbyRecord, log: Callable[..., object]
    ) -> None:
        self.app, self.stage = app, stage
        self.record = record
        self.log = log
        self._wanted: dict[str, bool] = {}
        self._done: dict[str, bool] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="standby-marks", daemon=True)
        self._thread.start()

    def known(self, marks: dict[str, bool]) -> None:
        """What the store holds, as read."""
        with self._cond:
            for node, value in marks.items():
                self._done.setdefault(node, value)

    def request(self, node: str, in_sync: bool) -> bool:
        with self._cond:
            if self._done.get(node) == in_sync:
                self._wanted.pop(node, None)
                return True
            self._wanted[node] = in_sync
            self._cond.notify_all()
            return False

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._wanted and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                node, value = next(iter(self._wanted.items()))
            try:
                self.record.mark_standby(self.app, self.stage, node, value)
            except DpmigrateError as err:
                self.log("standby record not written", level="warning", node=node,
                         in_sync=value, error=str(err))  # fmt: skip
                with self._cond:
                    self._cond.wait(0.5)  # then again (the store may be back)
                continue
            with self._cond:
                if self._wanted.get(node) == value:
                    del self._wanted[node]
                self._done[node] = value
            self.log("standby in sync" if value else "standby out of sync", node=node)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5.0)


class StandbyGate:
    def __init__(
        self,
        app: str,
        stage: str,
        sender: StateSender,
        record: StandbyRecord,
        drop_after: float,
        log: Callable[..., object],
        marks: StandbyRecord | None = None,
    ) -> None:
        """``record`` is read from the stage's loop; ``marks`` (default: ``record``) is
        written from the marker's thread, so give it a connection of its own."""
        self.app, self.stage = app, stage
        self.sender = sender
        self.record = record
        self.drop_after = drop_after
        self.log = log
        self._marker = _Marker(app, stage, marks or record, log)
        self.listed: list[str] = []
        self.gating: set[str] = set()
        self._in_sync: set[str] = set()  # as the store says
        self._disconnected_since: dict[str, float] = {}
        self._next_refresh = 0.0
        self._next_update = 0.0
        self._alive_at = time.monotonic()  # the loop's last call of update()
        self.refresh(force=True)
        self.gating = {n for n in self._in_sync if n in self.listed}
        self._marker.known({n: n in self._in_sync for n in self.listed})

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next_refresh:
            return
        self._next_refresh = now + REFRESH_S
        try:
            found = self.record.standbys(self.app, self.stage)
        except DpmigrateError as err:
            self.log("standby record not read", level="warning", error=str(err))
            return
        self.listed = [str(n) for n in found.get("nodes", [])]
        self._in_sync = {str(n) for n in found.get("in_sync", [])}

    def allowed(self) -> int | None:
        """The highest point number that may be persisted; None: no limit (nothing gates)."""
        if not self.gating:
            return None
        if self.stalled:
            return -1
        acked = [self.sender.acked(node) for node in self.gating]
        return min(-1 if a is None else a for a in acked)

    def update(self, persisted_n: int) -> None:
        """Called from the stage's loop: start or stop gating as standbys come and go. A
        stalled loop must call :meth:`revalidated` (after checking its placement) instead."""
        now = time.monotonic()
        if self.stalled:
            return
        self._alive_at = now
        if now < self._next_update:
            return
        self._next_update = now + UPDATE_S
        self.refresh()
        connected = {r["node"] for r in self.sender.replicas() if r.get("connected")}
        for node in self.listed:
            if node in self.gating:
                continue
            acked = self.sender.acked(node)
            if node in connected and acked is not None and acked >= persisted_n:
                self.gating.add(node)  # gate first, then say so
                self._mark(node, True)
        for node in sorted(self.gating):
            if node not in self.listed:  # removed by the operator
                if self._mark(node, False):
                    self.gating.discard(node)
                continue
            if node in connected:
                self._disconnected_since.pop(node, None)
                if node not in self._in_sync:
                    self._mark(node, True)
                continue
            since = self._disconnected_since.setdefault(node, now)
            if now - since > self.drop_after and self._mark(node, False):
                self.log("standby dropped", level="warning", node=node,
                         disconnected_s=round(now - since, 2))  # fmt: skip
                self.gating.discard(node)
                self._disconnected_since.pop(node, None)

    @property
    def stalled(self) -> bool:
        """The loop was away longer than STALL_S while standbys gate: maybe replaced."""
        return bool(self.gating) and time.monotonic() - self._alive_at > STALL_S

    def revalidated(self) -> None:
        """The placement was checked after a stall and still names this copy."""
        self._alive_at = time.monotonic()

    def waiting_for(self) -> list[str]:
        """Gating standbys that are disconnected now: the primary acknowledges nothing."""
        return sorted(self._disconnected_since)

    def _mark(self, node: str, in_sync: bool) -> bool:
        """Ask for the mark; True once the store holds it."""
        if not self._marker.request(node, in_sync):
            return False
        if in_sync:
            self._in_sync.add(node)
        else:
            self._in_sync.discard(node)
        return True

    def close(self) -> None:
        self._marker.close()

    def status(self) -> list[dict[str, Any]]:
        """One entry per listed standby for the stage's status: gating, connected, lag."""
        seen = {r["node"]: r for r in self.sender.replicas() if r.get("role") == "standby"}
        out = []
        for node in self.listed:
            r = seen.get(node, {})
            out.append({"node": node, "in_sync": node in self.gating,
                        "connected": bool(r.get("connected")), "phase": r.get("phase"),
                        "acked_n": r.get("acked_n"), "lag_points": r.get("lag_points"),
                        "lag_s": r.get("lag_s")})  # fmt: skip
        return out
