"""Runs one stage: batches in, state committed, outputs and input acks at the batch boundary.

The same runner drives a stage in every deployment model; only the rings it is given differ
(mem, shm, tcp). One ``step()`` handles at most one batch:

1. flush outputs left over from the previous batch (a full output ring is backpressure: no
   new input is taken until they are out);
2. take a batch from the next input port with data (round robin) — or, for a source, let it
   generate up to a batch;
3. ``process`` it, collecting outputs in an outbox;
4. commit: the state's delta (versioned), the outputs handed to the output rings (which retain
   them until acknowledged downstream), then the input acknowledged. The input is
   acknowledged only when every output of the batch is in an output ring.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

from dpmigrate.errors import EndOfRing
from dpmigrate.runtime.stage import Service
from dpmigrate.statesync.state import Delta, State
from dpmigrate.transports.base import RingReceiver, RingSender


@dataclasses.dataclass
class RunnerStats:
    batches: int = 0
    msgs_in: int = 0
    msgs_out: int = 0
    started: float = dataclasses.field(default_factory=time.monotonic)


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
        on_delta: Callable[[Delta], None] | None = None,
    ) -> None:
        self.name = name
        self.service = service
        self.inputs = dict(inputs)
        self.outputs = dict(outputs)
        self.state = state if state is not None else State()
        self.batch = batch
        self.on_delta = on_delta
        self.stats = RunnerStats()
        self._outbox: dict[str, list[bytes]] = {port: [] for port in self.outputs}
        self._pending_ack: RingReceiver | None = None
        self._finished_inputs: set[str] = set()
        self._source_done = False
        self._rr = 0
        self.done = False
        service.setup(self.state, dict(config or {}))

    def _emit(self, port: str, msg: bytes) -> None:
        try:
            self._outbox[port].append(msg)
        except KeyError:
            raise KeyError(
                f"stage {self.name!r} emitted to unknown output port {port!r}; "
                f"its outputs are {list(self.outputs)}"
            ) from None

    def _flush(self) -> bool:
        """Move outbox messages into the output rings; True when the outbox is empty."""
        empty = True
        for port, queue in self._outbox.items():
            if queue:
                sent = self.outputs[port].send_burst(queue, timeout=0)
                del queue[:sent]
                self.stats.msgs_out += sent
                empty = empty and not queue
        if empty and self._pending_ack is not None:
            self._pending_ack.commit()
            self._pending_ack = None
        return empty

    def _commit_batch(self, rx: RingReceiver | None) -> None:
        delta = self.state.commit()
        if delta is not None and self.on_delta is not None:
            self.on_delta(delta)
        self._pending_ack = rx
        self._flush()

    def step(self) -> bool:
        """Handle at most one batch; True if anything moved."""
        if self.done:
            return False
        if not self._flush():
            return False
        if not self.inputs:
            return self._step_source()
        ports = list(self.inputs)
        for i in range(len(ports)):
            port = ports[(self._rr + i) % len(ports)]
            if port in self._finished_inputs:
                continue
            rx = self.inputs[port]
            try:
                batch = rx.recv_burst(self.batch, timeout=0)
            except EndOfRing:
                self._finished_inputs.add(port)
                continue
            if batch:
                self._rr = (self._rr + i + 1) % len(ports)
                self.service.process(port, batch, self._emit)
                self.stats.batches += 1
                self.stats.msgs_in += len(batch)
                self._commit_batch(rx)
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
        self._commit_batch(None)
        if not more:
            self._source_done = True
        return produced > 0

    def _finish(self) -> None:
        """All inputs ended (or the source finished) and the outbox is empty: close outputs."""
        if self._flush():
            for tx in self.outputs.values():
                tx.close()
            self.done = True

    def metrics(self) -> dict[str, Any]:
        return self.service.metrics()
