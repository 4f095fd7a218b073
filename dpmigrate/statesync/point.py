"""A committed point of a stage, as the state-synchronization protocol ships it.

A stage commits at every batch boundary: its state's delta (or none) together with the
positions of its rings (DESIGN.md §3). A replica that has applied every point up to one holds
exactly what the primary held there, so it can take over from it: consume each input from
``inputs[port]`` and number its outputs from ``outputs[port]``.

Points are ordered by :func:`point_number`, derived from the point itself rather than counted,
so a primary restarted from its journal numbers the points it regenerates exactly as before
(``process`` is deterministic), and a replica's "I have up to n" means the same to every
instance of the primary.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping

from dpmigrate.statesync.state import Delta

Positions = dict[str, int]


def point_number(version: int, inputs: Mapping[str, int], outputs: Mapping[str, int]) -> int:
    """Strictly increasing from one meaningful batch to the next: a batch consumes at least one
    input, or (a source) emits at least one output, or changes the state."""
    return version + sum(inputs.values()) + sum(outputs.values())


@dataclasses.dataclass(frozen=True)
class Point:
    """One committed point: the state version after it, its delta (None: the batch changed no
    state), the ring positions and the primary's wall clock at the commit."""

    version: int
    delta: Delta | None
    inputs: Positions
    outputs: Positions
    at: float = dataclasses.field(default_factory=time.time)

    @property
    def n(self) -> int:
        return point_number(self.version, self.inputs, self.outputs)
