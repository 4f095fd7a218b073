"""`dpmigrate status [STAGE]`: the running cluster as an operator reads it, at 80 columns.

The overview has one short line per stage (node, phase, in, out, restarts, epoch, standby and
its lag) and node health (alive, dead, cordoned); ``status STAGE`` shows everything one stage
reports — every metric, its resources, rings and standbys. The overview used to print each
stage's metrics as JSON in a column, which an 80-column terminal wrapped one token per line:
metrics differ per stage and can be long, so they belong to the one-stage view.

``--json`` keeps the overview's document as scripts know it (``nodes``, ``stages``,
``rings``, ``replicas``), with more fields only: ``cordoned`` per node; ``phase``, ``epoch``
and ``moved`` per stage.
"""

from __future__ import annotations

import json
from typing import Any

import click
from rich import box
from rich.console import Console
from rich.table import Table

from dpmigrate.errors import DpmigrateError

#: Seconds an agent may take to answer before its node is shown as not answering.
AGENT_TIMEOUT_S = 5.0


@click.command("status")
@click.argument("stage", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status_cmd(stage: str | None, as_json: bool) -> None:
    """Nodes, stages and rings of the running cluster; with STAGE ([APP/]STAGE), all that
    one stage reports (every metric, resources, rings, standbys)."""
    from dpmigrate.runtime.cluster import LocalCluster

    cluster = LocalCluster.current()
    nodes, stages = survey(cluster)
    if stage is not None:
        _one_stage(stage, stages, as_json)
        return
    rings = [
        {"stage": s["name"], "app": s.get("app"), "ring": r["name"], "role": r["role"],
         "transport": r["transport"], "occupancy": r["occupancy"], "messages": r["messages"]}
        for s in stages if _live(s) for r in s.get("rings", [])
    ]  # fmt: skip
    primaries = [s for s in stages if s.get("role", "primary") == "primary"]
    replicas = [_replica_row(s, primaries) for s in stages if s not in primaries]
    result = {"nodes": nodes, "stages": [_stage_row(s) for s in primaries], "rings": rings,
              "replicas": replicas}  # fmt: skip
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    out = Console(highlight=False)
    out.print(nodes_table(nodes, primaries))
    out.print(stages_table(result["stages"]))
    if replicas:
        out.print(replicas_table(replicas))
    out.print(rings_table(rings))


def survey(cluster: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every node's entry (health included) and every stage its agent reports."""
    from dpmigrate.cluster import cordon

    try:
        fenced: dict[str, Any] | None = cordon.cordoned(cluster.store())
    except DpmigrateError:
        fenced = None  # the store is away: cordons unknown, shown as "?"
    nodes, stages = [], []
    for node in cluster.nodes:
        cordoned = None if fenced is None else node.name in fenced
        entry: dict[str, Any] = {"name": node.name, "address": node.address,
                                 "agent_pid": node.agent_pid, "alive": False,
                                 "cordoned": cordoned}  # fmt: skip
        try:
            with cluster.client(node.name, timeout=AGENT_TIMEOUT_S) as agent:
                report = agent.call("status")
            entry["alive"] = True
            stages.extend(report["stages"])
        except DpmigrateError as err:
            entry["error"] = str(err)
        nodes.append(entry)
    return nodes, stages


# -- the overview's tables (each fits 80 columns) ------------------------------------------


def _table(title: str) -> Table:
    return Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)


def _health(node: dict[str, Any]) -> str:
    health = "alive" if node["alive"] else "DEAD"
    if node.get("cordoned") is None:
        return f"{health}, cordon ?"
    return f"{health}, cordoned" if node["cordoned"] else health


def nodes_table(nodes: list[dict[str, Any]], primaries: list[dict[str, Any]]) -> Table:
    table = _table("nodes")
    for col in ("node", "address", "agent pid", "health", "stages"):
        table.add_column(col, no_wrap=True, justify="right" if col == "stages" else "left")
    for n in nodes:
        count = sum(1 for s in primaries if s.get("node") == n["name"] and _live(s))
        table.add_row(n["name"], n["address"], str(n["agent_pid"]), _health(n), str(count))
    return table


def stages_table(rows: list[dict[str, Any]]) -> Table:
    table = _table("stages")
    for col in ("stage", "node", "phase", "in", "out", "rst", "epoch", "standby", "lag"):
        right = col in ("in", "out", "rst", "epoch", "lag")
        table.add_column(col, no_wrap=True, overflow="ellipsis",
                         justify="right" if right else "left")  # fmt: skip
    for s in rows:
        if not _live(s):
            continue  # the record a moved stage left on its old node
        standbys = s.get("standbys") or []
        standby = ",".join(f"{x.get('node')} {'✓' if x.get('in_sync') else '✗'}"
                           for x in standbys) or "-"  # fmt: skip
        lags = [x.get("lag_s") for x in standbys if x.get("lag_s") is not None]
        lag = f"{max(lags) * 1000:.0f} ms" if lags else "-"
        table.add_row(f"{s['app']}/{s['name']}", str(s["node"]), _phase(s), _count(s["msgs_in"]),
                      _count(s["msgs_out"]), str(s["restarts"]), _dash(s.get("epoch")), standby,
                      lag)  # fmt: skip
    return table


def replicas_table(replicas: list[dict[str, Any]]) -> Table:
    table = _table("replicas (hot standbys, statesync targets)")
    for col in ("stage", "node", "role", "synced", "gating", "lag", "behind"):
        table.add_column(col, no_wrap=True, overflow="ellipsis")
    for r in replicas:
        lag = "-" if r["lag_s"] is None else f"{r['lag_s'] * 1000:.0f} ms"
        behind = "-" if r["lag_points"] is None else f"{r['lag_points']:,} points"
        table.add_row(f"{r['app']}/{r['name']}", str(r["node"]), str(r["role"]),
                      "yes" if r["synced"] else "no", "yes" if r["in_sync"] else "no", lag,
                      behind)  # fmt: skip
    return table


def rings_table(rings: list[dict[str, Any]]) -> Table:
    table = _table("rings")
    for col in ("ring", "stage", "role", "transport", "occupancy", "messages"):
        right = col in ("occupancy", "messages")
        table.add_column(col, no_wrap=True, overflow="ellipsis",
                         justify="right" if right else "left")  # fmt: skip
    for r in rings:
        table.add_row(r["ring"], r["stage"], r["role"], r["transport"], str(r["occupancy"]),
                      _count(r["messages"]))  # fmt: skip
    return table


def _live(s: dict[str, Any]) -> bool:
    return not s.get("moved") and not s.get("fenced")


def _phase(s: dict[str, Any]) -> str:
    if s.get("failed"):
        return "FAILED"
    if s.get("finished"):
        return "finished"
    return str(s.get("phase") or "?")


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)


