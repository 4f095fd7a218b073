"""Checkpoint and migration, as operations every node agent serves (DESIGN.md §4, §6, §7).

The runtime's agent knows nothing of CRIU or migration: the agent program
(:mod:`dpmigrate.agentd`) calls :func:`register`, which puts these operations into the agent's
operation table, each with its typed request record. The :class:`MigrationService` holds what
they keep between calls — the transfers in flight and the one CRIU thread — and reaches the
agent only for its supervisor, stage arguments, lock, node name and address.

The migration engine (:mod:`dpmigrate.migrate.engine`) is their client.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import re
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from dpmigrate.checkpoint import bundle as bundles
from dpmigrate.migrate import cold_restore, stage_checkpoint, stage_transfer
from dpmigrate.runtime.agent import Agent, StageRef
from dpmigrate.runtime.operations import AbsPath, Name, NoArgs, Request, Rule

T = TypeVar("T")


# -- request records -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CheckpointStage(StageRef):
    out: AbsPath  # the bundle folder to create
    leave_running: bool


@dataclasses.dataclass(frozen=True)
class RestoreStage(Request):
    bundle: AbsPath
    wake: bool
    keep_newer_journal: bool = False  # the stage was placed here all along (see restore_stage)
    trust_owner: bool = False  # --trust-owner: accept another user's or a writable bundle


@dataclasses.dataclass(frozen=True)
class ColdRestoreStage(Request):
    bundle: AbsPath
    keep_newer_journal: bool = False  # the stage was placed here all along
    point: dict[str, Any] | None = None  # a later point: journal_point's reply on its last node
    trust_owner: bool = False  # --trust-owner: accept another user's or a writable bundle


@dataclasses.dataclass(frozen=True)
class WakeStage(StageRef):
    timeout: float  # seconds, clamped to 1..PHASE_TIMEOUT_S


@dataclasses.dataclass(frozen=True)
class DumpStage(StageRef):
    out: AbsPath
    quiesced: dict[str, Any]  # the reply of quiesce_stage


def _address_problem(value: str) -> str | None:
    host, sep, port = value.rpartition(":")
    if sep and _HOST_RE.fullmatch(host) and port.isdigit() and 0 < int(port) < 65536:
        return None
    return f"{value[:80]!r} is not HOST:PORT (a host name or IPv4 address, a port 1-65535)"


_HOST_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}")
#: Another node's agent, as the cluster names it: ``Node.agent_address``.
AgentAddress = Annotated[str, Rule("an agent address HOST:PORT", _address_problem)]
#: The name of a file in a bundle (checked as :func:`bundle.name_problem` says).
BundleFile = Annotated[str, Rule("a bundle file name", bundles.name_problem)]


@dataclasses.dataclass(frozen=True)
class MigrationRef(Request):
    """One migration's files on this node (``agent.run_dir/migrations/ID``)."""

    migration: Name  # the engine's migration id


@dataclasses.dataclass(frozen=True)
class MigrationChunk(MigrationRef):
    file: BundleFile  # a file the migration's manifest lists
    offset: int
    size: int  # at most stage_transfer.CHUNK_BYTES are sent


@dataclasses.dataclass(frozen=True)
class StageMigration(StageRef):
    """One stage's part in one migration."""

    migration: Name


@dataclasses.dataclass(frozen=True)
class DumpToPageServer(StageMigration):
    page_server: tuple[str, int]  # the reply of page_server: [address, port]
    quiesced: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LazyDump(StageMigration):
    quiesced: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class AdoptJournalPoint(StageRef):
    point: dict[str, Any]  # the reply of journal_point on the other node


@dataclasses.dataclass(frozen=True)
class PullMigration(StageMigration):
    source: AgentAddress  # the source node's agent (its TCP listener)


@dataclasses.dataclass(frozen=True)
class RestoreImages(StageMigration):
    lazy_source: tuple[str, int] | None  # post-copy: the source's lazy-pages server


