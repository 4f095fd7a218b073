"""A zero_copy stage gets its batches as views and forwards them, over mem and shm rings:
everything arrives once and in order, views it emitted but that did not fit the output ring
were made owned before the next receive, and a view it kept is unusable afterwards."""

from __future__ import annotations

import time

import pytest

from dpmigrate.runtime.runner import StageRunner
from dpmigrate.runtime.stage import Emit, Service
from dpmigrate.transports import MemoryResolver, open_receiver, open_sender
from dpmigrate.transports.base import MessageViews

COUNT = 3000


class Source(Service):
    outputs = ("out",)

    def generate(self, emit: Emit, budget: int) -> bool:
        nxt = self.state.get("next", 0)
        count = min(budget, COUNT - nxt)
        for i in range(nxt, nxt + count):
            emit("out", b"m%06d" % i * (1 + i % 50))
        self.state["next"] = nxt + count
        return nxt + count < COUNT


class Relay(Service):
    inputs = ("in",)
    outputs = ("out",)
    zero_copy = True

    def setup(self, state, config) -> None:  # type: ignore[no-untyped-def]
        super().setup(state, config)
        self.kinds: set[type] = set()
        self.kept: list[memoryview] = []

    def process(self, port: str, batch, emit: Emit) -> None:  # type: ignore[no-untyped-def]
        self.kinds.add(isinstance(batch, MessageViews))
        for view in batch:
            emit("out", view)
        if len(self.kept) < 3:
            self.kept.append(batch[0])  # a bug on purpose: kept past its batch


class Sink(Service):
    inputs = ("in",)

    def setup(self, state, config) -> None:  # type: ignore[no-untyped-def]
        super().setup(state, config)
        self.got: list[bytes] = []

    def process(self, port: str, batch, emit: Emit) -> None:  # type: ignore[no-untyped-def]
        self.kinds = {type(m) for m in batch}
        self.got.extend(batch)


@pytest.mark.parametrize("transport", ["mem", "shm"])
def test_zero_copy_stage_forwards_views(transport: str) -> None:
    resolver = MemoryResolver()
    ends = []

    def ring(name: str, capacity: int) -> tuple:
        tx = open_sender(transport, name, resolver=resolver, capacity=capacity)
        rx = open_receiver(transport, name, resolver=resolver, auto_commit=False)
        ends.extend([rx, tx])
        return tx, rx

    a_tx, a_rx = ring("views.a", 256)
    b_tx, b_rx = ring("views.b", 8)  # smaller than a batch: emitted views wait in the outbox
    source, relay, sink = Source(), Relay(), Sink()
    runners = [
        StageRunner("src", source, {}, {"out": a_tx}, batch=32),
        StageRunner("relay", relay, {"in": a_rx}, {"out": b_tx}, batch=32),
        StageRunner("sink", sink, {"in": b_rx}, {}, batch=32),
    ]
    deadline = time.monotonic() + 30
    while len(sink.got) < COUNT:
        assert time.monotonic() < deadline, f"stuck at {len(sink.got)} of {COUNT}"
        for r in runners:
            r.step(0.001)
    assert sink.got == [b"m%06d" % i * (1 + i % 50) for i in range(COUNT)]
    assert relay.kinds == {True}, "a zero_copy stage must get MessageViews batches"
    assert sink.kinds == {bytes}, "a plain stage gets bytes"
    for view in relay.kept:
        with pytest.raises(ValueError):
            view.tobytes()
    for end in ends:
        end.close()
