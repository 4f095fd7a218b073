"""One stage in its own process: `python -m dpmigrate.runtime.stagehost`.

It loads the app, resumes the stage from its journal (state, input and output positions),
opens its rings — shm to stages on the same node, tcp to stages on other nodes — finding
peers by ring name through the run's registry, and runs batches until its inputs end (or, for a
source, until it finishes). It writes a status file about twice a second.

SIGTERM (twelve-factor disposability): the current batch finishes, the point is persisted as far
as downstream acknowledged it, the rings are detached (not closed: the peers wait for a new
instance) and the process exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dpmigrate import transports
from dpmigrate.errors import DpmigrateError
from dpmigrate.runtime.journal import StageJournal
from dpmigrate.runtime.manifest import App, RingSpec
from dpmigrate.runtime.registry import AgentResolver
from dpmigrate.runtime.runner import StageRunner
from dpmigrate.transports.resolver import DirectoryResolver, Resolver

STATUS_INTERVAL_S = 0.5


def ring_transport(app: App, ring: RingSpec, model: str) -> str:
    """The transport a ring uses in ``model``: the manifest's hint, else by locality."""
    if ring.transport != "auto":
        return ring.transport
    if model == "in-process":
        return "mem"
    same_node = app.stage(ring.src_stage).node == app.stage(ring.dst_stage).node
    return "shm" if model == "multi-process" or same_node else "tcp"


def ring_name(app: App, ring: RingSpec) -> str:
    return f"{app.name}.{ring.name}"


def _write_status(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".status-")
    with os.fdopen(fd, "w") as out:
        json.dump(data, out)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpmigrate.runtime.stagehost")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--stage", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--model", required=True, choices=["multi-process", "multi-node"])
    parser.add_argument(
        "--registry",
        choices=["dir", "agent"],
        default="dir",
        help="where ring endpoints are registered: the run folder or the node agent",
    )
    args = parser.parse_args(argv)

    stop = {"requested": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))

    app = App.load(args.manifest)
    spec = app.stage(args.stage)
    run_dir = Path(args.run_dir)
    journal = StageJournal(run_dir / "stages" / spec.name)
    state, in_pos, out_pos = journal.load()
    resolver: Resolver = (
        AgentResolver() if args.registry == "agent" else DirectoryResolver(run_dir / "registry")
    )
    # tcp rings listen on this node's own address (asked from the local agent in a cluster).
    host = str(resolver.node_info()["address"]) if isinstance(resolver, AgentResolver) else None
    outputs, inputs = {}, {}
    for ring in app.rings:  # producers first: they are the servers their consumers look up
        if ring.src_stage == spec.name:
            transport = ring_transport(app, ring, args.model)
            extra = {"host": host} if transport == "tcp" and host else {}
            outputs[ring.src_port] = transports.open_sender(
                transport, ring_name(app, ring), resolver=resolver,
                capacity=ring.capacity, next_seq=out_pos.get(ring.src_port, 0), **extra,
            )  # fmt: skip
    for ring in app.rings:
        if ring.dst_stage == spec.name:
            inputs[ring.dst_port] = transports.open_receiver(
                ring_transport(app, ring, args.model), ring_name(app, ring), resolver=resolver,
                auto_commit=False, next_expected=in_pos.get(ring.dst_port, 0),
                connect_timeout=60.0,
            )  # fmt: skip
    service = app.service_class(spec.name)()
    runner = StageRunner(
        spec.name, service, inputs, outputs, state=state, config=spec.config,
        batch=spec.batch, journal=journal,
    )  # fmt: skip
    status_path = run_dir / "status" / f"{spec.name}.json"
    status_path.parent.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"event": "stage started", "stage": spec.name, "state_version": state.version,
                      "inputs": in_pos, "outputs": out_pos}), flush=True)  # fmt: skip
    next_status = 0.0
    while not runner.done and not stop["requested"]:
        if not runner.step(wait=0.05) and not runner.done:
            # Idle: serve the output rings (a reconnecting consumer, acks), then persist.
            for tx in outputs.values():
                tx.service(0.005)
            runner.persist()
        now = time.monotonic()
        if now >= next_status:
            _write_status(status_path, _status(runner))
            next_status = now + STATUS_INTERVAL_S
    # Persist what downstream acknowledged. A finished stream closes the rings (downstream sees
    # EndOfRing); a stage told to stop detaches instead, so a restarted or moved instance
    # resumes from its journal and its peers just wait for it.
    runner.persist()
    if runner.done:
        for rx in inputs.values():
            rx.close()
    else:
        for end in [*outputs.values(), *inputs.values()]:
            end.detach()
    journal.close()
    _write_status(status_path, _status(runner))
    print(
        json.dumps({"event": "stage stopped", "stage": spec.name, "done": runner.done}), flush=True
    )
    return 0


def _status(runner: StageRunner) -> dict[str, Any]:
    return {
        "stage": runner.name,
        "state_version": runner.state.version,
        "state_digest": runner.state.digest(),
        "msgs_in": runner.stats.msgs_in,
        "msgs_out": runner.stats.msgs_out,
        "batches": runner.stats.batches,
        "done": runner.done,
        "metrics": runner.metrics(),
        "rings": [
            end.statistics().as_dict()
            for end in [*runner.inputs.values(), *runner.outputs.values()]
        ],
        "time": time.time(),
    }


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DpmigrateError as err:
        print(json.dumps({"event": "stage failed", "error": str(err)}), flush=True)
        sys.exit(1)