class MigrationService:
    """The checkpoint and migration operations of one agent, and their state."""

    def __init__(self, agent: Agent, criu: str) -> None:
        self.agent = agent
        self.criu = criu  # the criu binary (DPMIGRATE_CRIU, as the agent program read it)
        self.transfers = stage_transfer.Transfers(agent, criu)
        #: Every CRIU dump and restore runs on this one thread, which lives as long as the agent:
        #: a restored process's parent is the thread that ran criu, and the parent-death signal
        #: CRIU restores would fire when that thread ended.
        self.criu_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="criu")

    def _on_criu_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self.criu_thread.submit(fn, *args, **kwargs).result()

    # -- checkpoint and restore (see stage_checkpoint) ----------------------------------
    def checkpoint_stage(self, req: CheckpointStage) -> dict[str, Any]:
        """Quiesce a stage and dump it with CRIU into a bundle."""
        self.agent.log("checkpoint", stage=req.key, out=req.out, leave_running=req.leave_running)
        result = self._on_criu_thread(
            stage_checkpoint.checkpoint_stage, self.agent, req.key, req.out, req.leave_running
        )
        self.agent.log("checkpointed", stage=req.key, frozen_time_us=result["criu"]["frozen_time"])
        return result

    def restore_stage(self, req: RestoreStage) -> dict[str, Any]:
        """Restore a stage bundle on this node, adopt it and (unless told not to) wake it."""
        result = self._on_criu_thread(
            stage_checkpoint.restore_stage, self.agent, req.bundle, wake_it=req.wake,
            keep_newer_journal=req.keep_newer_journal, trust_owner=req.trust_owner,
        )  # fmt: skip
        self.agent.log("restored", stage=result["stage"], pid=result["pid"])
        return result

    def cold_restore_stage(self, req: ColdRestoreStage) -> dict[str, Any]:
        """Start a stage here from a bundle's state snapshot and positions (no CRIU)."""
        self.agent.log("cold restore", bundle=req.bundle, with_point=req.point is not None,
                       trust_owner=req.trust_owner)  # fmt: skip
        result = cold_restore.cold_restore_stage(
            self.agent, req.bundle, req.keep_newer_journal, req.point, req.trust_owner
        )
        self.agent.log("restored cold", stage=result["stage"], pid=result["pid"],
                       started_from=result["started_from"])  # fmt: skip
        return result

    def quiesce_stage(self, req: StageRef) -> dict[str, Any]:
        return stage_checkpoint.quiesce_stage(self.agent, req.key)

    def wake_stage(self, req: WakeStage) -> dict[str, Any]:
        timeout = min(max(1.0, req.timeout), stage_checkpoint.PHASE_TIMEOUT_S)
        return stage_checkpoint.wake_stage(self.agent, req.key, timeout)

    def restart_stage(self, req: StageRef) -> dict[str, Any]:
        self.agent.log("restart", stage=req.key)
        return stage_checkpoint.restart_stage(self.agent, req.key)

    def journal_point(self, req: StageRef) -> dict[str, Any]:
        return stage_checkpoint.journal_point(self.agent, req.key)

    def adopt_journal_point(self, req: AdoptJournalPoint) -> dict[str, Any]:
        result = stage_checkpoint.adopt_journal_point(self.agent, req.key, req.point)
        self.agent.log("journal point adopted", stage=req.key, **result)
        return result

    def discard_stage(self, req: StageRef) -> None:
        self.agent.log("discard", stage=req.key)
        stage_checkpoint.discard_stage(self.agent, req.key)

    def dump_stage(self, req: DumpStage) -> dict[str, Any]:
        """Dump an already quiesced stage, leaving it asleep (migration transfer phase)."""
        return self._on_criu_thread(
            stage_checkpoint.dump_stage, self.agent, req.key, req.out, True, req.quiesced
        )

    def facts(self, _: NoArgs) -> dict[str, Any]:
        """What a migration's pre-flight compares: CRIU, CPU flags, kernel, free space."""
        return stage_checkpoint.node_facts(self.agent, self.criu)

    # -- live-migration transfer (see stage_transfer) -----------------------------------
    def page_server(self, req: StageMigration) -> dict[str, Any]:
        """Destination: a page server writing into the migration's incoming folder."""
        return self.transfers.start_page_server(req.key, req.migration)

    def dump_to_page_server(self, req: DumpToPageServer) -> dict[str, Any]:
        """Source: dump the quiesced stage, memory to the page server; seal the rest."""
        return self._on_criu_thread(
            self.transfers.dump_to_page_server,
            req.key, req.migration, req.page_server, req.quiesced,
        )  # fmt: skip

    def finish_page_server(self, req: StageRef) -> dict[str, Any]:
        return self.transfers.finish_page_server(req.key)

    def lazy_dump(self, req: LazyDump) -> dict[str, Any]:
        """Source: lazy-pages dump, sealed; its CRIU serves the pages."""
        return self._on_criu_thread(self.transfers.lazy_dump, req.key, req.migration, req.quiesced)

    def migration_files(self, req: MigrationRef) -> dict[str, Any]:
        """Source: the manifest of the migration's sealed outgoing folder."""
        return self.transfers.files(req.migration)

    def migration_chunk(self, req: MigrationChunk) -> dict[str, Any]:
        """Source: a chunk of one file the migration's manifest lists (base64)."""
        return self.transfers.chunk(req.migration, req.file, req.offset, req.size)

    def pull_migration(self, req: PullMigration) -> dict[str, Any]:
        """Destination: pull the migration's files from the source agent; verify them."""
        self.agent.log("pull migration", stage=req.key, migration=req.migration, source=req.source)
        result = self.transfers.pull(req.key, req.migration, req.source)
        self.agent.log("pulled migration", stage=req.key, migration=req.migration,
                       bytes=result["copied_bytes"])  # fmt: skip
        return result

    def lazy_finish(self, req: StageRef) -> dict[str, Any]:
        return self.transfers.lazy_finish(req.key)

    def lazy_abort(self, req: StageRef) -> None:
        self.transfers.lazy_abort(req.key)

    def lazy_destination_done(self, req: StageRef) -> None:
        self.transfers.lazy_destination_done(req.key)

    def restore_images(self, req: RestoreImages) -> dict[str, Any]:
        """Destination: journal from the received state, restore, adopt (not woken)."""
        return self._on_criu_thread(
            self.transfers.restore_images, req.key, req.migration, req.lazy_source
        )

    def cancel_transfer(self, req: StageRef) -> None:
        """Rollback: stop a page server or lazy-pages daemon left by a failed migration."""
        self.transfers.cancel(req.key)

    def remove_migration(self, req: MigrationRef) -> dict[str, Any]:
        """Cleanup and rollback: remove this node's folder of the migration."""
        result = self.transfers.remove(req.migration)
        self.agent.log("removed migration", migration=req.migration, removed=result["removed"])
        return result


