"""The undo log of a migration: what was done, and how to take it back.

Each step that changes something pushes, right after it succeeded, how to undo it. A rollback
runs them newest first. Every undo step runs whatever happened to the one before it — a full
disk, an agent that is gone, a bug — and each is logged and reported, so the report says
exactly what could not be undone (DESIGN.md §6).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

log = logging.getLogger("dpmigrate.migrate")


@dataclasses.dataclass(frozen=True)
class UndoStep:
    what: str  # "wake flows/table on node2": said in the log and the report
    run: Callable[[], None]


class UndoLog:
    def __init__(self, label: str) -> None:
        self.label = label
        self._steps: list[UndoStep] = []

    def push(self, what: str, run: Callable[[], None]) -> None:
        self._steps.append(UndoStep(what, run))

    def __len__(self) -> int:
        return len(self._steps)

    def rollback(self) -> tuple[list[str], list[str]]:
        """Run every step, newest first; returns (each step's outcome, the failures)."""
        done: list[str] = []
        failed: list[str] = []
        while self._steps:
            step = self._steps.pop()
            try:
                step.run()
            except Exception as err:  # the undo of the rest must go on, whatever this was
                text = f"{step.what}: {type(err).__name__}: {err}"
                log.error("migration %s: rollback step failed: %s", self.label, text)
                done.append(f"FAILED: {text}")
                failed.append(text)
            else:
                log.info("migration %s: rollback step done: %s", self.label, step.what)
                done.append(f"ok: {step.what}")
        return done, failed

    def forget(self) -> None:
        """Past the point of no return: nothing is to be undone any more."""
        self._steps.clear()
