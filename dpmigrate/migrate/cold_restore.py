"""Cold restore of a stage bundle, as its new node's agent does it (DESIGN.md §5 (c)).

For when CRIU cannot restore the images (another kernel or CPU, no CRIU on this node): a
*fresh* instance of the stage starts from the bundle's explicit state snapshot and ring
positions. The cluster (:meth:`~dpmigrate.runtime.cluster.LocalCluster.restore` with
``cold=True``) has verified the bundle, refused it while the stage runs anywhere, placed the
stage on this node with a new epoch and restarted the peers whose ring changes transport.
Here, under the agent's lock: read and verify the bundle again (what this node uses is what
is checked: :func:`dpmigrate.checkpoint.cold.read`, its owner and modes included unless the
user passed ``--trust-owner``), refuse while the stage runs here, make the
stage's journal on this node hold exactly one point (``StageJournal.start_at``), and start the
stage process as any other — the stage host loads that point and opens its rings at its
positions. The reply comes once the stage reports itself running.

Why nothing is lost or duplicated: the bundle's point is a persisted point (the checkpoint
quiesced the stage: every output acknowledged downstream, every input acknowledged up to that
point and no further), so the upstream producers still retain every input after it, and the
downstream consumers drop any output regenerated below their cursor. That holds while the
point is the stage's last one. A bundle taken with ``--leave-running`` is older than that: the
stage went on, persisted later points, and the producers forgot the inputs between. Then the
stage starts from its later point instead — this node's own journal (``keep_newer_journal``:
the stage was placed here all along) or the one the cluster read from the node it last ran on
(``point``: :func:`~dpmigrate.migrate.stage_checkpoint.journal_point`'s reply there). The
reply's ``started_from`` says which.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpmigrate.checkpoint import cold
from dpmigrate.errors import CheckpointError, DpmigrateError, ProtocolError
from dpmigrate.migrate import stage_checkpoint
from dpmigrate.runtime import stagehost
from dpmigrate.runtime.journal import Positions, StageJournal
from dpmigrate.statesync.state import State

if TYPE_CHECKING:
    from dpmigrate.runtime.agent import Agent
    from dpmigrate.runtime.supervisor import StageProcess

Point = tuple[State, Positions, Positions]


def cold_restore_stage(
    agent: Agent,
    path: str,
    keep_newer_journal: bool = False,
    point: dict[str, Any] | None = None,
    trust_owner: bool = False,
) -> dict[str, Any]:
    """Start the stage of the bundle at ``path`` on this node from its state and positions
    (or from a later committed point, see the module); returns where it started from.
    ``trust_owner``: accept a bundle of another user or one group or others may write (the
    user's ``--trust-owner``; refused otherwise, see :func:`dpmigrate.checkpoint.cold.read`)."""
    t0 = time.monotonic()
    bundle = cold.read(path, trust_owner=trust_owner)
    key, context = bundle.key, bundle.context
    start: Point = (bundle.state, bundle.inputs, bundle.outputs)
    if point is not None:
        later = decode_point(key, point)
        if _order(later) > _order(start):
            start = later
    stage = str(context["stage"])
    manifest, run_dir, model = (str(context[k]) for k in ("manifest", "run_dir", "model"))
    with agent.lock:  # nothing may start the stage here between the check and the start
        running = agent.supervisor.stages.get(key)
        if running is not None and not running.finished:
            raise DpmigrateError(
                f"stage {key!r} is running on node {agent.node}; stop it first (or migrate it)"
            )
        state, inputs, outputs = start
        placed = {**context, "positions": {"inputs": inputs, "outputs": outputs}}
        stage_checkpoint.prepare_run_folder(agent, placed, state, keep_newer_journal)
        journal = StageJournal(Path(run_dir) / "stages" / stage)
        state, inputs, outputs = journal.load()  # what the stage will load: this, exactly
        journal.close()
        since = time.time()
        proc = agent.supervisor.start(
            key, stagehost.command(manifest, stage, run_dir, model, "agent")
        )
        agent.stage_args[key] = (manifest, run_dir, model)
        agent.roles.pop(key, None)  # the stage itself, not a replica of it
    started_from = "bundle" if _order((state, inputs, outputs)) == _order(
        (bundle.state, bundle.inputs, bundle.outputs)
    ) else "journal"  # fmt: skip
    agent.log("stage start", stage=key, pid=proc.proc.pid if proc.proc else None, cold=True,
              state_version=state.version, started_from=started_from)  # fmt: skip
    _wait_running(agent, key, proc, run_dir, stage, since)
    return {
        "stage": key, "node": agent.node, "pid": proc.stage_pid, "cold": True,
        "bundle": str(bundle.path), "state_version": state.version,
        "state_digest": state.digest(), "positions": {"inputs": inputs, "outputs": outputs},
        "started_from": started_from, "restore_s": round(time.monotonic() - t0, 4),
    }  # fmt: skip


def decode_point(key: str, point: dict[str, Any]) -> Point:
    """A committed point as :func:`~dpmigrate.migrate.stage_checkpoint.journal_point`
    replies it, checked against its own version and digest."""
    try:
        state = State.restore(base64.b64decode(str(point["state"]), validate=True))
        inputs = {str(k): int(v) for k, v in dict(point["inputs"]).items()}
        outputs = {str(k): int(v) for k, v in dict(point["outputs"]).items()}
    except (KeyError, TypeError, ValueError, DpmigrateError) as err:
        raise ProtocolError(f"journal point for {key!r} is malformed: {err}") from err
    if state.digest() != point.get("digest") or state.version != point.get("version"):
        raise ProtocolError(f"journal point for {key!r} does not match its digest or version")
    return state, inputs, outputs


def _order(point: Point) -> tuple[int, int]:
    """Points of one stage in commit order: a batch raises the state's version, or (one that
    changed no state) at least one position."""
    state, inputs, outputs = point
    return state.version, sum(inputs.values()) + sum(outputs.values())


def _wait_running(
    agent: Agent, key: str, proc: StageProcess, run_dir: str, stage: str, since: float
) -> None:
    """Until the new stage process reports itself running (bounded); a clear error if it
    ended first or found itself stale."""
    deadline = time.monotonic() + stage_checkpoint.PHASE_TIMEOUT_S
    while time.monotonic() < deadline:
        status = stagehost.read_status(run_dir, stage)
        if status.get("time", 0) >= since:
            if status.get("phase") == "fenced":
                fenced = status.get("stale") or {}
                raise CheckpointError(
                    f"stage {key!r} started cold on {agent.node} stopped as a stale copy: the "
                    f"cluster store places it on {fenced.get('placed_on')} (epoch "
                    f"{fenced.get('placed_epoch')})"
                )
            if status.get("phase") in ("running", "finished"):
                return
        if proc.exit_codes:
            raise DpmigrateError(
                f"stage {key!r} started cold on {agent.node} but its process ended (exit "
                f"status {proc.exit_codes[-1]}); see its log {proc.log}"
            )
        time.sleep(0.01)
    raise DpmigrateError(
        f"stage {key!r} started cold on {agent.node} did not report itself running within "
        f"{stage_checkpoint.PHASE_TIMEOUT_S} s; see its log {proc.log}"
    )
