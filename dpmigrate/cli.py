"""The `dpmigrate` command.

Every subcommand takes ``--json`` where a script may want the result. Errors from the
:mod:`dpmigrate.errors` tree become one line on stderr and exit status 1 (2 for bad
configuration); a traceback means a bug in dpmigrate.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click
from rich.console import Console
from rich.live import Live
from rich.table import Table

from dpmigrate import __version__, config, doctor
from dpmigrate.cli_checkpoint import COMMANDS as CHECKPOINT_COMMANDS
from dpmigrate.cli_cluster import clean, cluster, logs_cmd
from dpmigrate.cli_drain import COMMANDS as DRAIN_COMMANDS
from dpmigrate.cli_drill import drill_cmd
from dpmigrate.cli_migrate import demo_cmd, migrate_cmd
from dpmigrate.cli_standby import standby_cmd
from dpmigrate.cli_status import status_cmd
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


MODELS = ("in-process", "multi-process", "multi-node")


@main.command("run")
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--model", type=click.Choice(MODELS), default="in-process", show_default=True)
@click.option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Stop after this many seconds (default: when every source finished).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option(
    "--detach", is_flag=True, help="multi-node: start the app on the running cluster and return."
)
@click.option(
    "--resources",
    "resources",
    multiple=True,
    metavar="STAGE.KEY=VALUE",
    help="Override one limit of a stage for this run (repeatable), e.g. table.memory=256M, "
    "table.cpu_quota=0.5; checked like the manifest's resources.",
)
@click.option(
    "--resources-file",
    "resources_files",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="A TOML file of overrides: [STAGE] tables of limits (--resources wins over it).",
)
def run_cmd(
    manifest: str,
    model: str,
    duration: float | None,
    as_json: bool,
    detach: bool,
    resources: tuple[str, ...],
    resources_files: tuple[str, ...],
) -> None:
    """Run an app in the foreground and print a summary at the end."""
    from dpmigrate.runtime.manifest import App, parse_resource_options

    cfg = config.load()  # a ring the manifest gives no capacity gets DPMIGRATE_RING_CAPACITY
    app = App.load(manifest, ring_capacity=cfg.ring_capacity)
    if resources or resources_files:
        app = app.with_resources(parse_resource_options(resources, resources_files), "--resources")
    console = Console(stderr=True)
    live_view = not as_json and console.is_terminal
    rates = _RateView(console)
    try:
        if model == "in-process":
            from dpmigrate.runtime import inprocess

            def tick(runners: list[Any]) -> None:
                rates.show(inprocess.summary(runners)["stages"])

            runners = inprocess.run(app, duration=duration, on_tick=tick if live_view else None)
            stages = inprocess.summary(runners)["stages"]
        elif model == "multi-process":
            from dpmigrate.runtime.multiprocess import MultiProcessRun

            events = console.print if not as_json else (lambda message: None)
            run = MultiProcessRun(
                app, on_event=lambda m: events(f"[dim]{m}[/dim]"), state_dir=cfg.state_dir
            )
            try:
                run.start()
                finished = run.wait(duration, on_tick=rates.show if live_view else None)
            finally:
                run.stop()
            stages = run.status()
            if any(s.get("failed") for s in stages) or not (finished or duration is not None):
                console.print(f"stage logs kept in {run.run_dir / 'logs'}")
            else:
                run.cleanup()
        else:
            stages = _run_multi_node(app, duration, detach, console, rates if live_view else None)
            if stages is None:  # detached
                if as_json:
                    _print_json({"model": model, "app": app.name, "detached": True})
                else:
                    console.print(
                        f"{app.name} started on the cluster; `dpmigrate status` to watch, "
                        f"`dpmigrate stop {app.name}` to stop it"
                    )
                return
    finally:
        rates.close()
    failed = [s for s in stages if s.get("failed")]
    if failed:
        names = ", ".join(f"{s['name']} (log: {s.get('log')})" for s in failed)
        raise DpmigrateError(f"stage(s) kept crashing and were given up: {names}")
    result: dict[str, Any] = {"model": model, "app": app.name, "stages": stages}
    sinks = [
        s
        for s in stages
        if {"received", "lost", "duplicated", "digest"} <= set(s.get("metrics", {}))
    ]
    if sinks:
        m = sinks[-1]["metrics"]
        result["checker"] = {k: m[k] for k in ("received", "lost", "duplicated", "digest")}
    if as_json:
        _print_json(result)
        return
    table = Table(title=f"{app.name} — model {model}")
    for col in ("stage", "in", "out", "state version", "restarts", "metrics"):
        table.add_column(col, overflow="fold")
    for s in stages:
        table.add_row(
            s["name"],
            f"{s.get('msgs_in', 0):,}",
            f"{s.get('msgs_out', 0):,}",
            str(s.get("state_version", "?")),
            str(s.get("restarts", 0)),
            json.dumps(s.get("metrics", {})),
        )
    Console().print(table)
    if "checker" in result:
        c = result["checker"]
        Console().print(
            f"checker: received {c['received']:,}, lost {c['lost']}, "
            f"duplicated {c['duplicated']}, digest {c['digest']}"
        )


def _run_multi_node(
    app: Any, duration: float | None, detach: bool, console: Console, rates: _RateView | None
) -> list[dict[str, Any]] | None:
    """Run on the running cluster, or on a temporary one with the nodes the manifest names."""
    from dpmigrate.runtime.cluster import LocalCluster
    from dpmigrate.runtime.multinode import MultiNodeRun, nodes_needed

    try:
        cluster, temporary = LocalCluster.current(), False
    except DpmigrateError:
        if detach:
            raise DpmigrateError(
                "--detach needs a running cluster: `dpmigrate cluster up --nodes N` first"
            ) from None
        cluster, temporary = LocalCluster(nodes=nodes_needed(app)), True
        console.print(f"[dim]bringing up a temporary cluster of {nodes_needed(app)} nodes[/dim]")
        cluster.up()
    try:
        run = MultiNodeRun(app, cluster)
        run.start()
        if detach:
            return None
        try:
            finished = run.wait(duration, on_tick=rates.show if rates else None)
        finally:
            run.stop()
        stages = run.status()
        if any(s.get("failed") for s in stages):
            kept = run.keep_logs(stages)  # the cluster's log folders may go with it
            for s in stages:
                s["log"] = kept.get(s["name"], s.get("log"))
        elif finished or duration is not None:
            run.cleanup()
        return stages
    finally:
        if temporary:
            cluster.down()


@main.command("stop")
@click.argument("app")
@click.option("--json", "as_json", is_flag=True)
def stop_cmd(app: str, as_json: bool) -> None:
    """Stop a detached app on the running cluster (each stage finishes its batch)."""
    from dpmigrate.runtime.cluster import LocalCluster

    cluster = LocalCluster.current()
    stopped: list[str] = []
    for node in cluster.nodes:
        with cluster.client(node.name) as agent:
            stopped += [f"{node.name}:{key}" for key in agent.call("stop_app", app=app)]
            agent.call("forget_app", app=app)
    if not stopped:
        raise DpmigrateError(f"no stage of app {app!r} runs on the cluster (`dpmigrate status`)")
    if as_json:
        _print_json({"app": app, "stopped": stopped})
    else:
        Console().print(f"stopped {', '.join(stopped)}")


@main.command("agent", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def agent_cmd(args: tuple[str, ...]) -> None:
    """Run a node agent in the foreground (see `dpmigrate agent --help`)."""
    from dpmigrate import agentd

    sys.exit(agentd.main(list(args)))


class _RateView:
    """The live view of `run`: a table of per-stage rates, redrawn in place at every tick."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.last: dict[str, tuple[float, int, int]] = {}
        self.live: Live | None = None

    def show(self, stages: list[dict[str, Any]]) -> None:
        now = time.monotonic()
        table = Table(title="live", title_justify="left")
        for col in ("stage", "node", "in/s", "out/s", "in", "out", "state version", "restarts"):
            table.add_column(col, justify="right" if col != "stage" else "left")
        for s in stages:
            msgs_in, msgs_out = s.get("msgs_in", 0), s.get("msgs_out", 0)
            t0, in0, out0 = self.last.get(s["name"], (now, msgs_in, msgs_out))
            self.last[s["name"]] = (now, msgs_in, msgs_out)
            span = now - t0
            rate_in = (msgs_in - in0) / span if span > 0 else 0.0
            rate_out = (msgs_out - out0) / span if span > 0 else 0.0
            table.add_row(s["name"], str(s.get("node", "-")), f"{rate_in:,.0f}",
                          f"{rate_out:,.0f}", f"{msgs_in:,}", f"{msgs_out:,}",
                          str(s.get("state_version", "-")), str(s.get("restarts", 0)))  # fmt: skip
        if self.live is None:
            self.live = Live(table, console=self.console, auto_refresh=False)
            self.live.start()
        self.live.update(table, refresh=True)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


main.add_command(cluster)
main.add_command(status_cmd)
main.add_command(migrate_cmd)
main.add_command(standby_cmd)
main.add_command(demo_cmd)
main.add_command(drill_cmd)
for _command in (*CHECKPOINT_COMMANDS, *DRAIN_COMMANDS):
    main.add_command(_command)
main.add_command(clean)
main.add_command(logs_cmd)

if __name__ == "__main__":
    main()