def _count(n: Any) -> str:
    """A message count in at most 6 characters: 9,999 / 467.8k / 12.3M."""
    if not isinstance(n, int):
        return "-"
    if n < 10_000:
        return f"{n:,}"
    if n < 1_000_000:
        return f"{n / 1000:.1f}k"
    return f"{n / 1_000_000:.1f}M"


# -- the rows of the JSON document ----------------------------------------------------------


def _replica_row(s: dict[str, Any], primaries: list[dict[str, Any]]) -> dict[str, Any]:
    """A replica as its own status says (synced, lag) and as its primary sees it: whether
    the primary gates on it (``in_sync``: it can take over), its lag in points and seconds."""
    primary = next((p for p in primaries if (p.get("app"), p["name"]) == (s.get("app"), s["name"])),
                   {})  # fmt: skip
    seen = next((x for x in primary.get("standbys", []) if x.get("node") == s.get("node")), {})
    lag = s.get("lag") or {}
    return {
        "app": s.get("app"), "name": s["name"], "node": s.get("node"), "role": s.get("role"),
        "pid": s.get("pid"), "synced": bool(s.get("synced")), "in_sync": bool(seen.get("in_sync")),
        "lag_points": seen.get("lag_points", lag.get("lag_points")),
        "lag_s": seen.get("lag_s", lag.get("lag_s")), "finished": s.get("finished", False),
    }  # fmt: skip


def _stage_row(s: dict[str, Any]) -> dict[str, Any]:
    return {
        "app": s.get("app"), "name": s["name"], "node": s.get("node"), "pid": s.get("pid"),
        "state_version": s.get("state_version", 0), "msgs_in": s.get("msgs_in", 0),
        "msgs_out": s.get("msgs_out", 0), "restarts": s.get("restarts", 0),
        "finished": s.get("finished", False), "metrics": s.get("metrics", {}),
        "standbys": s.get("standbys", []),
        # its control group: limits, applied, usage (cpu_seconds, memory_bytes,
        # throttled_periods, oom_kills), oom deaths, last_exit; None: no limits
        "resources": s.get("resources"),
        "phase": s.get("phase"), "epoch": s.get("epoch"), "failed": s.get("failed", False),
        "moved": bool(s.get("moved") or s.get("fenced")),
    }  # fmt: skip


