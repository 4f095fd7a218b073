"""Adding and removing a running stage's hot standbys (``dpmigrate standby``).

After a failover the stage has one standby fewer (the one that took over); an operator adds
another on a node of their choice. The standby is listed in the stage's standby record first
(:mod:`dpmigrate.runtime.failover`), then started: it connects to the primary, receives a
snapshot and the points after it, and the primary starts to gate on it — and records it in
sync — once it has caught up. Only then can it take over.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from dpmigrate.cluster import cordon
from dpmigrate.errors import DpmigrateError
from dpmigrate.runtime.cluster import LocalCluster
from dpmigrate.runtime.failover import update_record
from dpmigrate.runtime.manifest import App
from dpmigrate.runtime.stagehost import ring_transport

#: How long ``add_standby`` waits by default for the new standby to be in sync.
IN_SYNC_TIMEOUT_S = 600.0


def _primary(cluster: LocalCluster, stage: str) -> dict[str, Any]:
    node, app, name = cluster.find_stage(stage)
    with cluster.client(node) as agent:
        for info in agent.call("status")["stages"]:
            if (info.get("app"), info.get("name")) == (app, name) and info.get(
                "role", "primary"
            ) == "primary":
                return info
    raise DpmigrateError(f"stage {app}/{name} no longer runs on {node}")


def add_standby(
    cluster: LocalCluster,
    stage: str,
    node: str,
    wait: bool = True,
    timeout: float = IN_SYNC_TIMEOUT_S,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Start a standby of ``stage`` on ``node``; with ``wait``, return once it is in sync."""
    primary = _primary(cluster, stage)
    app_name, name, where = primary["app"], primary["name"], primary["node"]
    cluster.node(node)  # a clear error for an unknown node
    if node == where:
        raise DpmigrateError(
            f"stage {app_name}/{name} runs on {node}; its standby must be on another node"
        )
    # A standby on a cordoned node would never take over (runtime/failover.py): say so now.
    cordon.refuse_if_cordoned(cluster.store(), node, f"a standby of {app_name}/{name} there")
    app = App.load(primary["manifest"])
    placed = {n: p.node for n, p in cluster.store().placements(app_name).items()}
    mine = [r for r in app.rings if name in (r.src_stage, r.dst_stage)]
    shm = [r.name for r in mine if ring_transport(app, r, "multi-node", placed) != "tcp"]
    if shm:
        raise DpmigrateError(
            f"stage {app_name}/{name}'s rings {shm} are not tcp; a standby takes over while the "
            "primary's node is dead, when no peer could reopen a ring another way: declare "
            "the standby in the manifest (`standby = ...`), or give those rings "
            '`transport = "tcp"`, and run the app again'
        )

    def listed(record: dict[str, Any]) -> None:
        if node not in record["nodes"]:
            record["nodes"].append(node)

    update_record(cluster.store(), app_name, name, listed)
    with cluster.client(node) as agent:
        agent.call("start_stage", app=app_name, stage=name, manifest=primary["manifest"],
                   run_dir=primary["run_dir"], model="multi-node", role="standby")  # fmt: skip
    result = {"app": app_name, "stage": name, "node": node, "primary": where, "in_sync": False}
    if not wait:
        return result
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = next((s for s in _primary(cluster, f"{app_name}/{name}").get("standbys", [])
                      if s.get("node") == node), {})  # fmt: skip
        if on_progress is not None:
            on_progress(entry)
        if entry.get("in_sync"):
            return {**result, "in_sync": True, "lag_points": entry.get("lag_points")}
        time.sleep(0.2)
    raise DpmigrateError(
        f"the standby of {app_name}/{name} on {node} was started but is not in sync after "
        f"{timeout:.0f} s; see `dpmigrate status` and its log on {node}"
    )


def remove_standby(cluster: LocalCluster, stage: str, node: str) -> dict[str, Any]:
    """Take ``node`` out of the stage's standbys (first in the record: the primary stops
    gating on it), then stop the standby there."""
    primary = _primary(cluster, stage)
    app_name, name = primary["app"], primary["name"]

    def unlisted(record: dict[str, Any]) -> None:
        if node not in record["nodes"]:
            raise DpmigrateError(f"{node} runs no standby of {app_name}/{name}")
        record["nodes"] = [n for n in record["nodes"] if n != node]

    update_record(cluster.store(), app_name, name, unlisted)
    with cluster.client(node) as agent:
        agent.call("stop_stage", app=app_name, stage=name)
    return {"app": app_name, "stage": name, "node": node, "removed": True}
