"""The in-process model: every stage in this process, mem rings, a cooperative scheduler.

Round robin over the stages, one batch each per round. When a whole round moved nothing the
scheduler sleeps briefly (the rings are in-process, so there is nothing to block on), bounded
by the run's duration.

Stage ``resources`` (control groups) cannot apply here: every stage shares this one process,
its CPU time, memory and I/O. A run with any says so once, as a RuntimeWarning, and goes on.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

from dpmigrate.runtime.manifest import App
from dpmigrate.runtime.runner import StageRunner
from dpmigrate.transports import mem
from dpmigrate.transports.resolver import MemoryResolver

_IDLE_SLEEP_S = 0.0005


def build(app: App) -> list[StageRunner]:
    """Create the mem rings and one runner per stage, sources first."""
    limited = [f"{s.name} ({', '.join(s.resources.as_dict())})" for s in app.stages
               if not s.resources.empty]  # fmt: skip
    if limited:
        warnings.warn(
            f"app {app.name!r}: the in-process model runs every stage in this one process, so "
            f"the resources of {', '.join(limited)} are ignored (CPU, memory, I/O and pids "
            "limits need a process per stage: use --model multi-process or multi-node)",
            RuntimeWarning,
            stacklevel=2,
        )
    resolver = MemoryResolver()
    senders, receivers = {}, {}
    for ring in app.rings:
        name = f"{app.name}.{ring.name}"
        senders[ring.name] = mem.open_sender(name, resolver=resolver, capacity=ring.capacity)
        receivers[ring.name] = mem.open_receiver(name, resolver=resolver, auto_commit=False)
    runners = []
    for spec in app.stages:
        inputs = {r.dst_port: receivers[r.name] for r in app.rings if r.dst_stage == spec.name}
        outputs = {r.src_port: senders[r.name] for r in app.rings if r.src_stage == spec.name}
        service = app.service_class(spec.name)()
        runners.append(
            StageRunner(spec.name, service, inputs, outputs, config=spec.config, batch=spec.batch)
        )
    return runners


def run(
    app: App,
    duration: float | None = None,
    on_tick: Callable[[list[StageRunner]], None] | None = None,
    tick_interval: float = 0.5,
) -> list[StageRunner]:
    """Run until every stage finished, or ``duration`` seconds passed. Returns the runners."""
    runners = build(app)
    start = time.monotonic()
    next_tick = start + tick_interval
    while not all(r.done for r in runners):
        now = time.monotonic()
        if duration is not None and now - start >= duration:
            break
        moved = False
        for runner in runners:
            moved = runner.step() or moved
        if on_tick and now >= next_tick:
            on_tick(runners)
            next_tick = now + tick_interval
        if not moved:
            time.sleep(_IDLE_SLEEP_S)
    return runners


def summary(runners: list[StageRunner]) -> dict[str, Any]:
    return {
        "stages": [
            {
                "name": r.name,
                "state_version": r.state.version,
                "state_digest": r.state.digest(),
                "msgs_in": r.stats.msgs_in,
                "msgs_out": r.stats.msgs_out,
                "batches": r.stats.batches,
                "done": r.done,
                "metrics": r.metrics(),
            }
            for r in runners
        ]
    }
