"""Checkpoint and restore of a running stage, as its node agent does them (DESIGN.md §4).

These run inside the agent, on the stages of its supervisor; the operations that call them are
registered on the agent by :mod:`dpmigrate.migrate.agent_service`.

Checkpoint: quiesce the stage (SIGUSR2: everything out and acknowledged, rings detached, no
socket or growing file open), take its committed state from the journal, dump the process
tree with CRIU into a bundle (state snapshot and ring positions included), remove the
network-lock table of that dump (by the dump's run id: :func:`release_network_lock`), and —
with ``leave_running`` — wake it again (SIGUSR1). Any failure wakes the stage where it is: a
failed checkpoint never loses the stage.

Restore: verify the bundle, restore the tree with CRIU inside this node's namespace as a child
of the agent, adopt it into the supervisor (a later crash restarts it from its journal), and
wake it: it asks this node's agent where its peers are and reconnects its rings. A stage whose
journal moved on after the checkpoint (``--leave-running``) continues from the journal's point
(see ``StageHost.catch_up_with_journal``).
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpmigrate.checkpoint import bundle as bundles
from dpmigrate.checkpoint import criu_rpc
from dpmigrate.errors import CheckpointError, DpmigrateError, ProtocolError
from dpmigrate.runtime import cgroups, stagehost
from dpmigrate.runtime.journal import StageJournal
from dpmigrate.statesync.state import State
from dpmigrate.transports.resolver import NAME_RE

if TYPE_CHECKING:
    from dpmigrate.runtime.agent import Agent

#: Bound on how long a stage may take to reach its quiesced point or to wake.
PHASE_TIMEOUT_S = 30.0
#: How often a wait for a stage's phase looks whether the stage still lives.
_LIVENESS_EVERY_S = 0.05


def wait_phase(
    run_dir: str,
    stage: str,
    phase: str,
    since: float,
    timeout: float = PHASE_TIMEOUT_S,
    running: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Wait until the stage's status file, written after ``since``, says ``phase`` (for
    "running": until it reports a wake after ``since``). ``running()``: whether the process
    asked is still the stage's; once it is not, waiting on is pointless (it died: its
    agent restarts it from its journal) and the caller hears so at once."""
    deadline = time.monotonic() + timeout
    next_look = 0.0
    while time.monotonic() < deadline:
        if running is not None and time.monotonic() >= next_look:
            next_look = time.monotonic() + _LIVENESS_EVERY_S
            if not running():
                raise CheckpointError(
                    f"stage {stage!r} exited before it was {phase}; its agent restarts it "
                    "from its journal where it ran"
                )
        status = stagehost.read_status(run_dir, stage)
        if status.get("phase") == "fenced" and status.get("time", 0) >= since:
            fenced = status.get("stale") or {}
            raise CheckpointError(
                f"stage {stage!r} stopped as a stale copy: the cluster store places it on "
                f"{fenced.get('placed_on')} (epoch {fenced.get('placed_epoch')})"
            )
        if phase == "running":
            woken = status.get("woken") or {}
            if woken.get("at", 0) >= since:
                return {**status, **woken}
        elif status.get("time", 0) >= since:
            if status.get("phase") == phase:
                return status
            if phase == "quiesced" and status.get("quiesce_error"):
                raise CheckpointError(
                    f"stage {stage!r} could not quiesce: {status['quiesce_error']}; it keeps "
                    "running where it is"
                )
        time.sleep(0.002)  # the wake is on the migration's critical path
    raise CheckpointError(
        f"stage {stage!r} did not reach phase {phase!r} within {timeout} s; see its log"
    )


def running_stage(agent: Agent, key: str) -> tuple[Any, int]:
    proc = agent.supervisor.stages.get(key)
    pid = proc.stage_pid if proc is not None else None
    if proc is None or pid is None:
        raise DpmigrateError(f"stage {key!r} is not running on node {agent.node}")
    return proc, pid


