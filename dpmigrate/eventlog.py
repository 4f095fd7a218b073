"""Event logs: one JSON line per event, each with its level (DESIGN.md §9: logs are event
streams). The agent writes its stream on stdout, a stage appends its own to its log file.

The threshold is a value the entry point passes in (``DPMIGRATE_LOG_LEVEL``, read by the CLI,
:mod:`dpmigrate.agentd` and the stage host's ``main``); an event below it is not written.
What each level is for, across the project:

* ``debug`` — detail needed only to trace a problem: every ring registration, every ring a
  stage opens (with its capacity and reconnect timeout), lease renewals;
* ``info`` — the lifecycle: started, listening, stage started, quiesced, woken, checkpointed,
  restored, stopped;
* ``warning`` — something went wrong and was handled: a refused connection or request, a
  stage that died and is restarted, a quiesce that timed out, a lock table left behind;
* ``error`` — something failed: an internal error, a stage that failed or was given up on.

A line is ``{"t": UNIX_TIME, "level": LEVEL, "event": NAME, ...context, ...fields}``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

#: The levels, lowest first (the values DPMIGRATE_LOG_LEVEL accepts).
LEVELS = ("debug", "info", "warning", "error")
_RANK = {name: rank for rank, name in enumerate(LEVELS)}


def _rank(level: str) -> int:
    try:
        return _RANK[level]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(LEVELS)}") from None


def _stdout(line: str) -> None:
    print(line, flush=True)


class EventLog:
    """A stream of JSON events at or above ``level``, written by ``write`` (default: stdout,
    flushed per line). ``context`` fields go into every line (a stage's name, say)."""

    def __init__(
        self,
        level: str = "info",
        write: Callable[[str], None] | None = None,
        **context: Any,
    ) -> None:
        self._threshold = _rank(level)
        self.level = level
        self._write = write or _stdout
        self.context = context

    def enabled(self, level: str) -> bool:
        """Whether an event at ``level`` would be written (to skip building costly fields)."""
        return _rank(level) >= self._threshold

    def __call__(self, event: str, /, *, level: str = "info", **fields: Any) -> str | None:
        """Write one event at ``level``; returns its line, or None when it is below the
        threshold (and was not written)."""
        if _rank(level) < self._threshold:
            return None
        head = {"t": round(time.time(), 3), "level": level, "event": event, **self.context}
        line = json.dumps({**head, **fields})
        self._write(line)
        return line
