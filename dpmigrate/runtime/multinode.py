"""The multi-node model: each stage on the node the manifest names, started by that node's
agent; tcp rings between nodes, shm rings within one.

Nodes share nothing: each stage's run folder (journal, status, log) is on its own node, at
the same path on every node (``<node folder>/runs/<run>``, see dpmigrate.cluster.nodefs), and
what the nodes must agree on — the app and where each stage is placed, with its epoch — is
written to the cluster store before any stage starts. Status comes from the agents.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dpmigrate.cluster import nodefs
from dpmigrate.errors import ConfigError, DpmigrateError
from dpmigrate.runtime.cluster import LocalCluster
from dpmigrate.runtime.failover import record_key
from dpmigrate.runtime.manifest import App

_POLL_S = 0.2


#: How long one agent may take to answer a status request before it counts as unreachable.
STATUS_TIMEOUT_S = 5.0


class MultiNodeRun:
    """One app on the nodes of a running cluster."""

    def __init__(
        self,
        app: App,
        cluster: LocalCluster,
        run_dir: Path | None = None,
        *,
        resources: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """``resources``: this run's limits over the manifest's, e.g. ``{"table": {"memory":
        "128M"}}`` (:meth:`App.with_resources`; validated here, a ConfigError)."""
        self.app = app if resources is None else app.with_resources(resources)
        app = self.app
        self.cluster = cluster
        known = {node.name for node in cluster.nodes}
        missing = sorted(set(app.nodes) - known)
        if missing:
            raise ConfigError(
                f"{app.path}: stages are placed on node(s) {missing}, but the cluster has only "
                f"{sorted(known)}; bring up more nodes (`dpmigrate cluster up --nodes N`)"
            )
        self.run_id = f"{app.name}-{os.getpid()}-{int(time.time())}"
        #: the run folder as each node's agent and stages see it (each node has its own)
        self.run_dir = run_dir or nodefs.node_dir(cluster.state_dir) / "runs" / self.run_id

    def start(self) -> None:
        """Record the app and its placement (epoch 1) in the store, then start the stages."""
        store = self.cluster.store()
        running = [s for s in self.status() if not s.get("finished")]
        if running:
            names = ", ".join(f"{s['name']}@{s['node']}" for s in running)
            raise DpmigrateError(
                f"app {self.app.name!r} is already running ({names}); `dpmigrate stop "
                f"{self.app.name}` first"
            )
        store.delete_prefix(f"placement/{self.app.name}/")  # a new run starts afresh
        store.delete_prefix(f"standby/{self.app.name}/")
        # the agents apply "resources" (this run's overrides) wherever the stage runs
        record = {"manifest": str(self.app.path.resolve()), "run": self.run_id,
                  "started": time.time(), "resources": self.app.resource_overrides}  # fmt: skip
        store.put(f"apps/{self.app.name}", record)
        for spec in self.app.stages:
            store.place(self.app.name, spec.name, spec.node, None)
            if spec.standbys:  # none in sync yet: each gates once it caught up
                store.put(record_key(self.app.name, spec.name),
                          {"nodes": list(spec.standbys), "in_sync": []})  # fmt: skip
        for spec in self.app.stages:
            self.start_stage(spec.name, spec.node)
        for spec in self.app.stages:
            for node in spec.standbys:
                self.start_stage(spec.name, node, role="standby")

    def start_stage(self, stage: str, node: str, role: str = "primary") -> None:
        """Start the stage (or a replica of it) on ``node``, in this run's folder there."""
        with self.cluster.client(node) as agent:
            agent.call(
                "start_stage", app=self.app.name, manifest=str(self.app.path.resolve()),
                stage=stage, run_dir=str(self.run_dir), model="multi-node", role=role,
            )  # fmt: skip

    def status(self, replicas: bool = False) -> list[dict[str, Any]]:
        """This app's stages as their agents report them (``replicas``: their standbys and
        statesync targets instead)."""
        stages = []
        for node in self.cluster.nodes:
            # a paused or dying agent must not hold up the report of the others
            with (
                contextlib.suppress(DpmigrateError),
                self.cluster.client(node.name, timeout=STATUS_TIMEOUT_S) as agent,
            ):
                for info in agent.call("status")["stages"]:
                    # a stage that left this node by checkpoint shows up where it was restored
                    live = not info.get("moved") and not info.get("fenced")
                    primary = info.get("role", "primary") == "primary"
                    if info.get("app") == self.app.name and live and primary != replicas:
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
                self.stop_replicas()  # the stream is over: nothing left to take over
                return True
            if duration is not None and time.monotonic() - start >= duration:
                return False
            if on_tick and time.monotonic() >= next_tick:
                on_tick(stages)
                next_tick = time.monotonic() + tick_interval
            time.sleep(_POLL_S)

    def stop_replicas(self) -> None:
        for info in self.status(replicas=True):
            if not info.get("finished"):
                with contextlib.suppress(DpmigrateError), self.cluster.client(info["node"]) as a:
                    a.call("stop_stage", app=self.app.name, stage=info["name"])

    def stop(self) -> None:
        """Stop the app's stages, sinks last so that they take in what is in flight."""
        nodes = dict.fromkeys(
            [*(s.node for s in self.app.stages), *(n.name for n in self.cluster.nodes)]
        )
        for node in nodes:  # the manifest's order first; then where stages moved, replicas
            with contextlib.suppress(DpmigrateError), self.cluster.client(node) as agent:
                agent.call("stop_app", app=self.app.name)

    def keep_logs(self, stages: list[dict[str, Any]]) -> dict[str, str]:
        """Copy the stages' logs into a folder of this host's state dir (kept); returns
        stage -> kept copy. (The operator's view: each log is read where its node keeps it.)"""
        kept = {}
        folder = Path(self.cluster.state_dir) / "runs" / self.run_id / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        for info in stages:
            log = info.get("log")
            source = self.cluster.host_path(info["node"], log) if log else None
            if source and source.exists():
                target = folder / f"{info['name']}.log"
                shutil.copyfile(source, target)
                kept[info["name"]] = str(target)
        return kept

    def cleanup(self) -> None:
        """Every node forgets the app's finished stages and removes its run folders; the
        store forgets the app."""
        for node in self.cluster.nodes:
            with contextlib.suppress(DpmigrateError), self.cluster.client(node.name) as agent:
                agent.call("forget_app", app=self.app.name)
        with contextlib.suppress(DpmigrateError):
            store = self.cluster.store()
            store.delete_prefix(f"placement/{self.app.name}/")
            store.delete_prefix(f"standby/{self.app.name}/")
            store.delete(f"apps/{self.app.name}")


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