def quiesce_stage(agent: Agent, key: str) -> dict[str, Any]:
    """SIGUSR2, then wait for the stage's quiesced status (positions, digest)."""
    _app, _, stage = key.partition("/")
    proc, pid = running_stage(agent, key)
    _manifest, run_dir, _model = agent.stage_args[key]
    t0 = time.monotonic()
    since = time.time()
    os.kill(pid, signal.SIGUSR2)
    status = wait_phase(run_dir, stage, "quiesced", since,
                        running=lambda: proc.stage_pid == pid)  # fmt: skip
    return {"stage": key, "node": agent.node, "pid": pid, "quiesce_s": time.monotonic() - t0,
            "positions": status["quiesced"], "state_version": status["state_version"],
            "state_digest": status["state_digest"]}  # fmt: skip


def wake_stage(agent: Agent, key: str, timeout: float = PHASE_TIMEOUT_S) -> dict[str, Any]:
    """SIGUSR1 to a quiesced stage; wait until it runs again (rings reopened)."""
    _app, _, stage = key.partition("/")
    proc, pid = running_stage(agent, key)
    proc.checkpointing = False
    _manifest, run_dir, _model = agent.stage_args[key]
    since = time.time()
    wake(pid)
    status = wait_phase(run_dir, stage, "running", since, timeout)
    if agent.roles.get(key, "primary") != "primary":  # a replica took the stage over
        agent.took_over(key)
    return {
        "stage": key, "node": agent.node, "pid": pid,
        "state_version": status["state_version"], "state_digest": status["state_digest"],
    }  # fmt: skip


def stage_context(agent: Agent, key: str, quiesced: dict[str, Any]) -> tuple[dict[str, Any], State]:
    """What a restored copy needs to be adopted anywhere (app, stage, manifest, run folder,
    model, positions) and the committed state at the quiesced point, read from the journal."""
    app, _, stage = key.partition("/")
    if not isinstance(quiesced.get("positions"), dict):
        raise ProtocolError(
            f"'quiesced' for stage {key!r} holds no 'positions'; pass the reply of quiesce_stage"
        )
    manifest, run_dir, model = agent.stage_args[key]
    state, _, _ = StageJournal(Path(run_dir) / "stages" / stage).load()
    context = {
        "app": app, "stage": stage, "manifest": manifest, "run_dir": run_dir, "model": model,
        "positions": quiesced["positions"], "state_version": state.version,
        "state_digest": state.digest(),
    }  # fmt: skip
    return context, state


def dump_stage(
    agent: Agent, key: str, out: str, leave_running: bool, quiesced: dict[str, Any]
) -> dict[str, Any]:
    """Dump a quiesced stage into the bundle ``out``. With ``leave_running`` the source stays,
    quiesced (asleep in sigwaitinfo), so it can be woken again — the migration's rollback."""
    proc, pid = running_stage(agent, key)
    context, state = stage_context(agent, key, quiesced)
    proc.checkpointing = True
    try:
        bundle, result = bundles.create(
            out, pid, state=state.snapshot(), rings=context, stage=key, node=agent.node,
            leave_running=leave_running,
        )  # fmt: skip
    except CheckpointError as err:
        proc.checkpointing = False
        release_network_lock(agent, key, criu_rpc.run_id(None, err.log_file))
        raise
    except BaseException:
        proc.checkpointing = False
        raise
    lock = release_network_lock(agent, key, result.criu_run_id)
    if leave_running:
        proc.checkpointing = False
    return {"bundle": str(bundle.path), "stage": key, "node": agent.node,
            "leave_running": leave_running, "state_version": state.version,
            "state_digest": state.digest(), "bytes": bundle.manifest["sizes"]["total"],
            "criu": result.as_dict(), "network_lock": lock}  # fmt: skip


def release_network_lock(agent: Agent, key: str, run_id: str) -> dict[str, Any]:
    """Remove the nftables table with which the dump ``run_id`` of stage ``key`` locked this
    node's network namespace — that table and no other (CRIU ran here, in the agent's
    namespace, so the table is here too) — and report it (:func:`report_network_lock`)."""
    return report_network_lock(agent, key, criu_rpc.remove_network_lock(run_id=run_id))


def report_network_lock(agent: Agent, key: str, outcome: criu_rpc.LockRemoval) -> dict[str, Any]:
    """Log what became of a dump's lock table — removed or absent at info, a failure (or no
    run id to look for) as a warning — and return it for the operation's reply, so that the
    caller can report a table left behind."""
    agent.log("network lock " + outcome.outcome, level="info" if outcome.ok else "warning",
              stage=key, run_id=outcome.run_id, table=outcome.table,
              detail=str(outcome))  # fmt: skip
    return outcome.as_dict()


