"""Migration strategies, one class each, behind one interface (:mod:`.base`)."""

from __future__ import annotations

from dpmigrate.migrate.strategies.base import Strategy
from dpmigrate.migrate.strategies.post_copy import PostCopy
from dpmigrate.migrate.strategies.statesync import StateSync
from dpmigrate.migrate.strategies.stop_and_copy import StopAndCopy

#: name -> class; a new strategy is one more entry here
STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (StopAndCopy, PostCopy, StateSync)
}

__all__ = ["STRATEGIES", "PostCopy", "StateSync", "StopAndCopy", "Strategy"]
