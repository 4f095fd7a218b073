"""`dpmigrate migrate` and `dpmigrate demo`: live migration from the command line."""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console
from rich.status import Status
from rich.table import Table

from dpmigrate.migrate import STRATEGIES, MigrationReport

_ROWS = (
    ("total_time_s", "total time", "s"),
    ("downtime_s", "downtime (seen downstream)", "s"),
    ("asleep_s", "asleep (quiesced to woken)", "s"),
    ("reconnect_after_placement_s", "rings back after the placement", "s"),
    ("frozen_time_s", "frozen time (CRIU)", "s"),
    ("transferred_bytes", "transferred", "bytes"),
    ("pages_written", "pages written", ""),
    ("lost", "messages lost", ""),
    ("duplicated", "messages duplicated", ""),
    ("state_digest_before", "state digest at the freeze", ""),
    ("state_digest_after", "state digest after", ""),
    ("rolled_back", "rolled back", ""),
)


def report_table(report: MigrationReport) -> Table:
    table = Table(
        title=f"{report.stage}: {report.source} → {report.destination} ({report.strategy})"
    )
    table.add_column("statistic")
    table.add_column("value", justify="right")
    data = report.as_dict()
    for key, label, unit in _ROWS:
        value = data[key]
        if unit == "bytes" and isinstance(value, int):
            text = f"{value / 2**20:,.1f} MiB"
        elif unit == "s" and isinstance(value, float):
            text = f"{value * 1000:,.1f} ms"
        else:
            text = "-" if value is None else str(value)
        table.add_row(label, text)
    for phase, seconds in report.phases.items():
        table.add_row(f"  phase {phase}", f"{seconds * 1000:,.1f} ms")
    if report.error:
        table.add_row("error", report.error)
    for warning in report.warnings:  # a clean-up step that failed (a folder left behind)
        table.add_row("warning", warning)
    for step in report.rollback_steps:
        table.add_row("rollback step", step)
    for failure in report.rollback_failures:
        table.add_row("[bold red]NOT UNDONE[/]", failure)
    return table


