"""`dpmigrate drain NODE`, `dpmigrate cordon NODE`, `dpmigrate uncordon NODE`.

The planning and the moves are :mod:`dpmigrate.migrate.drain`'s; the cordon mark is
:mod:`dpmigrate.cluster.cordon`'s. Here: options, the progress lines (one per stage, with the
migration command's :class:`~dpmigrate.cli_migrate.PhaseProgress`), the summary table and
the exit status.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from dpmigrate.cli_migrate import PhaseProgress
from dpmigrate.migrate import STRATEGIES


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


@click.command("drain")
@click.argument("node")
@click.option("--strategy", type=click.Choice(list(STRATEGIES)), default="stop-and-copy",
              show_default=True, help="How each stage moves.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the plan, every move's report "
              "and the result as one JSON document.")  # fmt: skip
def drain_cmd(node: str, strategy: str, as_json: bool) -> None:
    """Move every stage off NODE, one at a time, and leave NODE cordoned.

    The node is cordoned first, then every move is planned before any runs: sinks first,
    each stage to the least loaded node that is alive, not cordoned, runs no standby of it
    and has room for it. If some stage has nowhere to go, nothing moves and the cordon is as
    it was (exit status 2, naming the stage and why). A stage whose migration fails rolls
    back and stays; the others still move (exit status 1). Exit status 0: NODE is empty.
    `dpmigrate uncordon NODE` makes it schedulable again.
    """
    from dpmigrate.migrate import LocalCluster
    from dpmigrate.migrate.drain import Drain, DrainPlan, Move, MoveResult

    cluster = LocalCluster.current()
    console = Console(stderr=True, highlight=False)
    current: list[PhaseProgress] = []

    def on_move(move: Move) -> Callable[[str], None]:
        progress = PhaseProgress(console, f"{move.stage} {move.source} → {move.destination}",
                                 live=not as_json)  # fmt: skip
        current.append(progress.__enter__())
        return progress.on_phase

    def on_done(outcome: MoveResult) -> None:
        progress = current.pop() if current else None
        if progress is not None:
            progress.__exit__(None, None, None)
        if not as_json:
            line = progress.line() if progress else f"{outcome.move.stage}: not tried"
            console.print(f"{line} — {_result_text(outcome)}")

    def on_plan(plan: DrainPlan) -> None:
        if as_json:
            return
        console.print(f"plan: {len(plan.moves)} move(s) off {node}, sinks first")
        for move in plan.moves:
            console.print(f"  {move.stage} → {move.destination} ({move.why})")
        for note in plan.notes:
            console.print(f"note: {note}")

    result = Drain(cluster, node, strategy, on_move=on_move, on_done=on_done,
                   on_plan=on_plan).run()  # fmt: skip
    if as_json:
        _echo_json(result.as_dict())
        sys.exit(result.exit_status)
    if result.result == "refused":
        click.echo(f"dpmigrate: {result.error}", err=True)
        sys.exit(2)
    out = Console(highlight=False)
    if result.moves:
        out.print(summary_table(result.moves))
    moved = sum(m.result == "moved" for m in result.moves)
    if result.exit_status == 0:
        verdict = (f"{node} drained: {moved} stage(s) moved; {node} stays cordoned "
                   f"(`dpmigrate uncordon {node}` to use it again)")  # fmt: skip
    else:
        verdict = (f"{node} NOT fully drained: {moved} of {len(result.moves)} stage(s) moved, "
                   "the others run where they were (see the table); fix what the errors say "
                   "and drain again")  # fmt: skip
    out.print(verdict)
    sys.exit(result.exit_status)


def _result_text(outcome: Any) -> str:
    report = outcome.report
    if outcome.result == "moved" and report is not None:
        return f"moved, downtime {_ms(report.downtime_s)}"
    return f"{outcome.result}: {outcome.error}" if outcome.error else outcome.result


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def summary_table(moves: list[Any]) -> Table:
    """stage, from, to, strategy, downtime, result: one row per planned move."""
    table = Table(title="drain")
    for col in ("stage", "from", "to", "strategy", "downtime", "result"):
        table.add_column(col, no_wrap=col != "result", overflow="fold")
    for m in moves:
        downtime = _ms(m.report.downtime_s) if m.report is not None else "-"
        result = m.result if m.result == "moved" else f"{m.result}: {m.error}"
        move = m.move
        table.add_row(move.stage, move.source, move.destination, move.strategy, downtime, result)
    return table


@click.command("cordon")
@click.argument("node")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def cordon_cmd(node: str, as_json: bool) -> None:
    """Mark NODE unschedulable: what runs there stays, nothing new is placed there (no drain,
    failover or `dpmigrate migrate` chooses it). Idempotent."""
    from dpmigrate.cluster import cordon
    from dpmigrate.runtime.cluster import LocalCluster

    cluster = LocalCluster.current()
    cluster.node(node)  # one clear error for an unknown node
    result = cordon.cordon(cluster.store(), node)
    _said(result, as_json, f"{node} cordoned" if result["changed"] else
          f"{node} was already cordoned")  # fmt: skip


@click.command("uncordon")
@click.argument("node")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def uncordon_cmd(node: str, as_json: bool) -> None:
    """Make NODE schedulable again. Idempotent."""
    from dpmigrate.cluster import cordon
    from dpmigrate.runtime.cluster import LocalCluster

    cluster = LocalCluster.current()
    cluster.node(node)
    result = cordon.uncordon(cluster.store(), node)
    _said(result, as_json, f"{node} uncordoned" if result["changed"] else
          f"{node} was not cordoned")  # fmt: skip


def _said(result: dict[str, Any], as_json: bool, text: str) -> None:
    if as_json:
        _echo_json(result)
    else:
        Console(highlight=False).print(text)


COMMANDS = (drain_cmd, cordon_cmd, uncordon_cmd)
