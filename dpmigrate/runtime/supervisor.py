"""Starts stage processes, watches them, restarts a crashed one from its persisted point.

Each stage process is started the way CRIU needs it later (DESIGN.md §4): in its own PID
namespace (it is PID 1 there) through ``unshare --pid --fork --kill-child``, in its own
session (``setsid``), with no inherited descriptors and its output appended to a log file.
No mount namespace. ``--kill-child`` ties the stage's life to the ``unshare`` process, so
ending that one (by PID) never leaves the stage behind.

A stage with resource limits runs in its control group (:mod:`dpmigrate.runtime.cgroups`),
which the caller creates and passes to :meth:`Supervisor.start`: the spawn moves the process
into it between fork and exec (a ``sh`` that writes its own PID to the group's
``cgroup.procs`` files, then execs ``unshare``), so the stage and everything it starts are in
the group before it runs a line of its code. (A ``preexec_fn`` would do the same, but is not
safe in the agent, which has threads.) A stage killed by the kernel's OOM killer (its group's
OOM count went up) is restarted like any crashed stage, and the event says ``oom``. The group
is removed once the stage is finished for good.

A stage that exits 0 is finished. One that dies (signal or non-zero status) while the app runs
is restarted, up to ``max_restarts`` times; it resumes from its journal
(:mod:`dpmigrate.runtime.journal`) and its rings reconnect by name.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from dpmigrate.errors import DpmigrateError, EnvironmentProblem
from dpmigrate.runtime.cgroups import Group, StageGroups

#: Exit status of a stage that found itself stale (stagehost.FENCED_EXIT; not imported, the
#: supervisor runs any program).
FENCED_EXIT = 3
#: Seconds a stage gets to finish its batch and close its rings after SIGTERM.
STOP_GRACE_S = 10.0


@dataclasses.dataclass
class StageProcess:
    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    exit_codes: list[int] = dataclasses.field(default_factory=list)
    finished: bool = False
    failed: bool = False  # gave up after max_restarts
    adopted_pid: int | None = None  # a restored stage: our child, but not through unshare
    checkpointing: bool = False  # being dumped: its exit is a departure, not a crash
    moved: bool = False  # left this node by checkpoint (it runs on, elsewhere or later)
    fenced: bool = False  # found itself stale (placed elsewhere) and stopped: never restarted
    #: a stage started by an earlier agent of this node that died: not our child (no exit
    #: status to collect), watched by its start time in /proc; its exit counts as a clean one
    #: when its status file says it finished or stopped
    orphan_start: int | None = None
    orphan_status: Path | None = None
    #: its control group (None: no limits); removed when the stage is finished for good
    group: Group | None = None
    #: the group's OOM kill count already accounted for, and the stage's OOM deaths
    oom_seen: int = 0
    ooms: int = 0
    #: why it last died: "oom", or "crash" (None: it never died)
    last_exit: str | None = None
    #: :meth:`resources` as it was when the group was removed (for status)
    last_usage: dict[str, object] | None = None

    def resources(self) -> dict[str, object] | None:
        """Limits and usage of its control group, for status (None: no limits)."""
        group = self.group
        if group is None:
            return self.last_usage
        return {"group": group.name, "limits": group.limits.as_dict(), "applied": group.applied,
                "unsupported": group.unsupported, "usage": group.usage(), "oom": self.ooms,
                "last_exit": self.last_exit}  # fmt: skip

    @property
    def stage_pid(self) -> int | None:
        """Host PID of the stage itself (the child of ``unshare``; PID 1 in its namespace)."""
        if self.adopted_pid is not None:
            return None if self.finished else self.adopted_pid
        if self.proc is None or self.proc.poll() is not None:
            return None
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            children = path.read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None


#: What a stage process never inherits: the cluster's one credential must not be readable by
#: an app's code, nor land in its CRIU images; nor where the store's client key is (a stage
#: never talks to etcd).
SECRET_ENV = frozenset({"DPMIGRATE_TOKEN", "DPMIGRATE_ETCD_CERT", "DPMIGRATE_ETCD_KEY"})


class Supervisor:
    """Owns the stage processes of one app on one host."""

    def __init__(
        self,
        log_dir: Path,
        max_restarts: int = 10,
        on_event: Callable[[str], None] | None = None,
        die_with_supervisor: bool = False,
        on_problem: Callable[[str], None] | None = None,
        stage_env: Callable[[str], dict[str, str]] | None = None,
        groups: StageGroups | None = None,
        group_for: Callable[[str, Sequence[str]], Group | None] | None = None,
    ) -> None:
        """``stage_env(name)``: what a stage's environment gets besides this process's own
        (whose secrets it never gets, see :data:`SECRET_ENV`) — an agent passes a stage its
        own key there. ``groups``: where the stages' control groups are recorded; each is
        removed through it when its stage is finished for good. ``group_for(name, argv)``:
        the control group of a stage started or adopted without one given (None: no
        limits) — so every way a stage is (re)started gets its limits."""
        for tool in ("unshare", "setsid"):
            if shutil.which(tool) is None:
                raise EnvironmentProblem(f"`{tool}` is missing; apt-get install util-linux")
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.stage_env = stage_env
        self.max_restarts = max_restarts
        self.on_event = on_event or (lambda message: None)
        #: where a stage that died is reported (default: ``on_event``), for a log with levels
        self.on_problem = on_problem or self.on_event
        self.stages: dict[str, StageProcess] = {}
        self.groups = groups
        self.group_for = group_for
        self._stopping = False
        # A foreground run's stages must not outlive it (Ctrl-C, kill -9 of the CLI); an
        # agent's stages are the agent's business and are stopped by it.
        self._preexec = _die_with_parent if die_with_supervisor else None

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        log_flag: str | None = "--log",
        group: Group | None = None,
    ) -> StageProcess:
        """Start ``python ARGV`` as stage ``name``; ``log_flag`` passes it its log file (a
        stage host appends its events there itself; its stdout only catches early failures).
        ``group``: its control group, entered before the stage's code runs."""
        log = self.log_path(name)
        argv = [*argv, log_flag, str(log)] if log_flag else list(argv)
        if group is None and self.group_for is not None:
            group = self.group_for(name, argv)
        stage = StageProcess(name, argv, log, group=group)
        if group is not None:
            stage.oom_seen = group.oom_kills()
        self.stages[name] = stage
        self._spawn(stage, env)
        return stage

    def _spawn(self, stage: StageProcess, env: dict[str, str] | None = None) -> None:
        cmd = ["unshare", "--pid", "--fork", "--kill-child", "setsid", sys.executable, *stage.argv]
        if stage.group is not None:
            files = stage.group.procs_files()
            cmd = ["sh", "-c", _ENTER_GROUP, "sh", str(len(files)), *files, *cmd]
        stage_env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
        if self.stage_env is not None:
            stage_env.update(self.stage_env(stage.name))
        stage_env.update(env or {})
        # A stage's log says what its code did: for the node's operators only.
        log_fd = os.open(stage.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        with os.fdopen(log_fd, "ab") as log, open(os.devnull, "rb") as devnull:
            stage.proc = subprocess.Popen(
                cmd, stdin=devnull, stdout=log, stderr=log, close_fds=True,
                env=stage_env, preexec_fn=self._preexec,
            )  # fmt: skip
        self.on_event(f"stage {stage.name} started (pid {stage.proc.pid})")

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name.replace('/', '.')}.log"

    def adopt(
        self, name: str, pid: int, argv: Sequence[str], group: Group | None = None
    ) -> StageProcess:
        """Take over a stage restored by CRIU as a child of this process: watch it, and if it
        crashes, restart it from its journal with ``argv`` like any other stage. (The
        restored stage itself keeps appending to the log file it had.) ``group``: the
        control group the caller moved it into (a restart enters it again)."""
        log = self.log_path(name)
        if group is None and self.group_for is not None:
            group = self.group_for(name, argv)
        if group is not None:  # before it is woken: it runs none of its code outside
            group.add(pid)
        stage = StageProcess(name, [*argv, "--log", str(log)], log, adopted_pid=pid, group=group)
        if group is not None:
            stage.oom_seen = group.oom_kills()
        self.stages[name] = stage
        self.on_event(f"stage {name} adopted (restored, pid {pid})")
        return stage

    def adopt_orphan(
        self, name: str, pid: int, start_time: int, argv: Sequence[str], status: Path
    ) -> StageProcess:
        """Take over a stage that a previous agent of this node started and that still runs
        (that agent died): watched by PID and start time; a crash restarts it from its
        journal with ``argv`` like any other stage."""
        log = self.log_path(name)
        group = self.group_for(name, argv) if self.group_for is not None else None
        stage = StageProcess(name, [*argv, "--log", str(log)], log, adopted_pid=pid,
                             orphan_start=start_time, orphan_status=status,
                             group=group)  # fmt: skip
        if group is not None:  # the earlier agent's group (same name): it is already in
            group.add(pid)
            stage.oom_seen = group.oom_kills()
        self.stages[name] = stage
        self.on_event(f"stage {name} re-adopted (pid {pid}, started by an earlier agent)")
        return stage

    def _exit_code(self, stage: StageProcess) -> int | None:
        if stage.orphan_start is not None and stage.adopted_pid is not None:
            if process_start_time(stage.adopted_pid) == stage.orphan_start:
                return None
            phase = ""
            with contextlib.suppress(OSError, ValueError, AttributeError):
                phase = json.loads(stage.orphan_status.read_text()).get("phase", "")  # type: ignore[union-attr]
            return 0 if phase in ("finished", "stopped") else 1
        if stage.adopted_pid is not None:
            try:
                pid, status = os.waitpid(stage.adopted_pid, os.WNOHANG)
            except ChildProcessError:
                return 1  # not ours to reap any more: treat as gone
            return None if pid == 0 else os.waitstatus_to_exitcode(status)
        return stage.proc.poll() if stage.proc is not None else None

    def poll(self) -> None:
        """Reap exited stages; restart the ones that crashed."""
        for stage in self.stages.values():
            if stage.finished or (stage.proc is None and stage.adopted_pid is None):
                continue
            code = self._exit_code(stage)
            if code is None:
                continue
            stage.exit_codes.append(code)
            if stage.checkpointing:
                stage.finished = stage.moved = True
                how = describe_exit(code)
                self.on_event(f"stage {stage.name} left with its checkpoint ({how})")
                self._release(stage)
                continue
            if code == FENCED_EXIT:
                stage.finished = stage.fenced = True
                self.on_event(f"stage {stage.name} was fenced (a stale copy) and stopped")
                self._release(stage)
                continue
            if code == 0 or self._stopping:
                stage.finished = True
                self.on_event(f"stage {stage.name} exited ({describe_exit(code)})")
                self._release(stage)
                continue
            how = describe_exit(code)
            stage.last_exit = "crash"
            if stage.group is not None and (kills := stage.group.oom_kills()) > stage.oom_seen:
                stage.oom_seen, stage.last_exit = kills, "oom"
                stage.ooms += 1
                how = f"oom: killed for exceeding its memory limit, {how}"
            if stage.restarts >= self.max_restarts:
                stage.finished = stage.failed = True
                self.on_problem(
                    f"stage {stage.name} died ({how}) and was restarted "
                    f"{stage.restarts} times already; giving up, see {stage.log}"
                )
                self._release(stage)
                continue
            stage.restarts += 1
            self.on_problem(f"stage {stage.name} died ({how}); restarting from its journal")
            stage.adopted_pid = stage.orphan_start = None  # restarts the ordinary way
            self._spawn(stage)

    @property
    def all_finished(self) -> bool:
        return all(s.finished for s in self.stages.values())

    def stop_one(self, name: str, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM one stage and wait for it (SIGKILL after ``grace``); it is not restarted."""
        stage = self.stages[name]
        stage.finished = True  # before the signal: poll() must not restart it
        self._terminate([stage], grace)

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM every stage (it finishes its batch and closes its rings); SIGKILL leftovers."""
        self._stopping = True
        self._terminate(list(self.stages.values()), grace)

    def _terminate(self, stages: list[StageProcess], grace: float) -> None:
        for stage in stages:
            pid = stage.adopted_pid if stage.adopted_pid is not None else stage.stage_pid
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for stage in stages:
            if stage.adopted_pid is not None:
                self._wait_adopted(stage, deadline)
            elif stage.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    stage.proc.wait(max(0.0, deadline - time.monotonic()))
                if stage.proc.poll() is None:  # --kill-child takes the stage down with unshare
                    stage.proc.kill()
                    stage.proc.wait(grace)
            stage.finished = True
            self._release(stage)

    def _release(self, stage: StageProcess) -> None:
        """Remove the control group of a stage that is finished for good (its last usage is
        kept for status). A group that will not go is reported, and stays recorded for
        ``stop``, ``cluster down`` or ``clean`` to retry."""
        group = stage.group
        if group is None or self.groups is None:
            return
        stage.last_usage = {**(stage.resources() or {}), "group": None}
        stage.group = None
        try:
            self.groups.remove(group)
        except DpmigrateError as err:
            self.on_problem(f"stage {stage.name}: its control group stays: {err}")

    @staticmethod
    def _wait_adopted(stage: StageProcess, deadline: float) -> None:
        pid = stage.adopted_pid
        assert pid is not None
        if stage.orphan_start is not None:  # not our child: watch /proc
            while time.monotonic() < deadline:
                if process_start_time(pid) != stage.orphan_start:
                    return
                time.sleep(0.02)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            return
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return
            if done:
                return
            time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def process_resident_bytes(pid: int) -> int | None:
    """Resident memory of one process (VmRSS), from ``/proc``."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks); None if gone or a zombie:
    with the PID it names one process for good (a reused PID has another start time)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the supervising process dies (the
    ``--kill-child`` of unshare then takes the stage with it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


_PR_SET_PDEATHSIG = 1
#: ``sh -c`` script: ``N FILE... CMD...``: write this shell's PID into the N files (a control
#: group's cgroup.procs, one per hierarchy), then exec CMD in its place (same PID).
_ENTER_GROUP = (
    'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; n=$((n-1)); done;'
    ' exec "$@"'
)


def describe_exit(code: int) -> str:
    """An exit status as people say it: "status 3", "signal SIGKILL"."""
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    if code > 128 and code - 128 in signal.Signals._value2member_map_:
        return f"signal {signal.Signals(code - 128).name}"
    return f"status {code}"
