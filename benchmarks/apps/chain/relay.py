"""A stage of the drain benchmark's chain: forwards every record unchanged and keeps, as its
explicit state, how many it relayed and the last sequence number per source (so a restart,
a migration or a statesync target has state to carry, as a real stage would)."""

from __future__ import annotations

import struct
from typing import Any

from dpmigrate.runtime.stage import Emit, Service

SOURCE = struct.Struct("<HI")  # the first fields of the flows example's records: source, seq


class Relay(Service):
    inputs = ("in",)
    outputs = ("out",)

    def process(self, port: str, batch: list[bytes], emit: Emit) -> None:
        last: dict[int, int] = {}
        for msg in batch:
            source, seq = SOURCE.unpack_from(msg)
            last[source] = seq
            emit("out", msg)
        for source, seq in last.items():
            self.state[f"s:{source}"] = seq
        self.state["relayed"] = self.state.get("relayed", 0) + len(batch)

    def metrics(self) -> dict[str, Any]:
        return {"relayed": self.state.get("relayed", 0)}
