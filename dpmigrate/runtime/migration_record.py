"""The node's record of the migrations that came to it, for its metrics.

A migration's report is computed where the engine runs (the CLI or a script), not in an
agent, and nothing else keeps it. So that an operator sees phase durations and downtime where
they look for metrics — each agent's ``/metrics`` (:mod:`dpmigrate.runtime.metrics`) — the
engine hands the finished migration's numbers to the destination's agent
(``record_migration``), which keeps them here, in its node's own folder
(``migration-record.json``): it survives a restart of the agent and is nobody else's to read.

What is kept is bounded: the last migration of each stage to this node (at most
:data:`MAX_STAGES` stages, the oldest forgotten first), how many migrations came here, by
strategy and outcome, and — over every migration that moved a stage here — histograms of the
phase durations, downtimes and total times, by strategy (and phase), in fixed buckets
(:data:`BUCKETS`). The last migration alone would miss every migration between two scrapes;
the histograms miss none, and are what a latency objective is written against. At most
:data:`MAX_KEYS` count and histogram series each, which keeps the metrics' label sets bounded.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
import re
import threading
from pathlib import Path
from typing import Any

from dpmigrate import atomic
from dpmigrate.errors import ProtocolError
from dpmigrate.runtime.operations import Name, Request

#: In the node's folder.
RECORD = "migration-record.json"
#: Stages whose last migration is kept; beyond it the oldest record is dropped.
MAX_STAGES = 256
#: Phases one migration may name (the engine has eight, plus rollback).
MAX_PHASES = 16
OUTCOMES = ("moved", "rolled_back")
#: Upper bounds, in seconds, of the histograms' buckets: from a statesync cutover's tens of
#: milliseconds to a 1 GiB stop-and-copy's seconds (README, the migration benchmark).
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Distinct (strategy, outcome) counts, and distinct histograms, kept at most each.
MAX_KEYS = 64
_PHASE_RE = re.compile(r"^[a-z][a-z_]{0,31}$")


@dataclasses.dataclass(frozen=True)
class MigrationDone(Request):
    """What the engine tells the destination's agent once a migration ended (moved or
    rolled back): the report's numbers, in seconds and bytes."""

    app: Name
    stage: Name
    strategy: Name
    source: Name
    outcome: str  # one of OUTCOMES
    phases: dict[str, Any]  # phase -> seconds; checked by :func:`check`
    total_time_s: float
    downtime_s: float | None
    frozen_time_s: float
    transferred_bytes: int
    ended_at: float  # wall clock


def check(req: MigrationDone) -> None:
    """Refuse what the typed record cannot say: an unknown outcome, a phase that is not a
    short lowercase word or not a finite, non-negative number of seconds, negative totals."""
    if req.outcome not in OUTCOMES:
        raise ProtocolError(f"outcome {req.outcome!r} is not one of {', '.join(OUTCOMES)}")
    if len(req.phases) > MAX_PHASES:
        raise ProtocolError(f"{len(req.phases)} phases; at most {MAX_PHASES}")
    for name, seconds in req.phases.items():
        if not _PHASE_RE.fullmatch(name):
            raise ProtocolError(f"phase {name[:40]!r} is not a phase name (a-z and _)")
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise ProtocolError(f"phase {name}: {seconds!r} is not a number of seconds")
        if not math.isfinite(seconds) or seconds < 0:
            raise ProtocolError(f"phase {name}: {seconds!r} is not a duration")
    numbers = (req.total_time_s, req.frozen_time_s, req.transferred_bytes, req.ended_at)
    if any(n < 0 for n in numbers) or (req.downtime_s is not None and req.downtime_s < 0):
        raise ProtocolError("a migration's times and sizes are never negative")


class MigrationRecord:
    """The record file, and its contents in memory (read once, written on every change)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._last: dict[str, dict[str, Any]] = {}  # "app/stage" -> its last migration here
        self._counts: dict[str, int] = {}  # "strategy outcome" -> migrations
        #: "phase STRATEGY PHASE", "downtime STRATEGY", "duration STRATEGY" ->
        #: {"buckets": [observations per bucket, the last one above BUCKETS[-1]], "sum": s}
        self._hist: dict[str, dict[str, Any]] = {}
        self._load()

    def _load(self) -> None:
        """What an earlier agent of this node recorded; a damaged file is started afresh
        (its numbers are metrics, not state: losing them loses no message)."""
        try:
            data = json.loads(self.path.read_text())
            last, counts, hist = data["last"], data["counts"], data["histograms"]
            self._last = {str(k): dict(v) for k, v in last.items()}
            self._counts = {str(k): int(v) for k, v in counts.items()}
            self._hist = {str(k): {"buckets": [int(n) for n in v["buckets"]],
                                   "sum": float(v["sum"])} for k, v in hist.items()}  # fmt: skip
            if any(len(h["buckets"]) != len(BUCKETS) + 1 for h in self._hist.values()):
                raise ValueError("histogram buckets changed")
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self._last, self._counts, self._hist = {}, {}, {}

    def add(self, req: MigrationDone) -> None:
        check(req)
        entry = dataclasses.asdict(req)
        entry["phases"] = {k: float(v) for k, v in req.phases.items()}
        with self._lock:
            self._last.pop(f"{req.app}/{req.stage}", None)
            self._last[f"{req.app}/{req.stage}"] = entry
            while len(self._last) > MAX_STAGES:
                oldest = min(self._last, key=lambda k: self._last[k]["ended_at"])
                del self._last[oldest]
            key = f"{req.strategy} {req.outcome}"
            if key in self._counts or len(self._counts) < MAX_KEYS:
                self._counts[key] = self._counts.get(key, 0) + 1
            if req.outcome == "moved":
                for phase, seconds in entry["phases"].items():
                    self._observe(f"phase {req.strategy} {phase}", seconds)
                if req.downtime_s is not None:
                    self._observe(f"downtime {req.strategy}", req.downtime_s)
                self._observe(f"duration {req.strategy}", req.total_time_s)
            atomic.write_json(self.path, {"last": self._last, "counts": self._counts,
                                          "histograms": self._hist})  # fmt: skip

    def _observe(self, key: str, seconds: float) -> None:
        hist = self._hist.get(key)
        if hist is None:
            if len(self._hist) >= MAX_KEYS:
                return
            hist = self._hist[key] = {"buckets": [0] * (len(BUCKETS) + 1), "sum": 0.0}
        hist["buckets"][bisect.bisect_left(BUCKETS, seconds)] += 1  # the first bound >= it
        hist["sum"] += seconds

    def last(self) -> list[dict[str, Any]]:
        """The last migration of each stage to this node (copies)."""
        with self._lock:
            return [dict(v) for v in self._last.values()]

    def counts(self) -> dict[tuple[str, str], int]:
        """(strategy, outcome) -> how many migrations came to this node."""
        with self._lock:
            return {tuple(k.split(" ", 1)): n for k, n in self._counts.items()}  # type: ignore[misc]

    def histograms(self) -> dict[tuple[str, ...], tuple[list[tuple[str, float]], float]]:
        """("phase", strategy, phase) / ("downtime", strategy) / ("duration", strategy) ->
        (cumulative buckets as Prometheus writes them, ``le`` -> count, "+Inf" last; sum)."""
        out = {}
        with self._lock:
            for key, hist in self._hist.items():
                total, buckets = 0, []
                for bound, n in zip((*map(str, BUCKETS), "+Inf"), hist["buckets"], strict=True):
                    total += n
                    buckets.append((bound, float(total)))
                out[tuple(key.split(" "))] = (buckets, hist["sum"])
        return out
