"""`dpmigrate cluster up|status|down` and `dpmigrate clean`: the local cluster from the shell.

Kept apart from :mod:`dpmigrate.cli` so the two can grow independently; ``cli.main``
registers :data:`cluster` and :data:`clean` with ``add_command``. Errors are raised as
dpmigrate errors and the main group prints them as one line.
"""

from __future__ import annotations

import json
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from dpmigrate.runtime import cluster as local


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def _print_status(status: dict[str, Any], title: str) -> None:
    table = Table(title=title)
    for col in ("node", "netns", "address", "agent pid", "agent", "socket"):
        table.add_column(col, overflow="fold")
    for n in status["nodes"]:
        if n["alive"]:
            state = "[green]answers[/green]"
        elif n["agent_running"]:
            state = "[yellow]running, not answering[/yellow]"
        else:
            state = "[bold red]down[/bold red]"
        table.add_row(
            n["name"], n["netns"], n["address"], str(n["agent_pid"] or "-"), state,
            n["agent_socket"],
        )  # fmt: skip
    Console().print(table)
    store = status.get("store") or {}
    if store.get("reachable"):
        kind = "embedded member" if store.get("embedded") else "DPMIGRATE_ETCD"
        members = sum(1 for n in status["nodes"] if n.get("member"))
        Console().print(
            f"cluster store: etcd {store.get('version')} ({kind}, {store.get('endpoint')}), "
            f"revision {store.get('revision')}; {members} of {len(status['nodes'])} nodes hold "
            "a lease"
        )
    else:
        Console().print(f"[bold red]cluster store unreachable[/bold red]: {store.get('error')}")
    if not status["healthy"]:
        Console().print(
            f"[bold red]cluster {status['id']} is not healthy[/bold red] (status "
            f"{status['status']}); agent logs in {status['state_dir']}/cluster/logs; "
            "`dpmigrate cluster down` removes it"
        )


def _print_removed(removed: list[str], what: str) -> None:
    if not removed:
        Console().print(f"nothing to remove: {local.NO_CLUSTER.split(';')[0]}")
        return
    table = Table(title=what)
    table.add_column("removed", overflow="fold")
    for line in removed:
        table.add_row(line)
    Console().print(table)


@click.group("cluster")
def cluster() -> None:
    """Build, inspect and remove the local cluster (nodes = network namespaces, needs root)."""


@cluster.command("up")
@click.option(
    "--nodes",
    type=int,
    default=3,
    show_default=True,
    help=f"Number of nodes (1-{local.MAX_NODES}).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the cluster as JSON.")
def up_cmd(nodes: int, as_json: bool) -> None:
    """Create N nodes joined by veth pairs, each with an agent; return while they run."""
    lc = local.LocalCluster(nodes)
    lc.up()
    status = lc.status()
    if as_json:
        _print_json(status)
    else:
        _print_status(status, f"local cluster {status['id']} is up ({nodes} nodes)")


@cluster.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status_cmd(as_json: bool) -> None:
    """Show the nodes, their addresses and whether each agent answers."""
    status = local.LocalCluster.current().status()
    if as_json:
        _print_json(status)
    else:
        _print_status(status, f"local cluster {status['id']} ({len(status['nodes'])} nodes)")


@cluster.command("down")
@click.option("--json", "as_json", is_flag=True, help="Print what was removed as JSON.")
def down_cmd(as_json: bool) -> None:
    """Stop the agents and remove every namespace, link and file the cluster recorded."""
    removed = local.LocalCluster(state_dir=None).down()
    if as_json:
        _print_json({"removed": removed})
    else:
        _print_removed(removed, "local cluster removed")


@click.command("clean")
@click.option("--json", "as_json", is_flag=True, help="Print what was removed as JSON.")
def clean(as_json: bool) -> None:
    """Remove what a crashed cluster left behind, exactly as its record lists it."""
    removed = local.clean()
    if as_json:
        _print_json({"removed": removed})
    else:
        _print_removed(removed, "cleaned up")
