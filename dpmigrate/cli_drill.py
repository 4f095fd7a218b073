"""`dpmigrate drill [NAME ...]`: chaos drills against a private live local cluster."""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console

from dpmigrate.migrate import STRATEGIES


@click.command("drill")
@click.argument("names", nargs=-1)
@click.option("--list", "list_only", is_flag=True, help="List the drills and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--repeat", type=click.IntRange(1, 100), default=1, show_default=True,
              help="Run the drills this many times over.")  # fmt: skip
@click.option("--strategy", "strategies", multiple=True, type=click.Choice(list(STRATEGIES)),
              help="migrate-loop: only these strategies (default: every one).")  # fmt: skip
@click.option("--drop-checker-input", type=click.IntRange(0, 1000), default=0, hidden=True,
              help="Test hook: the checker drops N input messages, so the drill must fail.")
def drill_cmd(names: tuple[str, ...], list_only: bool, as_json: bool, repeat: int,
              strategies: tuple[str, ...], drop_checker_input: int) -> None:  # fmt: skip
    """Run chaos drills (all of them without NAME) on a private 4-node local cluster under
    the flows example's traffic; each checks exactly-once in order, the state digest, that no
    stage is left quiesced or failed, and that the cluster is clean afterwards.

    Exit status 1 when any drill failed. Needs root, CRIU, nftables and tc.
    """
    from dpmigrate.drill import DRILLS, Options, describe, run_drills
    from dpmigrate.drill.report import as_json as to_json
    from dpmigrate.drill.report import table

    if list_only:
        if as_json:
            click.echo(json.dumps({"drills": [{"name": n, "description": describe(n)}
                                              for n in DRILLS]}, indent=2))  # fmt: skip
        else:
            for name in DRILLS:
                click.echo(f"{name:38} {describe(name)}")
        return
    unknown = [n for n in names if n not in DRILLS]
    if unknown:
        raise click.UsageError(f"unknown drill(s) {', '.join(unknown)}; see --list")
    options = Options(strategies=strategies or tuple(STRATEGIES),
                      drop_checker_input=drop_checker_input)  # fmt: skip
    console = Console(stderr=True)
    say = (lambda m: None) if as_json else (lambda m: console.print(f"[bold]drill:[/] {m}",
                                                                    highlight=False))
    results = run_drills(list(names) or list(DRILLS), repeat, options, say)
    if as_json:
        click.echo(json.dumps(to_json(results), indent=2))
    else:
        out = Console()
        (out if out.is_terminal else Console(width=200)).print(table(results))
    if not all(r.passed for r in results):
        sys.exit(1)
