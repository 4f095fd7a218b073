"""The three stages of the flows example.

* Generator: packet records (source id, per-source sequence number, flow id, size), a pure
  function of the packet index, so every run produces the same stream.
* FlowTable: per-flow packet and byte counts and a NAT-like port mapping (a port allocated
  the first time a flow is seen); forwards each record with its mapped port.
* Checker: verifies per-source continuity (a gap is lost, a repeat is duplicated) and keeps a
  running digest of everything it accepted, in arrival order.

All three keep what must survive a restart or a migration in ``self.state``.
"""

from __future__ import annotations

import hashlib
import struct
import time
from typing import Any

from dpmigrate.runtime.stage import Emit, Service

PACKET = struct.Struct("<HIIH")  # source, per-source seq, flow, size
MAPPED = struct.Struct("<HIIHH")  # ... + mapped port


def packet(index: int, sources: int, flows: int, seed: int) -> bytes:
    """Packet number ``index`` of the stream (deterministic)."""
    source = index % sources
    seq = index // sources
    flow = (index * 2654435761 + seed) % flows
    size = 64 + (index * 7919 + seed) % 1400
    return PACKET.pack(source, seq, flow, size)


class Generator(Service):
    """Config: sources, flows, seed, total (0: until stopped), rate (packets/s, 0: flat out)."""

    outputs = ("out",)

    def setup(self, state, config) -> None:  # type: ignore[no-untyped-def]
        super().setup(state, config)
        self._t0 = time.monotonic()
        self._n0 = state.get("next", 0)

    def generate(self, emit: Emit, budget: int) -> bool:
        cfg = self.config
        total = int(cfg.get("total", 0)) or None  # 0: run until stopped
        nxt = self.state.get("next", 0)
        rate = float(cfg.get("rate", 0))
        if rate > 0:  # pacing only changes when packets go out, never which packets
            due = self._n0 + int((time.monotonic() - self._t0) * rate)
            budget = max(0, min(budget, due - nxt))
            if budget == 0:
                time.sleep(min(0.005, 1 / rate))
        count = budget if total is None else min(budget, total - nxt)
        sources, flows, seed = (
            int(cfg.get("sources", 8)),
            int(cfg.get("flows", 512)),
            int(cfg.get("seed", 0)),
        )
        for index in range(nxt, nxt + count):
            emit("out", packet(index, sources, flows, seed))
        self.state["next"] = nxt + count
        return total is None or nxt + count < total

    def metrics(self) -> dict[str, Any]:
        return {"generated": self.state.get("next", 0)}


class FlowTable(Service):
    inputs = ("in",)
    outputs = ("out",)
    first_port = 20000

    def process(self, port: str, batch: list[bytes], emit: Emit) -> None:
        state = self.state
        nflows = state.get("nflows", 0)
        for msg in batch:
            source, seq, flow, size = PACKET.unpack(msg)
            key = f"f:{flow}"
            entry = state.get(key)
            if entry is None:
                entry = [0, 0, self.first_port + nflows]
                nflows += 1
            state[key] = [entry[0] + 1, entry[1] + size, entry[2]]
            emit("out", MAPPED.pack(source, seq, flow, size, entry[2]))
        state["nflows"] = nflows
        state["packets"] = state.get("packets", 0) + len(batch)

    def metrics(self) -> dict[str, Any]:
        return {"flows": self.state.get("nflows", 0), "packets": self.state.get("packets", 0)}


class Checker(Service):
    inputs = ("in",)

    def process(self, port: str, batch: list[bytes], emit: Emit) -> None:
        state = self.state
        received, lost, duplicated = (
            state.get("received", 0),
            state.get("lost", 0),
            state.get("duplicated", 0),
        )
        digest = bytes.fromhex(state.get("digest", "00" * 16))
        for msg in batch:
            source, seq, _flow, _size, _port = MAPPED.unpack(msg)
            key = f"s:{source}"
            expected = state.get(key, 0)
            if seq < expected:
                duplicated += 1
                continue
            lost += seq - expected
            state[key] = seq + 1
            received += 1
            digest = hashlib.blake2b(digest + msg, digest_size=16).digest()
        state["received"], state["lost"], state["duplicated"] = received, lost, duplicated
        state["digest"] = digest.hex()

    def metrics(self) -> dict[str, Any]:
        return {
            "received": self.state.get("received", 0),
            "lost": self.state.get("lost", 0),
            "duplicated": self.state.get("duplicated", 0),
            "digest": self.state.get("digest", "00" * 16),
        }
