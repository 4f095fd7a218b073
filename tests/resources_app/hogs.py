"""Test-only stages for tests/test_resources.py (copied next to a test's manifest, with the
flows example's ``stages.py``, which they build on).

* :class:`MemoryHog` is the flows table, and once — the first time it has seen ``hog_at``
  packets, as a marker file outside its state says — allocates ``hog_mb`` MiB and touches
  every page, to be killed by its memory limit. Its restart (from the journal, which the
  hogging batch never reached) does not hog again, so the run ends like a plain flows run.
* :class:`Burner` spins on the CPU in every ``generate`` call, forever: what a CPU quota is
  measured against.
"""

from __future__ import annotations

import os
import time
from typing import Any

from stages import FlowTable

from dpmigrate.runtime.stage import Emit, Service


class MemoryHog(FlowTable):
    def process(self, port: str, batch: list[bytes], emit: Emit) -> None:
        marker = str(self.config["marker"])
        if self.state.get("packets", 0) >= int(self.config["hog_at"]) and not os.path.exists(
            marker
        ):
            with open(marker, "w") as f:
                f.write(f"{os.getpid()}\n")
            hog = bytearray(int(self.config["hog_mb"]) << 20)
            for i in range(0, len(hog), 4096):  # touch every page: resident, charged
                hog[i] = 1
        super().process(port, batch, emit)


class Burner(Service):
    outputs = ()

    def generate(self, emit: Emit, budget: int) -> bool:
        end = time.perf_counter() + 0.02
        spins = 0
        while time.perf_counter() < end:
            spins += 1
        self.state["calls"] = self.state.get("calls", 0) + 1
        return True

    def metrics(self) -> dict[str, Any]:
        return {"calls": self.state.get("calls", 0)}
