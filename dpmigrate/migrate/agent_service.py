"""Checkpoint and migration, as operations every node agent serves (DESIGN.md §4, §6, §7).

The runtime's agent knows nothing of CRIU or migration: the agent program
(:mod:`dpmigrate.agentd`) calls :func:`register`, which puts these operations into the agent's
operation table, each with its typed request record. The :class:`MigrationService` holds what
they keep between calls — the transfers in flight and the one CRIU thread — and reaches the
agent only for its supervisor, stage arguments, lock, node name and address.

The orchestrator (:mod:`dpmigrate.migrate.orchestrator`) is their client.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

from dpmigrate.migrate import stage_checkpoint, stage_transfer
from dpmigrate.runtime.agent import Agent, StageRef, log
from dpmigrate.runtime.operations import AbsPath, NoArgs, Request

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


@dataclasses.dataclass(frozen=True)
class WakeStage(StageRef):
    timeout: float  # seconds, clamped to 1..PHASE_TIMEOUT_S


@dataclasses.dataclass(frozen=True)
class DumpStage(StageRef):
    out: AbsPath
    quiesced: dict[str, Any]  # the reply of quiesce_stage


@dataclasses.dataclass(frozen=True)
class PageServer(StageRef):
    images_dir: AbsPath


@dataclasses.dataclass(frozen=True)
class DumpToPageServer(StageRef):
    images_dir: AbsPath
    page_server: tuple[str, int]  # the reply of page_server: [address, port]
    quiesced: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class FinishPageServer(StageRef):
    source_dir: AbsPath


@dataclasses.dataclass(frozen=True)
class LazyDump(StageRef):
    images_dir: AbsPath
    quiesced: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class RestoreImages(Request):
    images_dir: AbsPath
    lazy_source: tuple[str, int] | None  # post-copy: the source's lazy-pages server


class MigrationService:
    """The checkpoint and migration operations of one agent, and their state."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.transfers = stage_transfer.Transfers(agent)
        #: Every CRIU dump and restore runs on this one thread, which lives as long as the agent:
        #: a restored process's parent is the thread that ran criu, and the parent-death signal
        #: CRIU restores would fire when that thread ended.
        self.criu_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="criu")

    def _on_criu_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self.criu_thread.submit(fn, *args, **kwargs).result()

    # -- checkpoint and restore (see stage_checkpoint) ----------------------------------
    def checkpoint_stage(self, req: CheckpointStage) -> dict[str, Any]:
        """Quiesce a stage and dump it with CRIU into a bundle."""
        log("checkpoint", stage=req.key, out=req.out, leave_running=req.leave_running)
        result = self._on_criu_thread(
            stage_checkpoint.checkpoint_stage, self.agent, req.key, req.out, req.leave_running
        )
        log("checkpointed", stage=req.key, frozen_time_us=result["criu"]["frozen_time"])
        return result

    def restore_stage(self, req: RestoreStage) -> dict[str, Any]:
        """Restore a stage bundle on this node, adopt it and (unless told not to) wake it."""
        result = self._on_criu_thread(
            stage_checkpoint.restore_stage, self.agent, req.bundle, wake_it=req.wake
        )
        log("restored", stage=result["stage"], pid=result["pid"])
        return result

    def quiesce_stage(self, req: StageRef) -> dict[str, Any]:
        return stage_checkpoint.quiesce_stage(self.agent, req.key)

    def wake_stage(self, req: WakeStage) -> dict[str, Any]:
        timeout = min(max(1.0, req.timeout), stage_checkpoint.PHASE_TIMEOUT_S)
        return stage_checkpoint.wake_stage(self.agent, req.key, timeout)

    def restart_stage(self, req: StageRef) -> dict[str, Any]:
        log("restart", stage=req.key)
        return stage_checkpoint.restart_stage(self.agent, req.key)

    def discard_stage(self, req: StageRef) -> None:
        log("discard", stage=req.key)
        stage_checkpoint.discard_stage(self.agent, req.key)

    def dump_stage(self, req: DumpStage) -> dict[str, Any]:
        """Dump an already quiesced stage, leaving it asleep (migration transfer phase)."""
        return self._on_criu_thread(
            stage_checkpoint.dump_stage, self.agent, req.key, req.out, True, req.quiesced
        )

    def facts(self, _: NoArgs) -> dict[str, Any]:
        """What a migration's pre-flight compares: CRIU, CPU flags, kernel, free space."""
        return stage_checkpoint.node_facts(self.agent)

    # -- live-migration transfer (see stage_transfer) -----------------------------------
    def page_server(self, req: PageServer) -> dict[str, Any]:
        return self.transfers.start_page_server(req.key, req.images_dir)

    def dump_to_page_server(self, req: DumpToPageServer) -> dict[str, Any]:
        return self._on_criu_thread(
            self.transfers.dump_to_page_server,
            req.key, req.images_dir, req.page_server, req.quiesced,
        )  # fmt: skip

    def finish_page_server(self, req: FinishPageServer) -> dict[str, Any]:
        return self.transfers.finish_page_server(req.key, req.source_dir)

    def lazy_dump(self, req: LazyDump) -> dict[str, Any]:
        return self._on_criu_thread(self.transfers.lazy_dump, req.key, req.images_dir, req.quiesced)

    def lazy_finish(self, req: StageRef) -> dict[str, Any]:
        return self.transfers.lazy_finish(req.key)

    def lazy_abort(self, req: StageRef) -> None:
        self.transfers.lazy_abort(req.key)

    def lazy_destination_done(self, req: StageRef) -> None:
        self.transfers.lazy_destination_done(req.key)

    def restore_images(self, req: RestoreImages) -> dict[str, Any]:
        return self._on_criu_thread(self.transfers.restore_images, req.images_dir, req.lazy_source)

    def cancel_transfer(self, req: StageRef) -> None:
        """Rollback: stop a page server or lazy-pages daemon left by a failed migration."""
        self.transfers.cancel(req.key)


def register(agent: Agent) -> MigrationService:
    """Serve checkpoint and migration on ``agent`` (before it starts listening)."""
    service = MigrationService(agent)
    ops = agent.operations
    ops.register("facts", NoArgs, service.facts)
    ops.register("checkpoint_stage", CheckpointStage, service.checkpoint_stage)
    ops.register("restore_stage", RestoreStage, service.restore_stage)
    ops.register("quiesce_stage", StageRef, service.quiesce_stage)
    ops.register("wake_stage", WakeStage, service.wake_stage)
    ops.register("restart_stage", StageRef, service.restart_stage)
    ops.register("discard_stage", StageRef, service.discard_stage)
    ops.register("dump_stage", DumpStage, service.dump_stage)
    ops.register("page_server", PageServer, service.page_server)
    ops.register("dump_to_page_server", DumpToPageServer, service.dump_to_page_server)
    ops.register("finish_page_server", FinishPageServer, service.finish_page_server)
    ops.register("lazy_dump", LazyDump, service.lazy_dump)
    ops.register("lazy_finish", StageRef, service.lazy_finish)
    ops.register("lazy_abort", StageRef, service.lazy_abort)
    ops.register("lazy_destination_done", StageRef, service.lazy_destination_done)
    ops.register("restore_images", RestoreImages, service.restore_images)
    ops.register("cancel_transfer", StageRef, service.cancel_transfer)
    return service
