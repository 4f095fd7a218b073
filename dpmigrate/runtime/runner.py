"""Runs one stage: batches in, state committed, outputs and input acks at the batch boundary.

The same runner drives a stage in every deployment model; only the rings it is given differ
(mem, shm, tcp). One ``step()`` handles at most one batch:

1. flush outputs left over from the previous batch (a full output ring is backpressure: no
   new input is taken until they are out);
2. take a batch from the next input port with data (round robin) — or, for a source, let it
   generate up to a batch;
3. ``process`` it, collecting outputs in an outbox;
4. commit: the state's delta (versioned) and the batch's *point* (input and output positions)
   are recorded; the outputs go to the output rings, which retain them until acknowledged.

A point is *persisted* (journal, when the stage has one) once the downstream consumers have
acknowledged every output sent before it; only then are the inputs acknowledged up to it. So
after a crash the restarted stage resumes from its last persisted point, upstream producers
still retain every input after it, and the outputs it regenerates carry the same sequence
numbers, which downstream drops as duplicates (see :mod:`dpmigrate.runtime.journal`). This
needs ``process`` to be deterministic: the same state and batch give the same outputs.
Without a journal (in-process model) points are acknowledged as soon as they are reached.

With a hot standby (DESIGN.md §5) each point also goes to the state-synchronization sender as
it is committed (``on_commit``), and a point is persisted only once the standby has applied it
too (``gate``: the point number every gating replica has acknowledged). Upstream therefore
retains every input after the standby's point, and a standby promoted after the primary's node
died replays from there. The standby applies a point only once downstream acknowledged its
outputs (``on_outputs_acked`` tells the sender, which marks it safe), so the new primary never
starts numbering its outputs past what its consumers hold.
"""

from __future__ import annotations

import dataclasses
import heapq
import time
from collections.abc import Callable, Mapping
from typing import Any

from dpmigrate.errors import EndOfRing
from dpmigrate.runtime.journal import Positions, StageJournal
from dpmigrate.runtime.stage import Service
from dpmigrate.statesync.point import Point, point_number
from dpmigrate.statesync.state import State
from dpmigrate.transports.base import RingReceiver, RingSender

#: An input pause longer than this is recorded as a gap (what a migration's downtime is).
GAP_S = 0.02
#: How many gaps are kept: the longest ones, so a burst of small hiccups after a migration
#: never pushes its long gap out before anyone read it.
GAPS_KEPT = 32


@dataclasses.dataclass
class RunnerStats:
    batches: int = 0
    msgs_in: int = 0
    msgs_out: int = 0
    started: float = dataclasses.field(default_factory=time.monotonic)
    last_input: float | None = None  # wall clock of the last batch taken in
    #: The longest pauses in the input, as a min-heap of (seconds, start, end) wall-clock:
    #: the downtime a stage's consumer saw while its producer was quiesced, moved and woken.
    _gaps: list[tuple[float, float, float]] = dataclasses.field(default_factory=list)

    def took_input(self) -> None:
        now = time.time()
        if self.last_input is not None and now - self.last_input > GAP_S:
            entry = (now - self.last_input, self.last_input, now)
            if len(self._gaps) < GAPS_KEPT:
                heapq.heappush(self._gaps, entry)
            elif entry > self._gaps[0]:
                heapq.heapreplace(self._gaps, entry)
        self.last_input = now

    @property
    def gaps(self) -> list[tuple[float, float]]:
        """The kept gaps as (start, end), oldest first."""
        return sorted((start, end) for _, start, end in self._gaps)