def restart_stage(agent: Agent, key: str) -> dict[str, Any]:
    """Stop a stage (SIGTERM: it persists what downstream acknowledged and detaches) and start
    it again from its journal — it then opens its rings as the run's placement says now."""
    proc = agent.supervisor.stages.get(key)
    if proc is None:
        raise DpmigrateError(f"no stage {key!r} on node {agent.node}")
    manifest, run_dir, model = agent.stage_args[key]
    _app, _, stage = key.partition("/")
    with agent.lock:
        agent.supervisor.stop_one(key)
        new = agent.supervisor.start(
            key, stagehost.command(manifest, stage, run_dir, model, "agent")
        )
    return {"stage": key, "node": agent.node, "pid": new.proc.pid if new.proc else None}


def discard_stage(agent: Agent, key: str) -> None:
    """End a quiesced stage for good (its copy runs elsewhere): SIGKILL, never restarted."""
    proc = agent.supervisor.stages.get(key)
    if proc is None:
        return
    pid = proc.adopted_pid if proc.adopted_pid is not None else proc.stage_pid
    proc.checkpointing = True  # its exit is a departure, not a crash
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _wait_gone(agent, key)


#: Largest state a rollback hands back through one control message (base64 inside JSON).
MAX_POINT_BYTES = 512 << 10


def journal_point(agent: Agent, key: str) -> dict[str, Any]:
    """The committed point of a stage's journal on this node — state, version, positions —
    for a rollback that must carry a destination copy's progress back to its source: the
    copy may have acknowledged inputs (the producers forgot them), so the source must go on
    from there. Only for a stage that no longer runs here (discarded first)."""
    proc = agent.supervisor.stages.get(key)
    if proc is not None and not proc.finished:
        raise DpmigrateError(f"stage {key!r} still runs on node {agent.node}; discard it first")
    if key not in agent.stage_args:
        raise DpmigrateError(f"node {agent.node} never ran stage {key!r}")
    _manifest, run_dir, _model = agent.stage_args[key]
    state, inputs, outputs = StageJournal(Path(run_dir) / "stages" / key.partition("/")[2]).load()
    snapshot = state.snapshot()
    if len(snapshot) > MAX_POINT_BYTES:
        raise DpmigrateError(
            f"stage {key!r}'s state on {agent.node} is {len(snapshot) >> 10} KiB, more than a "
            f"rollback hands back ({MAX_POINT_BYTES >> 10} KiB); its journal stays there"
        )
    return {"state": base64.b64encode(snapshot).decode(), "version": state.version,
            "digest": state.digest(), "inputs": inputs, "outputs": outputs}  # fmt: skip


def adopt_journal_point(agent: Agent, key: str, point: dict[str, Any]) -> dict[str, Any]:
    """Make a later committed point (from :func:`journal_point` elsewhere) this node's
    journal of a quiesced stage, which catches up with it when it wakes. An older or equal
    point changes nothing."""
    proc = agent.supervisor.stages.get(key)
    if proc is None or key not in agent.stage_args:
        raise DpmigrateError(f"no stage {key!r} on node {agent.node}")
    _manifest, run_dir, _model = agent.stage_args[key]
    try:
        state = State.restore(base64.b64decode(str(point["state"]), validate=True))
        inputs, outputs = dict(point["inputs"]), dict(point["outputs"])
    except (KeyError, TypeError, ValueError) as err:
        raise ProtocolError(f"journal point for {key!r} is malformed: {err}") from err
    if state.digest() != point.get("digest") or state.version != point.get("version"):
        raise ProtocolError(f"journal point for {key!r} does not match its digest or version")
    journal = StageJournal(Path(run_dir) / "stages" / key.partition("/")[2])
    current = journal.load()[0].version
    if state.version <= current:
        return {"adopted": False, "version": current}
    journal.start_at(state, inputs, outputs)
    return {"adopted": True, "version": state.version}


