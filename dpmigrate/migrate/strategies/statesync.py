"""State sync: no CRIU. A fresh instance of the stage on the destination — a replica in the
``target`` role (:mod:`dpmigrate.runtime.replica_host`) — receives the source's state by the
state-synchronization protocol while the source keeps processing: a snapshot, then every
committed point. Once it lags by at most a bound, the source is quiesced at a batch boundary;
its quiesce waits until the target applied the last point. The engine then places the stage on
the destination and wakes the target, which opens the rings at that point and runs: the
downtime holds the final delta, not the state (Rhino, SIGMOD 2020; DESIGN.md §6)."""

from __future__ import annotations

import time
from typing import Any

from dpmigrate.errors import MigrationError
from dpmigrate.migrate.strategies.base import SPACE_MARGIN, Strategy

#: How far behind the source the target may be when the source is quiesced, in points.
MAX_LAG_POINTS = 64
#: How long the target may take to catch up (its snapshot included) before the migration
#: gives up and rolls back.
CATCH_UP_TIMEOUT_S = 600.0
_POLL_S = 0.02


class StateSync(Strategy):
    name = "statesync"
    prepares = True
    uses_criu = False

    @classmethod
    def space_needed(cls, stage_memory: int) -> int:
        return stage_memory + SPACE_MARGIN  # the target's journal holds the state

    def prepare(self) -> None:
        m = self.m
        me = m.source_info()
        m.call(m.destination, "start_stage", app=m.app_name, stage=m.stage,
               manifest=me["manifest"], run_dir=me["run_dir"], model="multi-node",
               role="target")  # fmt: skip
        m.undo.push(f"end the statesync target on {m.destination}",
                    lambda: m.call(m.destination, "discard_stage", **m.stage_ref))  # fmt: skip
        started = time.monotonic()
        deadline = started + CATCH_UP_TIMEOUT_S
        while True:
            target = m.replica_on_destination()
            if target is not None and target.get("synced"):
                lag = target.get("lag") or {}
                if int(lag.get("lag_points", MAX_LAG_POINTS + 1)) <= MAX_LAG_POINTS:
                    break
            if target is not None and target.get("finished"):
                raise MigrationError(
                    f"the statesync target on {m.destination} ended (see its log "
                    f"{target.get('log')})"
                )
            if time.monotonic() >= deadline:
                raise MigrationError(
                    f"the statesync target on {m.destination} did not catch up within "
                    f"{CATCH_UP_TIMEOUT_S:.0f} s: {target and target.get('lag')}"
                )
            time.sleep(_POLL_S)
        sync = target.get("sync") or {}
        m.report.snapshot_bytes = int(sync.get("snapshot_bytes", 0))
        m.report.snapshot_mb_s = sync.get("snapshot_mb_s")
        m.report.catch_up_s = round(time.monotonic() - started, 4)
        self._sent_before_cutover = self._bytes_sent(since=time.time())

    def _bytes_sent(self, since: float) -> int:
        """Bytes the source's sender had sent to the destination's replica, from a status the
        source wrote after ``since`` (it writes one about five times a second; an older one
        would count the snapshot as part of the final delta). Bounded wait."""
        deadline = time.monotonic() + 1.0
        while True:
            me = self.m.source_info()
            if me.get("time", 0) > since or time.monotonic() >= deadline:
                break
            time.sleep(_POLL_S)
        for replica in me.get("replicas", []):
            if replica.get("node") == self.m.destination:
                return int(replica.get("bytes_sent", 0))
        return 0

    def cutover(self, frozen: dict[str, Any]) -> None:
        """The source is quiesced; its quiesce waited for the target to apply the last point
        and says what the target acknowledged."""
        m = self.m
        replicas = (frozen.get("positions") or {}).get("replicas") or {}
        acked = (replicas.get("acked") or {}).get(m.destination)
        last = replicas.get("n")
        if acked is None or last is None or int(acked) < int(last):
            raise MigrationError(
                f"the statesync target on {m.destination} applied point {acked}, not the "
                f"source's last point {last}; the source keeps the stage"
            )
        sent = (replicas.get("bytes_sent") or {}).get(m.destination)
        if sent is not None:
            m.report.final_delta_bytes = max(0, int(sent) - self._sent_before_cutover)
            m.report.transferred_bytes = int(sent)

    def restore(self) -> None:
        """Nothing to restore: the target runs already, waiting to be woken."""
