"""What one migration did, in the vocabulary users know from CRIU, Podman and QEMU
(frozen_time, pages_written, downtime, total_time, transferred)."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class MigrationReport:
    """The report of one migration (``as_dict()`` is its JSON form)."""

    strategy: str
    stage: str
    source: str
    destination: str
    total_time_s: float = 0.0
    #: how long the stage's service stopped, as its downstream saw it — never less than the
    #: time the stage was known to be asleep (``asleep_s``)
    downtime_s: float | None = None
    #: from the stage's quiesced answer to the start of its wake: it did no work meanwhile
    asleep_s: float | None = None
    frozen_time_s: float = 0.0
    transferred_bytes: int = 0
    pages_written: int = 0
    #: statesync: the snapshot the target received, its throughput, how long it took to
    #: catch up (snapshot and points) and what it received after the source was quiesced
    snapshot_bytes: int | None = None
    snapshot_mb_s: float | None = None
    catch_up_s: float | None = None
    final_delta_bytes: int | None = None
    lost: int | None = None
    duplicated: int | None = None
    state_digest_before: str | None = None
    state_digest_after: str | None = None
    rolled_back: bool = False
    #: from the placement's compare-and-swap to the last ring of the stage reconnected (both
    #: ends), as the ring ends' clocks say: what the push of a move costs
    reconnect_after_placement_s: float | None = None
    #: the control-group limits the destination applied before the stage ran there —
    #: ``limits`` (the manifest's), ``applied`` (what the group holds), ``unsupported`` (not
    #: applicable on that host, with why), ``group`` — or None: the stage has no resources
    resources: dict[str, Any] | None = None
    phases: dict[str, float] = dataclasses.field(default_factory=dict)
    error: str | None = None
    started_at: float = 0.0  # wall clock, for timelines
    ended_at: float = 0.0
    phase_times: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    #: clean-up steps that failed (each also logged), e.g. a folder not removed
    warnings: list[str] = dataclasses.field(default_factory=list)
    #: every rollback step, in the order it ran: "ok: ..." or "FAILED: ..."
    rollback_steps: list[str] = dataclasses.field(default_factory=list)
    #: rollback steps that failed, and stages not running after the rollback, with why
    rollback_failures: list[str] = dataclasses.field(default_factory=list)

    @property
    def undone(self) -> bool:
        """Rolled back with everything undone and every stage running again."""
        return self.rolled_back and not self.rollback_failures

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