def _wait_gone(agent: Agent, key: str) -> None:
    """Until the supervisor has reaped the stage (bounded)."""
    proc = agent.supervisor.stages[key]
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    while not proc.finished and time.monotonic() < deadline:
        with agent.lock:
            agent.supervisor.poll()
        time.sleep(0.01)


def checkpoint_stage(agent: Agent, key: str, out: str, leave_running: bool) -> dict[str, Any]:
    """`dpmigrate checkpoint STAGE`: quiesce, dump, and wake it again or let it go."""
    quiesced = quiesce_stage(agent, key)
    try:
        result = dump_stage(agent, key, out, leave_running, quiesced)
    except BaseException:
        wake_stage(agent, key)  # never lose the stage to a failed checkpoint
        raise
    if leave_running:
        wake_stage(agent, key)
    else:
        _wait_gone(agent, key)  # CRIU ended it: make status say so before we answer
    return {**result, "quiesce_s": round(quiesced["quiesce_s"], 4),
            "positions": quiesced["positions"]}  # fmt: skip


def restore_stage(
    agent: Agent,
    path: str,
    wake_it: bool = True,
    keep_newer_journal: bool = False,
    trust_owner: bool = False,
) -> dict[str, Any]:
    """Restore a stage bundle here. Its committed state becomes this node's journal of the
    stage — unless ``keep_newer_journal`` (the stage was placed on this node all along, so
    its journal here is the authority) and that journal is at a later point: a bundle taken
    with ``--leave-running`` then catches up with it when it wakes. ``trust_owner``: accept
    a bundle of another user or one group or others may write (the user's ``--trust-owner``;
    :func:`~dpmigrate.checkpoint.bundle.load` refuses it otherwise)."""
    bundle = bundles.load(path, trust_owner=trust_owner)
    context = bundle.rings or {}
    missing = [k for k in ("app", "stage", "manifest", "run_dir", "model") if k not in context]
    if missing:
        raise CheckpointError(
            f"bundle {path} is not a stage checkpoint (rings.json lacks {missing}); restore a "
            "process checkpoint with `dpmigrate restore DIR` on a host instead"
        )
    app, stage, run_dir = str(context["app"]), str(context["stage"]), str(context["run_dir"])
    key = f"{app}/{stage}"
    running = agent.supervisor.stages.get(key)
    if running is not None and not running.finished:
        raise DpmigrateError(
            f"stage {key!r} is running on node {agent.node}; stop it first (or migrate it)"
        )
    t0 = time.monotonic()
    if bundle.state is None:
        raise CheckpointError(f"bundle {path} holds no state snapshot ({bundles.STATE})")
    prepare_run_folder(agent, context, State.restore(bundle.state), keep_newer_journal)
    logs = Path(run_dir) / "criu" / f"{stage}-{int(time.time() * 1000)}"
    logs.mkdir(parents=True, exist_ok=True)
    with restore_group(agent, context) as group:
        result = bundles.restore(bundle, restore_sibling=True, log_dir=logs,
                                 cgroup_procs=charge_files(group))  # fmt: skip
    adopt(agent, context, result.pid, group)
    if not wake_it:  # the migration wakes it after the placement changed
        return {"stage": key, "node": agent.node, "pid": result.pid,
                "restore_s": round(time.monotonic() - t0, 4), "criu": result.as_dict()}  # fmt: skip
    since = time.time()
    wake(result.pid)
    status = wait_phase(run_dir, stage, "running", since)
    return {
        "stage": key, "node": agent.node, "pid": result.pid,
        "restore_s": round(time.monotonic() - t0, 4), "state_version": status["state_version"],
        "state_digest": status["state_digest"], "criu": result.as_dict(),
    }  # fmt: skip


