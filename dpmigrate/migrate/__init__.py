"""Live migration: the engine, its strategies, the undo log, the report.

:class:`LocalCluster` here is the runtime's local cluster plus ``migrate()``; it lives in this
package because migration sits above the runtime (dependencies point one way: migrate →
checkpoint, statesync, runtime → transports).
"""

from __future__ import annotations

from collections.abc import Callable

from dpmigrate.errors import MigrationError
from dpmigrate.migrate.engine import PHASES, Migration
from dpmigrate.migrate.report import MigrationReport
from dpmigrate.migrate.strategies import STRATEGIES
from dpmigrate.runtime.cluster import LocalCluster as _RuntimeCluster

__all__ = [
    "PHASES",
    "STRATEGIES",
    "LocalCluster",
    "Migration",
    "MigrationError",
    "MigrationReport",
]


class LocalCluster(_RuntimeCluster):
    """The local cluster, able to live-migrate its stages."""

    def migrate(
        self,
        stage: str,
        to: str,
        strategy: str = "stop-and-copy",
        on_phase: Callable[[str], None] | None = None,
    ) -> MigrationReport:
        """Move ``stage`` ([APP/]STAGE) to node ``to``; returns the report. A failure rolls
        back (``report.rolled_back``, ``report.error``) and the stage runs on where it was;
        ``report.rollback_failures`` lists what could not be undone, if anything."""
        return Migration(self, stage, to, strategy, on_phase=on_phase).run()
