"""`dpmigrate standby STAGE --on NODE` (and `--off NODE`): a running stage's hot standbys."""

from __future__ import annotations

import json
from typing import Any

import click
from rich.console import Console


@click.command("standby")
@click.argument("stage")
@click.option("--on", "on_node", help="Start a standby of STAGE on this node.")
@click.option("--off", "off_node", help="Stop the standby of STAGE on this node.")
@click.option("--no-wait", is_flag=True, help="Return once started, before it is in sync.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def standby_cmd(
    stage: str, on_node: str | None, off_node: str | None, no_wait: bool, as_json: bool
) -> None:
    """Add or remove a hot standby of a running STAGE ([APP/]STAGE).

    A new standby receives a snapshot of the stage's state and then every committed point; it
    can take over when the primary's node dies once the primary gates on it ("in sync" in
    `dpmigrate status`), which this command waits for unless --no-wait.
    """
    from dpmigrate.runtime import standbys
    from dpmigrate.runtime.cluster import LocalCluster

    if (on_node is None) == (off_node is None):
        raise click.UsageError("give exactly one of --on NODE or --off NODE")
    cluster = LocalCluster.current()
    if off_node is not None:
        result = standbys.remove_standby(cluster, stage, off_node)
        _done(result, as_json, f"stopped the standby of {result['app']}/{result['stage']} on "
              f"{off_node}")  # fmt: skip
        return
    assert on_node is not None
    console = Console(stderr=True)
    if as_json or not console.is_terminal or no_wait:
        result = standbys.add_standby(cluster, stage, on_node, wait=not no_wait)
    else:
        with console.status(f"starting a standby of {stage} on {on_node}") as status:

            def progress(entry: dict[str, Any]) -> None:
                phase = entry.get("phase") or "connecting"
                status.update(f"standby of {stage} on {on_node}: {phase}, "
                              f"{entry.get('lag_points', '?')} points behind")  # fmt: skip

            result = standbys.add_standby(cluster, stage, on_node, on_progress=progress)
    state = "in sync" if result["in_sync"] else "started (not yet in sync)"
    _done(result, as_json, f"standby of {result['app']}/{result['stage']} on {on_node}: {state} "
          f"with the primary on {result['primary']}")  # fmt: skip


def _done(result: dict[str, Any], as_json: bool, text: str) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        Console().print(text, highlight=False)
