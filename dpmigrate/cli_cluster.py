"""`dpmigrate cluster up|status|down`, `dpmigrate clean` and `dpmigrate logs`: the cluster from
the shell — local nodes (network namespaces here) and, from a cluster file, nodes over SSH.

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

from dpmigrate.cluster import clusterfile
from dpmigrate.cluster import hugepages as hugepages_mod
from dpmigrate.errors import ConfigError
from dpmigrate.runtime import cluster as local

_FILE_HELP = "Cluster file (TOML): local nodes, SSH nodes, the store (see README)."


def _state_dir(path: str | None) -> str | None:
    """The state dir a cluster file names (None: DPMIGRATE_STATE_DIR's)."""
    return clusterfile.load(path).state_dir if path else None


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def _print_status(status: dict[str, Any], title: str) -> None:
    table = Table(title=title)
    for col in ("node", "kind", "address", "agent pid", "agent", "reached at"):
        table.add_column(col, overflow="fold")
    for n in status["nodes"]:
        if n["alive"]:
            state = "[green]answers[/green]"
        elif n["agent_running"]:
            state = "[yellow]running, not answering[/yellow]"
        else:
            state = "[bold red]down[/bold red]"
        ssh = n.get("kind") == "ssh"
        table.add_row(
            n["name"], "ssh" if ssh else f"netns {n['netns']}", n["address"],
            str(n["agent_pid"] or "-"), state,
            f"{n['ssh']} (tunnel)" if ssh else n["agent_socket"],
        )  # fmt: skip
    Console().print(table)
    for n in status["nodes"]:
        if n.get("error"):
            Console().print(f"[bold red]{n['name']}[/bold red]: {n['error']}", soft_wrap=True)
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
    huge = status.get("hugepages")
    if huge:
        now = huge.get("pool_now") or {}
        Console().print(
            f"hugepages: {huge.get('added')} of {huge.get('asked')} 2 MB pages reserved by this "
            f"cluster (pool {now.get('total')}, {now.get('free')} free)"
        )
        if huge.get("note"):
            Console().print(f"[yellow]{huge['note']}[/yellow]", soft_wrap=True)
    if not status["healthy"]:
        Console().print(
            f"[bold red]cluster {status['id']} is not healthy[/bold red] (status "
            f"{status['status']}); `dpmigrate logs NODE` shows a node's agent log; "
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
    default=None,
    help=f"Number of local nodes (1-{local.MAX_NODES}; default 3).",
)
@click.option("--file", "path", type=click.Path(dir_okay=False), help=_FILE_HELP)
@click.option(
    "--accept-host-key",
    "accept",
    multiple=True,
    metavar="SHA256:...",
    help="Accept an SSH host whose key known_hosts does not know yet, if its fingerprint is "
    "this one (repeatable); it is then added to known_hosts.",
)
@click.option(
    "--hugepages",
    type=int,
    default=None,
    metavar="N",
    help="Reserve N 2 MB hugepages for the shm rings while the cluster is up (given back by "
    "down; default DPMIGRATE_HUGEPAGES).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the cluster as JSON.")
def up_cmd(
    nodes: int | None,
    path: str | None,
    accept: tuple[str, ...],
    hugepages: int | None,
    as_json: bool,
) -> None:
    """Create the nodes, each with an agent; return while they run.

    Without --file: N local nodes (network namespaces joined by veth pairs). With --file: the
    nodes the cluster file lists, local ones and SSH ones."""
    for fp in accept:
        if not clusterfile.FINGERPRINT_RE.fullmatch(fp):
            raise ConfigError(
                f"--accept-host-key {fp!r} is not an SSH fingerprint like SHA256:<43 base64 "
                "characters> (as a refusal prints it, or ssh-keygen -lf KEY.pub)"
            )
    if hugepages is not None:
        hugepages_mod.check_count(hugepages, "--hugepages")
    if path is not None:
        if nodes is not None:
            raise ConfigError("give --nodes or --file, not both (the file says local.nodes)")
        lc = local.LocalCluster.from_file(path, accept_host_keys=accept)
        if hugepages is not None:
            lc.hugepages = hugepages
    else:
        lc = local.LocalCluster(3 if nodes is None else nodes, hugepages=hugepages)
    lc.up()
    status = lc.status()
    if as_json:
        _print_json(status)
    else:
        _print_status(status, f"cluster {status['id']} is up ({len(status['nodes'])} nodes)")


@cluster.command("status")
@click.option("--file", "path", type=click.Path(dir_okay=False), help=_FILE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status_cmd(path: str | None, as_json: bool) -> None:
    """Show the nodes, their addresses and whether each agent answers."""
    status = local.LocalCluster.current(_state_dir(path)).status()
    if as_json:
        _print_json(status)
    else:
        _print_status(status, f"cluster {status['id']} ({len(status['nodes'])} nodes)")


@cluster.command("down")
@click.option("--file", "path", type=click.Path(dir_okay=False), help=_FILE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print what was removed as JSON.")
def down_cmd(path: str | None, as_json: bool) -> None:
    """Stop the agents and remove every namespace, link and file the cluster recorded (on an
    SSH node: its agent, its stages and its folder there)."""
    removed = local.LocalCluster(state_dir=_state_dir(path)).down()
    if as_json:
        _print_json({"removed": removed})
    else:
        _print_removed(removed, "cluster removed")


@click.command("clean")
@click.option("--json", "as_json", is_flag=True, help="Print what was removed as JSON.")
def clean(as_json: bool) -> None:
    """Remove what a crashed cluster left behind, exactly as its record lists it, and the
    control groups of multi-process runs killed before they could stop (as their records
    list them)."""
    removed = local.clean()
    if as_json:
        _print_json({"removed": removed})
    else:
        _print_removed(removed, "cleaned up")


@click.command("logs")
@click.argument("node")
@click.option("--lines", "-n", type=click.IntRange(min=1), help="Only the last N lines.")
@click.option("--file", "path", type=click.Path(dir_okay=False), help=_FILE_HELP)
def logs_cmd(node: str, lines: int | None, path: str | None) -> None:
    """Print a node's agent log: read here for a local node, over SFTP from its host for an
    SSH node (where it is kept)."""
    text = local.LocalCluster.current(_state_dir(path)).agent_log(node, lines)
    click.echo(text.rstrip("\n"))
