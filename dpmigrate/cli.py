"""The `dpmigrate` command.

Every subcommand takes ``--json`` where a script may want the result. Errors from the
:mod:`dpmigrate.errors` tree become one line on stderr and exit status 1 (2 for bad
configuration); a traceback means a bug in dpmigrate.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from dpmigrate import __version__, config, doctor
from dpmigrate.errors import ConfigError, DpmigrateError

_STATUS_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red"}


class _Group(click.Group):
    """Turns dpmigrate errors into one clear line and a non-zero exit."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as err:
            click.echo(f"dpmigrate: configuration error: {err}", err=True)
            sys.exit(2)
        except DpmigrateError as err:
            click.echo(f"dpmigrate: error: {err}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("dpmigrate: interrupted", err=True)
            sys.exit(130)


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dpmigrate")
def main() -> None:
    """Run data-plane stages across nodes and live-migrate them without losing a message."""


@main.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor_cmd(as_json: bool) -> None:
    """Check that checkpoint and migration can work on this machine."""
    cfg = config.load()
    console = Console(stderr=True)
    if as_json or not console.is_terminal:
        report = doctor.run(cfg)
    else:
        with console.status("checking") as status:
            report = doctor.run(cfg, progress=lambda name: status.update(f"checking {name}"))
    if as_json:
        _print_json(report.as_dict())
    else:
        table = Table(title=f"dpmigrate doctor — criu {report.criu_version} at {report.criu_path}")
        table.add_column("check")
        table.add_column("status")
        table.add_column("detail / what to do", overflow="fold")
        for check in report.checks:
            style = _STATUS_STYLE[check.status]
            table.add_row(check.name, f"[{style}]{check.status}[/{style}]", check.detail)
        Console().print(table)
        verdict = (
            "checkpoint and migration can work here"
            if report.ok
            else "NOT ready: fix the failed checks"
        )
        Console().print(f"[bold]{verdict}[/bold]")
    sys.exit(0 if report.ok else 1)


@main.command("config")
@click.option("--json", "as_json", is_flag=True, help="Print the settings as JSON.")
def config_cmd(as_json: bool) -> None:
    """Show every setting, its DPMIGRATE_* variable and its effective value."""
    rows = config.load().describe()
    if as_json:
        _print_json(rows)
        return
    table = Table(title="dpmigrate settings")
    for col in ("variable", "value", "source", "meaning"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(
            row["env"], str(row["value"]), "env" if row["from_env"] else "default", row["help"]
        )
    Console().print(table)


if __name__ == "__main__":
    main()
