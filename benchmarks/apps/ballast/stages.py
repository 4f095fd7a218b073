"""The migration and failover benchmarks' stages: the flows pipeline of ``examples/flows``
whose flow table also holds a chosen amount of memory, as process memory or as state.

* BallastTable: the flows example's FlowTable plus the ballast — a bytearray filled in
  ``setup`` (every page written, so resident) and kept outside ``self.state``: the explicit
  state, which the runtime journals and snapshots, stays as small as the example's, and only
  CRIU moves the ballast. Nothing reads it after setup, so to post-copy it is cold memory,
  pulled in the background rather than on demand (the best case for post-copy's downtime).
* StateBallastTable: a BallastTable whose *explicit state* also grows to ``state_mib`` MiB —
  what the ``statesync`` strategy and a hot standby move. Its first batches each add
  ``state_keys_per_batch`` keys (default 16) of 64 KiB, deterministic bytes from
  ``ballast.block``, until the state holds ``state_mib`` MiB; its metrics say how far it is
  (``state_fill_mib``, ``state_full``). The fill is a function of the state alone (how many
  keys it holds already), so ``process`` stays deterministic: a restarted or promoted copy
  fills exactly as the first would have.
* Generator and Checker: the example's, unchanged; a migration's report takes ``lost`` /
  ``duplicated`` from the checker and its input gap is the migration's downtime.

A stage module is found next to its manifest: the benchmarks copy this folder into a
temporary one per case, with the example's stages beside it as ``flows.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ballast import MIB, block, fill
from flows import Checker, FlowTable, Generator

from dpmigrate.runtime.stage import Emit
from dpmigrate.statesync.state import State

__all__ = ["BallastTable", "Checker", "Generator", "StateBallastTable"]

#: The size of one key of a StateBallastTable's state ballast.
STATE_VALUE = 64 << 10


class BallastTable(FlowTable):
    """Config: ballast_mib (MiB of process memory to hold), seed (of the ballast's bytes)."""

    def setup(self, state: State, config: Mapping[str, Any]) -> None:
        super().setup(state, config)
        # Not in self.state: process memory only, as a big in-memory table or cache would be.
        self._ballast = fill(int(config.get("ballast_mib", 0)), int(config.get("seed", 7)))

    def metrics(self) -> dict[str, Any]:
        return {**super().metrics(), "ballast_mib": len(self._ballast) >> 20}


class StateBallastTable(BallastTable):
    """Config (besides BallastTable's): state_mib (MiB of explicit state to hold, filled
    during the first batches), state_keys_per_batch (64 KiB keys added per batch, 16)."""

    def setup(self, state: State, config: Mapping[str, Any]) -> None:
        super().setup(state, config)
        self._state_keys = int(config.get("state_mib", 0)) * MIB // STATE_VALUE
        self._per_batch = max(1, int(config.get("state_keys_per_batch", 16)))
        self._seed = int(config.get("seed", 7)) + 1
        self._block = b""  # 1 MiB, 16 distinct values: made when first needed (setup runs in
        # the downtime of a promoted replica, a statesync target, which never fills)

    def process(self, port: str, batch: list[bytes], emit: Emit) -> None:
        super().process(port, batch, emit)
        have = self.state.get("ballast_keys", 0)
        if have >= self._state_keys:
            return
        upto = min(self._state_keys, have + self._per_batch)
        if not self._block:
            self._block = block(self._seed)
        for i in range(have, upto):
            offset = (i % (MIB // STATE_VALUE)) * STATE_VALUE
            # a new object per key, no two equal: the key's index stamped in its first bytes
            self.state[f"ballast/{i:07d}"] = (
                i.to_bytes(8, "little") + self._block[offset + 8 : offset + STATE_VALUE]
            )
        self.state["ballast_keys"] = upto

    def metrics(self) -> dict[str, Any]:
        have = self.state.get("ballast_keys", 0)
        return {
            **super().metrics(),
            "state_fill_mib": round(have * STATE_VALUE / MIB, 2),
            "state_target_mib": self._state_keys * STATE_VALUE // MIB,
            "state_full": have >= self._state_keys,
        }