def register(agent: Agent, criu: str) -> MigrationService:
    """Serve checkpoint and migration on ``agent`` (before it starts listening); ``criu`` is
    the criu binary to report in the node's facts."""
    service = MigrationService(agent, criu)
    ops = agent.operations
    ops.register("facts", NoArgs, service.facts)
    ops.register("checkpoint_stage", CheckpointStage, service.checkpoint_stage)
    ops.register("restore_stage", RestoreStage, service.restore_stage)
    ops.register("cold_restore_stage", ColdRestoreStage, service.cold_restore_stage)
    ops.register("quiesce_stage", StageRef, service.quiesce_stage)
    ops.register("wake_stage", WakeStage, service.wake_stage)
    ops.register("restart_stage", StageRef, service.restart_stage)
    ops.register("discard_stage", StageRef, service.discard_stage)
    ops.register("journal_point", StageRef, service.journal_point)
    ops.register("adopt_journal_point", AdoptJournalPoint, service.adopt_journal_point)
    ops.register("dump_stage", DumpStage, service.dump_stage)
    # a migration: source side
    ops.register("dump_to_page_server", DumpToPageServer, service.dump_to_page_server)
    ops.register("lazy_dump", LazyDump, service.lazy_dump)
    ops.register("migration_files", MigrationRef, service.migration_files)
    ops.register("migration_chunk", MigrationChunk, service.migration_chunk)
    ops.register("lazy_finish", StageRef, service.lazy_finish)
    ops.register("lazy_abort", StageRef, service.lazy_abort)
    # a migration: destination side
    ops.register("page_server", StageMigration, service.page_server)
    ops.register("finish_page_server", StageRef, service.finish_page_server)
    ops.register("pull_migration", PullMigration, service.pull_migration)
    ops.register("restore_images", RestoreImages, service.restore_images)
    ops.register("lazy_destination_done", StageRef, service.lazy_destination_done)
    ops.register("cancel_transfer", StageRef, service.cancel_transfer)
    # a migration: both sides
    ops.register("remove_migration", MigrationRef, service.remove_migration)
    return service
