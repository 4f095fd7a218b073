"""Live migration: the orchestrator, its strategies, rollback and statistics.

:class:`LocalCluster` here is the runtime's local cluster plus ``migrate()``; it lives in this
package because migration sits above the runtime (dependencies point one way: migrate →
checkpoint, statesync, runtime → transports).
"""

from __future__ import annotations

from collections.abc import Callable

from dpmigrate.migrate.orchestrator import (
    PHASES,
    STRATEGIES,
    Migration,
    MigrationError,
    MigrationReport,
)
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
        back (``report.rolled_back``, ``report.error``) and the stage runs on where it was."""
        return Migration(self, stage, to, strategy, on_phase=on_phase).run()
