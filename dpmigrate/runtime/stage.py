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

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from dpmigrate.statesync.state import State
from dpmigrate.transports.base import MessageViews

#: ``emit(port, message)``: queue a message on an output port; sent when the batch commits.
#: A zero-copy stage may emit the views it was given (forwarding without a copy of its own).
Emit = Callable[[str, bytes | memoryview], None]


class Service:
    """Base class of every stage."""

    inputs: ClassVar[tuple[str, ...]] = ()
    outputs: ClassVar[tuple[str, ...]] = ()
    #: True: ``process`` gets each batch as zero-copy views (a MessageViews of read-only
    #: memoryviews into the ring's memory, see dpmigrate.transports.base) instead of a list
    #: of bytes, which saves one copy and one allocation per message. The views are valid
    #: only during ``process``: copy with ``bytes(view)`` anything kept in ``self.state`` or
    #: an attribute (a view used later raises ViewExpired / ValueError, and a slice kept
    #: past the batch makes the next receive refuse with ViewsHeld). Views passed to
    #: ``emit`` are fine: the runtime hands them to the output ring before the next receive.
    #: Declared by the code, not the manifest: only the code knows whether it keeps them.
    zero_copy: ClassVar[bool] = False

    state: State
    config: Mapping[str, Any]

    def setup(self, state: State, config: Mapping[str, Any]) -> None:
        """Called once before the first batch, also after a restart with the restored state."""
        self.state = state
        self.config = config

    def process(self, port: str, batch: Sequence[bytes] | MessageViews, emit: Emit) -> None:
        """Handle a batch of messages that arrived on input ``port`` (bytes, or views when
        the stage is ``zero_copy``)."""
        raise NotImplementedError(f"{type(self).__name__} has inputs but no process()")

    def generate(self, emit: Emit, budget: int) -> bool:
        """Source stages: emit at most ``budget`` messages; return False when finished."""
        raise NotImplementedError(f"{type(self).__name__} has no inputs and no generate()")

    def metrics(self) -> dict[str, Any]:
        """What the stage wants reported in `dpmigrate status` (derived from its state)."""
        return {}
