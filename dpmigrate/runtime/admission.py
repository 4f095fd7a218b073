"""Connection budgets of an agent's listeners: what a stranger can use up, and what it cannot.

A connection first takes a *pending* slot: it holds it until it has proved its credential
(at most :data:`~dpmigrate.runtime.control.HANDSHAKE_TIMEOUT_S`). Pending slots are few,
and on a TCP listener bounded per source address, so idle or garbage connections from one
host cannot fill them. A proven connection moves to a *session* slot of a separate, larger
budget that strangers never reach. Each listener has its own budgets: a flood at the TCP
port (other agents, the network) never touches the unix sockets the node's own stages and
the CLI use.

Refusals are counted and logged at most once a second, so a flood cannot fill the log.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Budget:
    pending: int  # unauthenticated connections, in all
    pending_per_source: int  # unauthenticated connections from one address
    sessions: int  # authenticated connections


#: Other agents and the network: few pending, few per host.
TCP_BUDGET = Budget(pending=32, pending_per_source=4, sessions=64)
#: The node's own stages and the CLI (a unix socket has no source address to tell apart).
LOCAL_BUDGET = Budget(pending=32, pending_per_source=32, sessions=512)

_LOG_EVERY_S = 1.0


class Admission:
    """The slots of one listener. Thread-safe: the accept loop admits, serving threads
    promote and release."""

    def __init__(
        self, budget: Budget, log: Callable[..., None], listener: str
    ) -> None:
        self.budget = budget
        self._log = log
        self._listener = listener
        self._lock = threading.Lock()
        self._pending: collections.Counter[str] = collections.Counter()
        self._sessions = 0
        self._refused: collections.Counter[str] = collections.Counter()
        self._last_log = 0.0

    def admit(self, source: str) -> bool:
        """A new connection from ``source``: True if it may start its handshake."""
        with self._lock:
            total = sum(self._pending.values())
            if total >= self.budget.pending:
                return self._refuse("too many connections waiting to authenticate")
            if self._pending[source] >= self.budget.pending_per_source:
                return self._refuse("too many unauthenticated connections from one address")
            self._pending[source] += 1
            return True

    def promote(self, source: str) -> bool:
        """``source``'s connection proved its credential: True if a session slot is free
        (its pending slot is given back either way)."""
        with self._lock:
            self._drop_pending(source)
            if self._sessions >= self.budget.sessions:
                return self._refuse("too many sessions")
            self._sessions += 1
            return True

    def release(self, source: str, promoted: bool) -> None:
        with self._lock:
            if promoted:
                self._sessions -= 1
            else:
                self._drop_pending(source)

    def refused(self, reason: str) -> None:
        """Count a refusal decided elsewhere (a failed handshake)."""
        with self._lock:
            self._refuse(reason)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {"pending": sum(self._pending.values()), "sessions": self._sessions}

    def _drop_pending(self, source: str) -> None:
        self._pending[source] -= 1
        if self._pending[source] <= 0:
            del self._pending[source]

    def _refuse(self, reason: str) -> bool:
        self._refused[reason] += 1
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY_S:
            self._last_log = now
            self._log("refused", level="warning", listener=self._listener,
                      reasons=dict(self._refused))  # fmt: skip
            self._refused.clear()
        return False
