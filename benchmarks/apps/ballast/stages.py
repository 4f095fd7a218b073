"""The migration benchmark's stages: the flows pipeline (a copy of ``examples/flows``) whose
flow table also holds ``ballast_mib`` MiB of process memory.

* Generator: packet records (source id, per-source sequence number, flow id, size), a pure
  function of the packet index; paced by ``rate``; endless with ``total = 0``.
* BallastTable: the flows example's FlowTable plus the ballast — a bytearray filled in
  ``setup`` (every page written, so resident) and kept outside ``self.state``: the explicit
  state, which the runtime journals and snapshots, stays as small as the example's, and only
  CRIU moves the ballast. Nothing reads it after setup, so to post-copy it is cold memory,
  pulled in the background rather than on demand (the best case for post-copy's downtime).
* Checker: per-source continuity (a gap is lost, a repeat is duplicated) and a running digest;
  a migration's report takes ``lost`` / ``duplicated`` from it and its input gap is the
  migration's downtime.

The pipeline itself is copied rather than imported because a stage module is found next to
its manifest, and the benchmark copies this folder into a temporary one per size.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Mapping
from typing import Any

from ballast import fill

from dpmigrate.runtime.stage import Emit, Service
from dpmigrate.statesync.state import State

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

    def setup(self, state: State, config: Mapping[str, Any]) -> None:
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


class BallastTable(Service):
    """Config: ballast_mib (MiB of process memory to hold), seed (of the ballast's bytes)."""

    inputs = ("in",)
    outputs = ("out",)
    first_port = 20000

    def setup(self, state: State, config: Mapping[str, Any]) -> None:
        super().setup(state, config)
        # Not in self.state: process memory only, as a big in-memory table or cache would be.
        self._ballast = fill(int(config.get("ballast_mib", 0)), int(config.get("seed", 7)))

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
        return {
            "flows": self.state.get("nflows", 0),
            "packets": self.state.get("packets", 0),
            "ballast_mib": len(self._ballast) >> 20,
        }


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
