"""The agent keeper: a node's agent comes back by itself after it was killed or crashed.

``dpmigrate agent --keep ...`` (``python -m dpmigrate.agentd --keep ...``) runs this small
process instead of the agent; it starts the agent as its only child, with the same arguments,
and starts it again whenever it dies by a signal or with a non-zero status. The new agent
re-adopts the stages its predecessor left running (``Agent.readopt``: they are not children
of the agent's process but watched by PID, so they run on through its death) and rejoins the
store. Without a keeper a dead agent stayed dead, and every later ``migrate`` and ``stop`` of
its node failed until ``cluster down``.

Kept deliberately tiny, so that it is obviously correct and cannot be the thing that breaks:

* one thread and no signal handlers. SIGTERM, SIGINT and SIGCHLD are blocked and taken
  synchronously with ``sigtimedwait``; the child is reaped only by that same loop, after the
  forwarding of any signal, so a forwarded signal can never reach a PID the kernel has since
  given to another process (a child that exited stays a zombie until we reap it);
* it imports none of the agent (no etcd client, no CRIU), so it is small and starts fast;
* bounded: at most ``max_restarts`` restarts within ``window_s``, with a doubling delay
  before each; past that it gives up, says why, and exits non-zero — a crash loop (a wrong
  argument, an unreachable store) is not retried for ever;
* status 0 is a deliberate shutdown (the ``shutdown`` operation, or SIGTERM, which it
  forwards): the keeper exits with it and restarts nothing.

The keeper writes its state — its own PID, the current agent's PID and start time, how many
restarts — to a small JSON file (``--keep-file``), replaced atomically: the local cluster reads
it to know which process is the agent now (``Node.agent_pid``), and ``cluster status`` shows
the restarts. Every event is a JSON line on its stdout, like the agent's own (the agent inherits
the same stdout, so one log file tells the whole story in order).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dpmigrate import atomic
from dpmigrate.eventlog import EventLog
from dpmigrate.runtime.supervisor import describe_exit, process_start_time

#: The signals the keeper takes synchronously (blocked, then waited for).
_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
_WAITED = _STOP_SIGNALS | {signal.SIGCHLD}
#: How often the wait loop looks at the child even without a SIGCHLD (belt and braces).
_POLL_S = 1.0


@dataclasses.dataclass(frozen=True)
class Policy:
    """When to restart: at most ``max_restarts`` within any ``window_s``; before restart n of
    that window wait ``first_delay_s * 2**n``, at most ``max_delay_s``. The first restart is
    quick (the whole point is a short outage); a loop slows down, then stops."""

    max_restarts: int = 5
    window_s: float = 60.0
    first_delay_s: float = 0.1
    max_delay_s: float = 2.0

    def delay(self, recent: int) -> float:
        return float(min(self.max_delay_s, self.first_delay_s * 2**recent))


def _exit_status(code: int) -> int:
    """A process exit status for an agent's wait code, as a shell reports it (128 + signal)."""
    return 128 - code if code < 0 else code