def migrations_table(reports: list[MigrationReport]) -> Table:
    table = Table(title="migrations")
    for col in ("stage", "from → to", "strategy", "total", "downtime", "frozen", "MiB",
                "pages", "lost", "dup", "digest kept", "rolled back"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in reports:
        kept = r.state_digest_before == r.state_digest_after if r.state_digest_after else "-"
        table.add_row(
            r.stage, f"{r.source} → {r.destination}", r.strategy, f"{r.total_time_s * 1000:.0f} ms",
            "-" if r.downtime_s is None else f"{r.downtime_s * 1000:.0f} ms",
            f"{r.frozen_time_s * 1000:.1f} ms", f"{r.transferred_bytes / 2**20:.1f}",
            f"{r.pages_written:,}", str(r.lost), str(r.duplicated), str(kept),
            "YES" if r.rolled_back else "no",
        )  # fmt: skip
    return table


class PhaseProgress:
    """The progress line of one migration: its label, then each phase as it starts. On a
    terminal it is a live status line, redrawn in place; :meth:`line` is the same text for
    a log or a summary (``dpmigrate drain`` prints it once per stage). A context manager."""

    def __init__(self, console: Console, label: str, live: bool = True) -> None:
        self.console = console
        self.label = label
        self.phases: list[str] = []
        self._status: Status | None = None
        self._live = live and console.is_terminal

    def __enter__(self) -> PhaseProgress:
        if self._live:
            self._status = self.console.status(self.line())
            self._status.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def on_phase(self, phase: str) -> None:
        """The engine's ``on_phase`` callback."""
        self.phases.append(phase)
        if self._status is not None:
            self._status.update(self.line())

    def line(self) -> str:
        return f"{self.label}: {', '.join(self.phases) or 'starting'}"


def exit_status(report: MigrationReport) -> int:
    """0: moved; 1: rolled back, everything undone; 2: something could not be undone."""
    if not report.rolled_back:
        return 0
    return 2 if report.rollback_failures else 1


@click.command("migrate")
@click.argument("stage")
@click.option("--to", "destination", required=True, help="Destination node.")
@click.option("--strategy", type=click.Choice(list(STRATEGIES)), default="stop-and-copy",
              show_default=True)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def migrate_cmd(stage: str, destination: str, strategy: str, as_json: bool) -> None:
    """Live-migrate a running STAGE ([APP/]STAGE) of the cluster to another node.

    Any failure before the destination is verified — SIGINT and SIGTERM included — rolls
    back: the stage keeps running where it was, with nothing lost. Exit status 0 when it
    moved, 1 when it rolled back cleanly, 2 when something could not be undone (listed, with
    what is left to do).
    """
    from dpmigrate.cluster import cordon
    from dpmigrate.migrate import LocalCluster

    cluster = LocalCluster.current()
    # One line, before anything starts (the engine's preflight refuses it too, for the API).
    cordon.refuse_if_cordoned(cluster.store(), destination, f"migrating {stage} there")
    console = Console(stderr=True)
    with PhaseProgress(console, f"{stage} → {destination}", live=not as_json) as progress:
        report = cluster.migrate(stage, to=destination, strategy=strategy,
                                 on_phase=progress.on_phase)  # fmt: skip
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        _out().print(report_table(report))
    status = exit_status(report)
    if status == 2:
        if not as_json:
            click.echo(f"dpmigrate: migration failed ({report.error}) and the rollback could not "
                       "undo everything:", err=True)  # fmt: skip
            for failure in report.rollback_failures:
                click.echo(f"  - {failure}", err=True)
            click.echo("what is left to do: see each line above; `dpmigrate status` shows which "
                       "stages run; a stage left quiesced or failed can be restarted with "
                       "`dpmigrate stop APP` and a new run", err=True)  # fmt: skip
        sys.exit(2)
    if status == 1:
        if not as_json:
            click.echo(f"dpmigrate: migration rolled back: {report.error}; the stage runs on "
                       f"{report.source} as before", err=True)  # fmt: skip
        sys.exit(1)


@click.command("demo")
@click.option(
    "--plot",
    "plot",
    default=None,
    metavar="FILE.png",
    help="Write the timeline plot (messages/s at the checker, phases shaded) here.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def demo_cmd(plot: str | None, as_json: bool) -> None:
    """The main job: a 4-node local cluster, the flows pipeline under traffic, its flow-table
    stage (hot standby on node4) migrated node2 → node1 (stop-and-copy) → node3 (post-copy)
    → node2 (statesync), then node2 killed and the standby taking over; the checker's
    verdict and a timeline plot. Everything it builds is torn down at the end."""
    from dpmigrate.migrate.demo import failover_line, run_demo, table

    console = Console(stderr=True)
    say = (lambda m: None) if as_json else (lambda m: console.print(f"[bold]demo:[/bold] {m}"))
    result = run_demo(plot, say)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
    else:
        out = _out()
        out.print(table(result))
        if result.failover is not None:
            out.print(failover_line(result.failover), highlight=False)
        c = result.checker
        verdict = "[bold green]PASS[/bold green]" if result.ok else "[bold red]FAIL[/bold red]"
        total = result.as_dict()["checker"]["expected_total"]
        out.print(f"checker: received {c.get('received', 0):,} of {total:,}, "
                  f"lost {c.get('lost')}, duplicated {c.get('duplicated')}, digest "
                  f"{'matches' if c.get('digest') == result.expected_digest else 'DIFFERS from'} "
                  f"an uninterrupted run — {verdict}")  # fmt: skip
        if result.plot:
            out.print(f"timeline plot: {result.plot}")
    if not result.ok:
        sys.exit(1)


def _out() -> Console:
    """Wide enough for the statistics tables also when the output is a file or a pipe."""
    console = Console()
    return console if console.is_terminal else Console(width=150)