def resources_cell(resources: dict[str, Any] | None) -> str:
    """A stage's limits and usage in one line ("-": it has no control group)."""
    if not resources:
        return "-"
    usage, limits = resources.get("usage") or {}, resources.get("limits") or {}
    memory = f"{usage.get('memory_bytes', 0) / 2**20:.0f}M"
    if "memory" in limits:
        memory += f"/{limits['memory'] / 2**20:.0f}M"
    quota = f"/{limits['cpu_quota']}" if "cpu_quota" in limits else ""
    throttled, oom = usage.get("throttled_periods", 0), resources.get("oom", 0)
    cpu = f"{usage.get('cpu_seconds', 0):.1f}s{quota}"
    return f"cpu {cpu} mem {memory} throttled {throttled} oom {oom}"


# -- one stage ------------------------------------------------------------------------------


def _find(stage: str, stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stage's instances (its primary first, then its replicas); an error listing what
    runs when the name is unknown or ambiguous."""
    app, _, name = stage.rpartition("/")
    live = [s for s in stages if _live(s)]
    mine = [s for s in live if s["name"] == name and (not app or s.get("app") == app)]
    apps = {s.get("app") for s in mine}
    running = ", ".join(sorted({f"{s.get('app')}/{s['name']}" for s in live})) or "nothing"
    if not mine:
        raise DpmigrateError(f"no stage {stage!r} on the cluster (running: {running})")
    if len(apps) > 1:
        raise DpmigrateError(f"stage name {stage!r} is ambiguous; use APP/STAGE "
                             f"(running: {running})")  # fmt: skip
    return sorted(mine, key=lambda s: s.get("role", "primary") != "primary")


def _one_stage(stage: str, stages: list[dict[str, Any]], as_json: bool) -> None:
    found = _find(stage, stages)
    primary = found[0] if found[0].get("role", "primary") == "primary" else None
    if as_json:
        click.echo(json.dumps({"stage": primary, "replicas": found[1:] if primary else found},
                              indent=2))  # fmt: skip
        return
    out = Console(highlight=False)
    for info in found:
        out.print(stage_table(info))
        out.print(stage_rings_table(info))


def stage_table(s: dict[str, Any]) -> Table:
    """Everything one instance reports, one fact per row."""
    role = s.get("role", "primary")
    table = _table(f"{s.get('app')}/{s['name']} ({role}) on {s.get('node')}")
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")
    rss = s.get("rss_bytes")
    rows: list[tuple[str, str]] = [
        ("phase", _phase(s)), ("pid", _dash(s.get("pid"))), ("epoch", _dash(s.get("epoch"))),
        ("state version", _dash(s.get("state_version"))),
        ("state digest", _dash(s.get("state_digest"))),
        ("in", f"{s.get('msgs_in', 0):,}"), ("out", f"{s.get('msgs_out', 0):,}"),
        ("batches", f"{s.get('batches', 0):,}"), ("restarts", str(s.get("restarts", 0))),
        ("memory", "-" if not rss else f"{rss / 2**20:.1f} MiB"),
        ("resources", resources_cell(s.get("resources"))),
        ("manifest", _dash(s.get("manifest"))), ("log", _dash(s.get("log"))),
    ]  # fmt: skip
    for standby in s.get("standbys") or []:
        lag = standby.get("lag_s")
        rows.append((f"standby {standby.get('node')}",
                     f"{'in sync' if standby.get('in_sync') else 'not in sync'}, "
                     f"{_dash(standby.get('lag_points'))} points, "
                     f"{'-' if lag is None else f'{lag * 1000:.0f} ms'} behind"))  # fmt: skip
    gaps = s.get("input_gaps") or []
    if gaps:
        longest = max(end - start for start, end in gaps)
        rows.append(("input gaps", f"{len(gaps)}, longest {longest * 1000:.0f} ms"))
    for key, value in (s.get("metrics") or {}).items():
        rows.append((f"metric {key}", value if isinstance(value, str) else json.dumps(value)))
    for field, value in rows:
        table.add_row(field, value)
    return table


def stage_rings_table(s: dict[str, Any]) -> Table:
    table = _table(f"rings of {s.get('app')}/{s['name']}")
    for col in ("ring", "role", "via", "occ/cap", "msgs", "reconn", "resent"):
        left = col in ("ring", "role", "via")
        table.add_column(col, no_wrap=True, overflow="ellipsis",
                         justify="left" if left else "right")  # fmt: skip
    for r in s.get("rings") or []:
        table.add_row(r["name"], r["role"], r["transport"],
                      f"{r.get('occupancy', 0)}/{r.get('capacity', '?')}",
                      _count(r.get("messages")), str(r.get("reconnects", 0)),
                      str(r.get("resent", 0)))  # fmt: skip
    return table
