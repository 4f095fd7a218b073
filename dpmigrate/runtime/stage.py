"""The stage API: what a data-plane service implements, identical in every deployment model.

A stage declares its input and output ports, receives its explicit :class:`State` and its
config in ``setup``, and handles one batch of messages from one input port at a time in
``process``, emitting to output ports. A source stage (no inputs) implements ``generate``.

The runtime commits a batch's state changes, its outputs and its input positions together at
the batch boundary (DESIGN.md §3): a stage must keep everything that has to survive a restart
or a migration in ``self.state`` — anything else (caches, counters in attributes) is lost.

    class Counter(Service):
        inputs = ("in",)
        outputs = ("out",)

        def process(self, port, batch, emit):
            self.state["seen"] = self.state.get("seen", 0) + len(batch)
            for msg in batch:
                emit("out", msg)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from dpmigrate.statesync.state import State

#: ``emit(port, message)``: queue a message on an output port; sent when the batch commits.
Emit = Callable[[str, bytes], None]


class Service:
    """Base class of every stage."""

    inputs: ClassVar[tuple[str, ...]] = ()
    outputs: ClassVar[tuple[str, ...]] = ()

    state: State
    config: Mapping[str, Any]

    def setup(self, state: State, config: Mapping[str, Any]) -> None:
        """Called once before the first batch, also after a restart with the restored state."""
        self.state = state
        self.config = config

    def process(self, port: str, batch: list[bytes], emit: Emit) -> None:
        """Handle a batch of messages that arrived on input ``port``."""
        raise NotImplementedError(f"{type(self).__name__} has inputs but no process()")

    def generate(self, emit: Emit, budget: int) -> bool:
        """Source stages: emit at most ``budget`` messages; return False when finished."""
        raise NotImplementedError(f"{type(self).__name__} has no inputs and no generate()")

    def metrics(self) -> dict[str, Any]:
        """What the stage wants reported in `dpmigrate status` (derived from its state)."""
        return {}
