"""`dpmigrate checkpoint|restore|verify|inspect`: CRIU image bundles from the shell.

Kept apart from :mod:`dpmigrate.cli` (which registers these commands with ``add_command``)
so checkpointing can grow without touching the main command. Errors are raised as dpmigrate
errors and the main group prints them as one line. ``python -m dpmigrate.cli_checkpoint``
runs the same commands under the same error handling (used by the tests).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from dpmigrate.errors import CheckpointError, DpmigrateError


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


@contextlib.contextmanager
def _progress(quiet: bool, first: str) -> Iterator[Callable[[str], None]]:
    """A rich status line on stderr when it is a terminal (and not --json); else silence."""
    console = Console(stderr=True)
    if quiet or not console.is_terminal:
        yield lambda message: None
        return
    with console.status(first) as status:
        yield lambda message: status.update(message)


@contextlib.contextmanager
def _tree_netns(pid: int) -> Iterator[str | None]:
    """The tree's network namespace as a path criu can enter, or None when it is ours.

    CRIU runs inside the namespace of the tree it dumps (then the namespace itself is not
    dumped, and the restore puts the tree in whichever namespace it runs in). The namespace is
    held open by a descriptor for the whole dump: without --leave-running the tree — maybe the
    namespace's last user — ends before its lock table is removed.
    """
    import os

    try:
        theirs = os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        yield None  # no such process: CRIU says so, in its own words
        return
    if theirs == os.stat("/proc/self/ns/net").st_ino:
        yield None
        return
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        yield f"/proc/{os.getpid()}/fd/{fd}"
    finally:
        os.close(fd)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def _ms(us: int) -> str:
    return f"{us / 1000:,.1f} ms"


_TRUST_OWNER = click.option(
    "--trust-owner",
    is_flag=True,
    help="Use a bundle owned by another user, or writable by group or others (refused "
    "otherwise: whoever can write a bundle chooses what its restore runs).",
)


@click.command("checkpoint")
@click.argument("stage", required=False)
@click.option("--pid", type=int, default=None, help="Host PID of the root of any tree to dump.")
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False),
    required=True,
    help="Bundle folder to create (must not exist).",
)
@click.option(
    "--leave-running", is_flag=True, help="Let the tree go on after the dump (default: it ends)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def checkpoint_cmd(
    stage: str | None, pid: int | None, out: str, leave_running: bool, as_json: bool
) -> None:
    """Checkpoint a STAGE of the running cluster ([APP/]STAGE), or any process tree (--pid),
    with CRIU into an image bundle (needs root).

    A stage is first quiesced at a batch boundary (outputs acknowledged, rings detached), its
    committed state and ring positions go into the bundle, and with --leave-running it is
    woken again where it is.

    The bundle holds CRIU's images, a manifest with a checksum of every file, and CRIU's
    log. Without --leave-running the tree ends once its images are written.

    What a plain dump cannot carry, reported before the dump: open TCP connections (CRIU
    refuses them), unix sockets connected to a process outside the tree, a terminal as an open
    file, a session leader outside the tree (start the tree under `setsid`). Files open for
    writing must keep their size until the restore (nothing may append to them). A restore on
    the same host while the original still runs needs the tree in its own PID namespace
    (`unshare --pid --fork setsid ...`), or the PIDs collide.
    """
    from dpmigrate.checkpoint import bundle, criu_rpc, limits

    if (stage is None) == (pid is None):
        raise click.UsageError("name a STAGE or give --pid PID (one of the two)")
    if stage is not None:
        _checkpoint_stage(stage, out, leave_running, as_json)
        return
    assert pid is not None
    found = limits.scan(pid)
    if not as_json:
        console = Console(stderr=True)
        for limit in found:
            style = "bold red" if limit.blocking else "yellow"
            console.print(f"[{style}]{'cannot carry' if limit.blocking else 'note'}:[/{style}] "
                          f"{limit}", highlight=False)  # fmt: skip
    with _tree_netns(pid) as netns, _progress(as_json, f"dumping process {pid}") as progress:
        made, result = bundle.create(
            out, pid, leave_running=leave_running, netns=netns, progress=progress
        )
        # The tree ended, or goes on and must not stay cut off: drop this dump's lock table
        # (that one only, by the dump's run id).
        lock = criu_rpc.remove_network_lock(netns, run_id=result.criu_run_id)
    if not lock.ok:
        Console(stderr=True).print(f"[yellow]warning:[/yellow] {lock}", highlight=False)
    if as_json:
        _print_json(
            {
                "bundle": str(made.path), "pid": pid, "leave_running": leave_running,
                "limits": [limit.as_dict() for limit in found], "dump": result.as_dict(),
                "sizes": made.manifest["sizes"], "network_lock": lock.as_dict(),
            }
        )  # fmt: skip
        return
    Console().print(
        f"checkpointed process {pid} into {made.path} — {_mib(made.manifest['sizes']['total'])}, "
        f"frozen {_ms(result.frozen_time)}, {result.pages_written:,} pages written, "
        f"dump took {_ms(result.total_time)}"
        + ("; the process goes on" if leave_running else "; the process has ended"),
        highlight=False,
    )


def _checkpoint_stage(stage: str, out: str, leave_running: bool, as_json: bool) -> None:
    from dpmigrate.runtime.cluster import LocalCluster

    cluster = LocalCluster.current()
    with _progress(as_json, f"quiescing and dumping stage {stage}"):
        # resolved here: the agent refuses a path with a '..' component
        result = cluster.checkpoint(stage, os.path.abspath(out), leave_running=leave_running)
    if as_json:
        _print_json(result)
        return
    criu = result["criu"]
    Console().print(
        f"checkpointed stage {result['stage']} on {result['node']} into {result['bundle']} — "
        f"quiesce {result['quiesce_s'] * 1000:.1f} ms, frozen {_ms(criu['frozen_time'])}, "
        f"{criu['pages_written']:,} pages, state version {result['state_version']}"
        + ("; the stage goes on" if leave_running else "; the stage has left its node"),
        highlight=False,
    )


@click.command("restore")
@click.argument("bundle_dir", metavar="DIR", type=click.Path(file_okay=False))
@click.option(
    "--netns", default=None, help="Restore inside this network namespace (/run/netns/NAME)."
)
@click.option("--node", default=None, help="Stage bundles: the cluster node to restore on.")
@click.option(
    "--cold",
    is_flag=True,
    help="Stage bundles: no CRIU; start a fresh instance from the state snapshot and ring "
    "positions (another kernel or CPU, or no CRIU on the node).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_TRUST_OWNER
def restore_cmd(
    bundle_dir: str,
    netns: str | None,
    node: str | None,
    cold: bool,
    as_json: bool,
    trust_owner: bool,
) -> None:
    """Verify a bundle, then restore it: a stage bundle into the running cluster (--node), a
    `checkpoint --pid` bundle detached on this host (prints the new PID).

    A corrupt or incompatible bundle is refused with the file and the problem named; nothing
    is restored and nothing deleted. The restored tree is the child of a small keeper process
    (ending either one ends both), so it outlives this command. Bundles of dpmigrate stages
    are restored by the runtime, which wakes the stage and reconnects its rings.

    With --cold a stage bundle is restored without CRIU: the node's agent writes the stage's
    journal from the bundle's state snapshot and ring positions and starts the stage afresh.
    Only those files are verified; the images and this machine's CRIU, CPU flags and kernel
    do not matter. Same refusals as a CRIU restore (a corrupt bundle, the stage running).

    A bundle of another user, or one group or others may write, is refused unless
    --trust-owner; a stage bundle's node agent, which loads it again, is told the same.
    """
    from dpmigrate.checkpoint import bundle, keeper
    from dpmigrate.checkpoint import cold as colds

    if cold:
        if netns is not None:
            raise click.UsageError("--netns is for CRIU restores; --cold restores a stage on "
                                   "its cluster node (--node)")  # fmt: skip
        with _progress(as_json, "verifying the state snapshot and ring positions"):
            loaded = colds.read(bundle_dir, trust_owner=trust_owner)
        _restore_stage(bundle_dir, loaded.key, node, as_json, cold=True, trust_owner=trust_owner)
        return
    with _progress(as_json, "verifying the bundle") as progress:
        report = bundle.verify(bundle_dir, progress=progress, trust_owner=trust_owner)
        if not report.ok:
            raise bundle.refusal(report)
        if report.manifest and report.manifest.get("stage"):
            _restore_stage(bundle_dir, str(report.manifest["stage"]), node, as_json,
                           trust_owner=trust_owner)  # fmt: skip
            return
        progress("restoring with CRIU")
        result = keeper.restore_detached(bundle_dir, netns=netns, trust_owner=trust_owner)
    if as_json:
        _print_json({"bundle": bundle_dir, "warnings": report.warnings, **result.as_dict()})
        return
    console = Console()
    for warning in report.warnings:
        Console(stderr=True).print(f"[yellow]note:[/yellow] {warning}", highlight=False)
    console.print(
        f"restored {bundle_dir} as pid {result.pid} (keeper pid {result.keeper_pid}) in "
        f"{_ms(result.total_time)}, CRIU restore_time {_ms(result.restore_time)}, "
        f"{result.pages_restored:,} pages",
        highlight=False,
    )
    click.echo(result.pid)


def _restore_stage(
    bundle_dir: str,
    stage: str,
    node: str | None,
    as_json: bool,
    cold: bool = False,
    trust_owner: bool = False,
) -> None:
    """A stage bundle goes back into the running cluster: its agent restores, adopts and wakes
    it, and it reconnects its rings (``cold``: its agent starts it afresh from its state).
    ``trust_owner`` (--trust-owner) goes with it: the cluster and the agent check the bundle
    again."""
    from dpmigrate.runtime.cluster import LocalCluster

    try:
        cluster = LocalCluster.current()
    except DpmigrateError as err:
        raise DpmigrateError(
            f"bundle {bundle_dir} holds stage {stage!r}; restoring it needs the running cluster "
            f"(its agent wakes the stage and reconnects its rings): {err}"
        ) from err
    with _progress(as_json, f"restoring stage {stage}" + (" cold" if cold else "")):
        result = cluster.restore(
            os.path.abspath(bundle_dir), node=node, cold=cold, trust_owner=trust_owner
        )
    if as_json:
        _print_json(result)
        return
    if cold:
        positions = result["positions"]
        where = "; ".join(
            f"{side} " + ", ".join(f"{port}={seq}" for port, seq in sorted(ports.items()))
            for side, ports in positions.items()
            if ports
        )
        Console().print(
            f"restored stage {result['stage']} cold (no CRIU) on {result['node']} as pid "
            f"{result['pid']} in {result['total_s'] * 1000:.0f} ms: state version "
            f"{result['state_version']}, digest {result['state_digest']}, from the "
            f"{result['started_from']}'s point ({where or 'no rings'})",
            highlight=False,
        )
        return
    Console().print(
        f"restored stage {result['stage']} on {result['node']} as pid {result['pid']} in "
        f"{result['restore_s'] * 1000:.0f} ms (state version {result['state_version']})",
        highlight=False,
    )


@click.command("verify")
@click.argument("bundle_dir", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_TRUST_OWNER
def verify_cmd(bundle_dir: str, as_json: bool, trust_owner: bool) -> None:
    """Check a bundle's files, checksums and compatibility with this node; exit 1 on a problem.

    One line per problem, naming the file: missing, extra, truncated / size mismatch,
    checksum mismatch, unreadable manifest or unknown format, or incompatible (a newer CRIU,
    CPU flags missing here). A different kernel is only a note. Nothing is changed.

    Refused: a symbolic link, FIFO, device or socket anywhere in the bundle; a bundle of
    another user, or one group or others may write (unless --trust-owner).
    """
    from dpmigrate.checkpoint import bundle

    with _progress(as_json, "verifying") as progress:
        report = bundle.verify(bundle_dir, progress=progress, trust_owner=trust_owner)
    if as_json:
        _print_json(report.as_dict())
    else:
        for problem in report.problems:
            click.echo(f"{bundle_dir}: {problem}")
        for warning in report.warnings:
            click.echo(f"{bundle_dir}: note: {warning}")
        if report.ok:
            files = len((report.manifest or {}).get("files", {}))
            click.echo(f"{bundle_dir}: ok ({files} files verified)")
    sys.exit(0 if report.ok else 1)


@click.command("inspect")
@click.argument("bundle_dir", metavar="DIR", type=click.Path(file_okay=False, exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print everything decoded as JSON.")
@_TRUST_OWNER
def inspect_cmd(bundle_dir: str, as_json: bool, trust_owner: bool) -> None:
    """Show what a bundle holds: processes, memory by kind, files, sockets, state, rings.

    Exits 1 when the bundle fails verification (what could be decoded is still shown). A
    bundle of another user, or one group or others may write, is refused before anything is
    decoded unless --trust-owner.
    """
    from dpmigrate.checkpoint.inspect import inspect

    with _progress(as_json, "decoding images"):
        data = inspect(bundle_dir, trust_owner=trust_owner)
    if as_json:
        _print_json(data)
    else:
        _render_inspect(data)
    sys.exit(0 if data["verify"]["ok"] else 1)


def _render_inspect(data: dict[str, Any]) -> None:
    from dpmigrate.checkpoint.inspect import MEMORY_KINDS

    console = Console()
    m = data["manifest"]
    verdict = (
        "[green]verified[/green]" if data["verify"]["ok"] else "[bold red]NOT valid[/bold red]"
    )
    console.print(
        f"[bold]{data['bundle']}[/bold] — {verdict}; CRIU {m['criu_version']}, kernel "
        f"{m['kernel']}, created {m['created']}"
        + (f", stage {m['stage']}" if m.get("stage") else "")
        + (f", node {m['node']}" if m.get("node") else "")
    )
    for problem in data["verify"]["problems"]:
        console.print(f"  [red]{problem['file']}: {problem['problem']}[/red]", highlight=False)
    procs = Table(title="processes")
    for col in ("pid", "ppid", "pgid", "sid", "threads", "name"):
        procs.add_column(col)
    for p in data["processes"]:
        procs.add_row(*(str(p[k]) for k in ("pid", "ppid", "pgid", "sid")),
                      str(len(p["threads"])), p["name"])  # fmt: skip
    console.print(procs)
    mem = Table(title="memory")
    for col in ("kind", "areas", "mapped", "dumped"):
        mem.add_column(col, justify="right" if col != "kind" else "left")
    for kind in MEMORY_KINDS:
        row = data["memory"][kind]
        mem.add_row(kind, str(row["vmas"]), _mib(row["mapped_bytes"]), _mib(row["dumped_bytes"]))
    total = data["memory_total"]
    mem.add_row("total", "", _mib(total["mapped_bytes"]), _mib(total["dumped_bytes"]))
    console.print(mem)
    if data["files"] or data["sockets"]:
        fds = Table(title="open files and sockets")
        for col in ("pid", "fd", "type", "what"):
            fds.add_column(col, overflow="fold")
        for f in data["files"] + data["sockets"]:
            fds.add_row(str(f["pid"]), str(f["fd"]), f["type"], _what(f))
        console.print(fds)
    if data["dump"]:
        d = data["dump"]
        console.print(
            f"dump: frozen {_ms(d.get('frozen_time', 0))}, {d.get('pages_written', 0):,} pages "
            f"written of {d.get('pages_scanned', 0):,} scanned",
            highlight=False,
        )
    if data["state"] is not None:
        s = data["state"]
        extra = f", version {s['version']}, {s['keys']} keys" if s.get("decodes") else ""
        console.print(f"state: {s['bytes']:,} bytes{extra}", highlight=False)
    if data["rings"] is not None:
        console.print(f"rings: {json.dumps(data['rings'])}", highlight=False)
    for err in data["errors"]:
        console.print(f"[red]{err['file']}: {err['problem']}[/red]", highlight=False)


def _what(f: dict[str, Any]) -> str:
    if f["type"] == "file":
        return f"{f.get('path', '')} (pos {f.get('pos', 0)})"
    if f["type"] in ("pipe", "fifo"):
        return f"pipe {f.get('pipe_id')}"
    if f["type"] == "unix":
        name = f.get("name") or "(unnamed)"
        return f"{f.get('socket_type')} {f.get('state')} {name}"
    if f["type"] == "inet":
        return f"{f.get('proto')} {f.get('state')} {f.get('local')} -> {f.get('remote')}"
    return ""


COMMANDS = (checkpoint_cmd, restore_cmd, verify_cmd, inspect_cmd)

__all__ = ["COMMANDS", "CheckpointError", "checkpoint_cmd", "inspect_cmd", "restore_cmd",
           "verify_cmd"]  # fmt: skip


if __name__ == "__main__":
    from dpmigrate.cli import _Group

    @click.group(cls=_Group)
    def _standalone() -> None:
        """dpmigrate's checkpoint commands."""

    for _command in COMMANDS:
        _standalone.add_command(_command)
    _standalone()