class Keeper:
    """Run ``command`` (the agent) as a child and restart it per ``policy``; :meth:`run`.

    ``state_file``: where the current state is written (None: nowhere). ``env``: the child's
    environment (default: ours).
    """

    def __init__(
        self,
        command: Sequence[str],
        state_file: str | os.PathLike[str] | None,
        log: EventLog,
        policy: Policy | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if not command:
            raise ValueError("the keeper needs a command to run")
        self.command = list(command)
        self.state_file = Path(state_file) if state_file is not None else None
        self.log = log
        self.policy = policy or Policy()
        self.env = dict(os.environ if env is None else env)
        self.restarts = 0
        self.agent_pid: int | None = None
        self.stop_signal: int | None = None
        self._recent: list[float] = []  # monotonic times of the restarts still in the window
        self._last_exit = ""

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> int:
        """Keep the agent running; the exit status to leave with (0: it was shut down)."""
        # SIGCHLD at its default: an inherited SIG_IGN would make the kernel reap the agent
        # itself, and the keeper could not learn how it died.
        old_chld = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _WAITED)
        try:
            return self._loop()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            signal.signal(signal.SIGCHLD, old_chld)

    def _loop(self) -> int:
        self.log("agent keeper started", pid=os.getpid(), command=self.command,
                 max_restarts=self.policy.max_restarts, window_s=self.policy.window_s)  # fmt: skip
        while True:  # one turn per agent process; bounded by the policy's window
            if self.stop_signal is not None:
                self._write("stopped")
                self.log("agent keeper stopped", signal=signal.Signals(self.stop_signal).name)
                return 0
            pid = self._spawn()
            code = self._wait(pid)
            self.agent_pid = None
            self._last_exit = describe_exit(code)
            if code == 0 or self.stop_signal is not None:
                self._write("stopped")
                self.log("agent exited; keeper stops", pid=pid, exit=self._last_exit,
                         restarts=self.restarts)  # fmt: skip
                return _exit_status(code)
            now = time.monotonic()
            self._recent = [t for t in self._recent if now - t < self.policy.window_s]
            if len(self._recent) >= self.policy.max_restarts:
                self._write("gave up")
                self.log("agent keeper gave up", level="error", pid=pid, exit=self._last_exit,
                         restarts=self.restarts,
                         reason=f"the agent died {len(self._recent) + 1} times within "
                                f"{self.policy.window_s:g} s; see its events above; start it "
                                "again by hand once the cause is fixed")  # fmt: skip
                return _exit_status(code) or 1
            delay = self.policy.delay(len(self._recent))
            self._write("restarting")
            self.log("agent died; restarting it", level="warning", pid=pid,
                     exit=self._last_exit, restarts=self.restarts, in_s=delay)  # fmt: skip
            self._pause(delay)
            self._recent.append(time.monotonic())
            self.restarts += 1

    def _spawn(self) -> int:
        """Start the agent: its own session (a terminal's signals reach it only through us),
        an empty signal mask (ours blocks what we wait for), our stdio."""
        pid = os.posix_spawn(
            self.command[0], self.command, self.env, setsid=True, setsigmask=(),
        )  # fmt: skip
        self.agent_pid = pid
        self._write("running", start_time=process_start_time(pid))
        self.log("agent started by keeper", pid=pid, restarts=self.restarts)
        return pid

    def _wait(self, pid: int) -> int:
        """Until ``pid`` exits: its wait code (negative: killed by that signal). A SIGTERM or
        SIGINT meanwhile is forwarded to it, before it can have been reaped."""
        while True:  # one turn per signal (or per _POLL_S); ends when the child does
            info = signal.sigtimedwait(_WAITED, _POLL_S)
            if info is not None and info.si_signo in _STOP_SIGNALS:
                self.stop_signal = info.si_signo
                self.log("forwarding a signal to the agent", pid=pid,
                         signal=signal.Signals(info.si_signo).name)  # fmt: skip
                os.kill(pid, info.si_signo)  # not reaped yet: still our child's PID
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return os.waitstatus_to_exitcode(status)

    def _pause(self, seconds: float) -> None:
        """Wait before a restart; a stop signal ends the wait (and then the keeper)."""
        deadline = time.monotonic() + seconds
        while self.stop_signal is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            info = signal.sigtimedwait(_STOP_SIGNALS, left)
            if info is not None:
                self.stop_signal = info.si_signo

    # -- the state file -------------------------------------------------------------------
    def _write(self, state: str, start_time: int | None = None) -> None:
        """The state for the cluster (agent PID, restarts), replaced whole."""
        if self.state_file is None:
            return
        data: dict[str, Any] = {
            "keeper_pid": os.getpid(),
            "state": state,
            "agent_pid": self.agent_pid,
            "agent_start_time": start_time,
            "restarts": self.restarts,
            "last_exit": self._last_exit,
            "t": round(time.time(), 3),
        }
        atomic.write_json(self.state_file, data)


def read_state(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A keeper's state file, or None when there is none (yet) or it cannot be read."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def agent_command(argv: Sequence[str]) -> list[str]:
    """The agent's own command line: this interpreter running the agent program with ``argv``
    (the keeper's arguments without its own options)."""
    return [sys.executable, "-m", "dpmigrate.agentd", *argv]
