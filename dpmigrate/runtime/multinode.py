"""The multi-node model: each stage on the node the manifest names, started by that node's
agent; tcp rings between nodes, shm rings within one.

The same run folder as the multi-process model (journals, status files) lives on the host's
filesystem, which the local cluster's nodes share (they are network namespaces, not mount
namespaces). Remote nodes over SSH will need the folder on each node; the agents' ``status``
already carries each stage's status, so nothing here reads those files directly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dpmigrate import config
from dpmigrate.errors import ConfigError, DpmigrateError
from dpmigrate.runtime.cluster import LocalCluster
from dpmigrate.runtime.manifest import App
from dpmigrate.runtime.stagehost import write_placement

_POLL_S = 0.2


class MultiNodeRun:
    """One app on the nodes of a running cluster."""

    def __init__(self, app: App, cluster: LocalCluster, run_dir: Path | None = None) -> None:
        self.app = app
        self.cluster = cluster
        known = {node.name for node in cluster.nodes}
        missing = sorted(set(app.nodes) - known)
        if missing:
            raise ConfigError(
                f"{app.path}: stages are placed on node(s) {missing}, but the cluster has only "
                f"{sorted(known)}; bring up more nodes (`dpmigrate cluster up --nodes N`)"
            )
        base = Path(config.load().state_dir) / "runs"
        self.run_dir = run_dir or base / f"{app.name}-{os.getpid()}-{int(time.time())}"

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_placement(self.run_dir, {spec.name: spec.node for spec in self.app.stages})
        for spec in self.app.stages:
            with self.cluster.client(spec.node) as agent:
                agent.call(
                    "start_stage", app=self.app.name, manifest=str(self.app.path.resolve()),
                    stage=spec.name, run_dir=str(self.run_dir), model="multi-node",
                )  # fmt: skip

    def status(self) -> list[dict[str, Any]]:
        """This app's stages as their agents report them."""
        stages = []
        for node in self.cluster.nodes:
            with contextlib.suppress(DpmigrateError), self.cluster.client(node.name) as agent:
                for info in agent.call("status")["stages"]:
                    # a stage that left this node by checkpoint shows up where it was restored
                    if info.get("app") == self.app.name and not info.get("moved"):
                        stages.append(info)
        order = {spec.name: i for i, spec in enumerate(self.app.stages)}
        return sorted(stages, key=lambda s: order.get(s["name"], 99))

    def wait(
        self,
        duration: float | None,
        on_tick: Callable[[list[dict[str, Any]]], None] | None = None,
        tick_interval: float = 0.5,
    ) -> bool:
        """Until every stage finished (True) or ``duration`` passed (False)."""
        start = time.monotonic()
        next_tick = start + tick_interval
        while True:
            stages = self.status()
            if len(stages) == len(self.app.stages) and all(s.get("finished") for s in stages):
                return True
            if duration is not None and time.monotonic() - start >= duration:
                return False
            if on_tick and time.monotonic() >= next_tick:
                on_tick(stages)
                next_tick = time.monotonic() + tick_interval
            time.sleep(_POLL_S)

    def stop(self) -> None:
        """Stop the app's stages, sinks last so that they take in what is in flight."""
        for spec in self.app.stages:
            with contextlib.suppress(DpmigrateError), self.cluster.client(spec.node) as agent:
                agent.call("stop_app", app=self.app.name)

    def keep_logs(self, stages: list[dict[str, Any]]) -> dict[str, str]:
        """Copy the stages' logs into the run folder (kept); returns stage -> kept copy."""
        kept = {}
        folder = self.run_dir / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        for info in stages:
            source = info.get("log")
            if source and Path(source).exists():
                target = folder / f"{info['name']}.log"
                shutil.copyfile(source, target)
                kept[info["name"]] = str(target)
        return kept

    def cleanup(self) -> None:
        for node in {spec.node for spec in self.app.stages}:
            with contextlib.suppress(DpmigrateError), self.cluster.client(node) as agent:
                agent.call("forget_app", app=self.app.name)
        shutil.rmtree(self.run_dir, ignore_errors=True)


def nodes_needed(app: App) -> int:
    """How many nodes a temporary local cluster needs for ``app`` (its nodes are node1..N)."""
    highest = 0
    for name in app.nodes:
        if not (name.startswith("node") and name[4:].isdigit()):
            raise ConfigError(
                f"{app.path}: node {name!r} is not a local-cluster node name (node1, node2, ...); "
                "bring up a cluster with those nodes first"
            )
        highest = max(highest, int(name[4:]))
    return highest