def prepare_run_folder(
    agent: Agent, context: dict[str, Any], state: State, keep_newer_journal: bool = False
) -> None:
    """This node's run folder for a stage about to be restored here, as the restored process
    expects it: its status folder, and its journal holding exactly the committed point it was
    dumped at (nodes share no files) — unless ``keep_newer_journal`` and the journal here is
    at a later point. The folder named by ``context`` (a bundle's, a peer's: input) must be a
    run folder of this node; nothing is written anywhere else."""
    run_dir, stage = Path(str(context["run_dir"])), str(context["stage"])
    if run_dir.parent != agent.run_dir / "runs" or not NAME_RE.fullmatch(stage):
        raise CheckpointError(
            f"the stage's run folder {run_dir} (stage {stage!r}) is not a run folder of node "
            f"{agent.node} ({agent.run_dir / 'runs'}/RUN); refused"
        )
    stagehost.status_path(run_dir, stage).parent.mkdir(parents=True, exist_ok=True)
    journal = StageJournal(run_dir / "stages" / stage)
    if keep_newer_journal and journal.load()[0].version > state.version:
        return
    positions = context.get("positions") or {}
    journal.start_at(state, dict(positions.get("inputs", {})), dict(positions.get("outputs", {})))


def _argv(context: dict[str, Any]) -> tuple[str, list[str]]:
    app, stage = str(context["app"]), str(context["stage"])
    manifest, run_dir, model = (str(context[k]) for k in ("manifest", "run_dir", "model"))
    return f"{app}/{stage}", stagehost.command(manifest, stage, run_dir, model, "agent")


@contextlib.contextmanager
def restore_group(agent: Agent, context: dict[str, Any]) -> Iterator[cgroups.Group | None]:
    """The control group a stage is restored into (None: it has no limits), made before
    CRIU runs so that the restore's ``criu swrk`` can be put in it and every restored page
    is charged there (``criu_rpc.restore(cgroup_procs=...)``). Removed again when the
    restore fails; on success :func:`adopt` hands it to the supervisor."""
    key, argv = _argv(context)
    group_for = agent.supervisor.group_for
    group = group_for(key, argv) if group_for is not None else None
    try:
        yield group
    except BaseException:
        if group is not None:
            try:
                agent.groups.remove(group)
            except DpmigrateError as err:
                agent.log("stage group not removed", level="warning", stage=key, error=str(err))
        raise


def charge_files(group: cgroups.Group | None) -> list[str]:
    """Where a restore's swrk goes: the group's memory hierarchy only (the charge is the
    point; CRIU's own work is not held to the stage's CPU quota or task limit), or the
    whole group on v2 (one hierarchy). The agent moves the stage into the rest on adopt."""
    return [] if group is None else group.memory_procs_files()


def adopt(
    agent: Agent, context: dict[str, Any], pid: int, group: cgroups.Group | None = None
) -> None:
    """Make a restored stage this node's: supervised (a crash restarts it from its journal)
    and known to status, quiesce and wake. ``group``: the one it was restored into."""
    app, stage = str(context["app"]), str(context["stage"])
    manifest, run_dir, model = (
        str(context["manifest"]),
        str(context["run_dir"]),
        str(context["model"]),
    )
    key = f"{app}/{stage}"
    with agent.lock:
        agent.supervisor.adopt(
            key, pid, stagehost.command(manifest, stage, run_dir, model, "agent"), group=group
        )
        agent.stage_args[key] = (manifest, run_dir, model)
        agent.roles.pop(key, None)  # a restored stage is the stage itself


def wake(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGUSR1)
    except ProcessLookupError as err:
        raise DpmigrateError(f"stage process {pid} is gone; it cannot be woken") from err


def node_facts(agent: Agent, criu_path: str) -> dict[str, Any]:
    """CRIU version and features, CPU flags, kernel and free space of this node (``criu_path``:
    the criu binary the agent was configured with)."""
    from dpmigrate.checkpoint.criu_binary import CriuBinary

    criu = CriuBinary(criu_path)
    facts = bundles.HostFacts.local(criu_path)
    usage = shutil.disk_usage(agent.run_dir)  # the node's own folder, where images go
    return {
        "node": agent.node, "criu_version": criu.version_text,
        "lazy_pages": criu.check("uffd-noncoop").ok, "cpu_flags": sorted(facts.cpu_flags),
        "kernel": facts.kernel, "free_bytes": usage.free, "page_size": os.sysconf("SC_PAGE_SIZE"),
        # what a drain's plan checks a stage's resources against (cpus, memory limits)
        "cpus": sorted(os.sched_getaffinity(0)), "mem_available_bytes": _mem_available(),
    }  # fmt: skip


def _mem_available() -> int | None:
    """The kernel's estimate of memory available for new work (MemAvailable), in bytes."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
