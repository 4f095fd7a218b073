"""The migration benchmark's stages: the flows pipeline of ``examples/flows`` whose flow table
also holds ``ballast_mib`` MiB of process memory.

* BallastTable: the flows example's FlowTable plus the ballast — a bytearray filled in
  ``setup`` (every page written, so resident) and kept outside ``self.state``: the explicit
  state, which the runtime journals and snapshots, stays as small as the example's, and only
  CRIU moves the ballast. Nothing reads it after setup, so to post-copy it is cold memory,
  pulled in the background rather than on demand (the best case for post-copy's downtime).
* Generator and Checker: the example's, unchanged; a migration's report takes ``lost`` /
  ``duplicated`` from the checker and its input gap is the migration's downtime.

A stage module is found next to its manifest: benchmarks/migration.py copies this folder into
a temporary one per size, with the example's stages beside it as ``flows.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ballast import fill
from flows import Checker, FlowTable, Generator

from dpmigrate.statesync.state import State

__all__ = ["BallastTable", "Checker", "Generator"]


class BallastTable(FlowTable):
    """Config: ballast_mib (MiB of process memory to hold), seed (of the ballast's bytes)."""

    def setup(self, state: State, config: Mapping[str, Any]) -> None:
        super().setup(state, config)
        # Not in self.state: process memory only, as a big in-memory table or cache would be.
        self._ballast = fill(int(config.get("ballast_mib", 0)), int(config.get("seed", 7)))

    def metrics(self) -> dict[str, Any]:
        return {**super().metrics(), "ballast_mib": len(self._ballast) >> 20}