class StageRunner:
    """One stage instance with its rings."""

    def __init__(
        self,
        name: str,
        service: Service,
        inputs: Mapping[str, RingReceiver],
        outputs: Mapping[str, RingSender],
        *,
        state: State | None = None,
        config: Mapping[str, Any] | None = None,
        batch: int = 32,
        journal: StageJournal | None = None,
        on_commit: Callable[[Point], None] | None = None,
        gate: Callable[[], int | None] | None = None,
        on_outputs_acked: Callable[[int], None] | None = None,
    ) -> None:
        """``on_commit(point)``: called at every batch boundary with what it committed.
        ``gate()``: the highest point number that may be persisted (None: no limit); either
        way a point is persisted only once downstream acknowledged its outputs.
        ``on_outputs_acked(n)``: called when downstream has acknowledged every output of the
        points up to number ``n`` (each n once, increasing), whatever the gate says."""
        self.name = name
        self.service = service
        self.inputs = dict(inputs)
        self.outputs = dict(outputs)
        self.state = state if state is not None else State()
        self.batch = batch
        self.stats = RunnerStats()
        self.journal = journal
        self.on_commit = on_commit
        self.gate = gate
        self.on_outputs_acked = on_outputs_acked
        self._outbox: dict[str, list[bytes]] = {port: [] for port in self.outputs}
        #: Points reached but not yet persisted, oldest first.
        self._points: list[Point] = []
        #: The number of the last persisted point (at first: the point the stage resumed at).
        self.persisted_n = point_number(
            self.state.version,
            {port: rx.next_expected for port, rx in self.inputs.items()},
            {port: tx.next_seq for port, tx in self.outputs.items()},
        )
        #: How many of the oldest unpersisted points have all their outputs acknowledged.
        self._acked_points = 0
        self._finished_inputs: set[str] = set()
        self._source_done = False
        self._rr = 0
        self.done = False
        self._zero_copy = bool(getattr(service, "zero_copy", False))
        service.setup(self.state, dict(config or {}))

    def _emit(self, port: str, msg: bytes) -> None:
        try:
            self._outbox[port].append(msg)
        except KeyError:
            raise KeyError(
                f"stage {self.name!r} emitted to unknown output port {port!r}; "
                f"its outputs are {list(self.outputs)}"
            ) from None

    def flush(self, wait: float = 0) -> bool:
        """Move outbox messages into the output rings (waiting up to ``wait`` seconds for
        room); True when the outbox is empty."""
        empty = True
        for port, queue in self._outbox.items():
            if queue:
                sent = self.outputs[port].send_burst(queue, timeout=wait)
                del queue[:sent]
                self.stats.msgs_out += sent
                empty = empty and not queue
        return empty

    def _own_outbox(self) -> None:
        """After a zero-copy batch: views it emitted go into the output rings now (the ring
        copies them, no copy of ours); what does not fit becomes bytes, since the views
        expire at the next receive or commit."""
        self.flush()
        for queue in self._outbox.values():
            for i, msg in enumerate(queue):
                if type(msg) is memoryview:
                    queue[i] = bytes(msg)

    def _commit_batch(self) -> None:
        delta = self.state.commit()
        inputs: Positions = {port: rx.next_expected for port, rx in self.inputs.items()}
        outputs: Positions = {
            port: tx.next_seq + len(self._outbox[port]) for port, tx in self.outputs.items()
        }
        point = Point(self.state.version, delta, inputs, outputs)
        self._points.append(point)
        if self.on_commit is not None:
            self.on_commit(point)
        self.flush()

    @property
    def settled(self) -> bool:
        """Nothing in the outbox and every point persisted: state, journal and rings agree."""
        return not self._points and not any(self._outbox.values())

    def persist(self) -> None:
        """Persist the latest point whose outputs downstream has acknowledged, then
        acknowledge the inputs up to it."""
        points = self._points
        if not points:
            return
        acked = {port: tx.acked for port, tx in self.outputs.items()}
        covered = self._acked_points  # output positions never decrease: resume the scan
        while covered < len(points) and all(
            points[covered].outputs[port] <= acked[port] for port in points[covered].outputs
        ):
            covered += 1
        if covered > self._acked_points:
            self._acked_points = covered
            if self.on_outputs_acked is not None:
                self.on_outputs_acked(points[covered - 1].n)
        allowed = self.gate() if self.gate is not None else None
        ready = covered
        if allowed is not None:
            ready = 0
            while ready < covered and points[ready].n <= allowed:
                ready += 1
        if not ready:
            return
        self._acked_points -= ready
        done, self._points = points[:ready], points[ready:]
        last = done[-1]
        self.persisted_n = max(self.persisted_n, last.n)
        if self.journal is not None:
            deltas = [p.delta for p in done if p.delta is not None]
            self.journal.append(
                deltas, last.inputs, last.outputs, None if self._points else self.state
            )
        for port, rx in self.inputs.items():
            rx.commit(upto=last.inputs[port])

    def step(self, wait: float = 0) -> bool:
        """Handle at most one batch; True if anything moved.

        ``wait``: seconds to block for room in a full output ring or for input to arrive,
        so a process running one stage sleeps in the ring instead of spinning.
        """
        if self.done:
            return False
        # Once per step: take in downstream's acknowledgements (for tcp that reads a socket)
        # and persist what they cover.
        self.persist()
        if not self.flush(wait):
            return False
        if not self.inputs:
            return self._step_source()
        ports = [p for p in self.inputs if p not in self._finished_inputs]
        for i in range(len(ports)):
            port = ports[(self._rr + i) % len(ports)]
            rx = self.inputs[port]
            # Block only on the last port tried, so one quiet input cannot starve the others.
            timeout = wait if i == len(ports) - 1 else 0
            try:
                if self._zero_copy:
                    batch = rx.recv_views(self.batch, timeout=timeout)
                else:
                    batch = rx.recv_burst(self.batch, timeout=timeout)
            except EndOfRing:
                self._finished_inputs.add(port)
                continue
            if batch:
                self._rr = (self._rr + i + 1) % len(ports)
                self.service.process(port, batch, self._emit)
                if self._zero_copy:
                    self._own_outbox()
                self.stats.batches += 1
                self.stats.msgs_in += len(batch)
                self.stats.took_input()
                self._commit_batch()
                return True
        if len(self._finished_inputs) == len(self.inputs):
            self._finish()
        return False

    def _step_source(self) -> bool:
        if self._source_done:
            self._finish()
            return False
        more = self.service.generate(self._emit, self.batch)
        produced = sum(map(len, self._outbox.values()))
        self.stats.batches += 1 if produced else 0
        self._commit_batch()
        if not more:
            self._source_done = True
        return produced > 0

    def _finish(self) -> None:
        """All inputs ended (or the source finished) and the outbox is empty: close outputs."""
        if self.flush() and not self._points:
            for tx in self.outputs.values():
                tx.close()
            self.done = True

    def metrics(self) -> dict[str, Any]:
        return self.service.metrics()
