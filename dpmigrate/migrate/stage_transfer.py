"""The agent's side of a live migration's memory transfer (DESIGN.md §6).

* stop-and-copy — the destination agent runs a CRIU page server; the source agent dumps the
  quiesced stage with its memory streamed to it, writing only the small non-memory images on
  its own disk (then copied next to the pages). The source is dumped with ``leave_running``:
  it stays asleep, quiesced, until the destination confirms — or is simply woken on rollback.
* post-copy — the source agent dumps with lazy pages and its CRIU stays behind as the page
  server; the destination restores at once with a ``criu lazy-pages`` daemon that pulls the
  pages on demand and in the background. The source stays frozen until every page moved;
  ``finish`` waits for that. Rollback before then: abort the source's CRIU first (the source
  resumes, asleep in its quiesce), then drop the destination (see checkpoint.transfer).

A transfer in flight is kept in a :class:`Transfers` under the stage's key between the calls
of one migration; the agent's migration service owns it (:mod:`dpmigrate.migrate.agent_service`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpmigrate.checkpoint import criu_rpc, transfer
from dpmigrate.errors import DpmigrateError
from dpmigrate.migrate import stage_checkpoint

if TYPE_CHECKING:
    from dpmigrate.runtime.agent import Agent

CONTEXT = "context.json"


class Transfers:
    """The transfers in flight on one node, by stage key: page servers (destination) and
    lazy-pages sources (source), and lazy-pages daemons (destination)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.servers: dict[str, transfer.PageServer | transfer.LazySource] = {}
        self.lazy_daemons: dict[str, transfer.LazyDestination] = {}

    def _take(self, key: str, what: str) -> Any:
        server = self.servers.pop(key, None)
        if server is None:
            raise DpmigrateError(f"no {what} for stage {key!r} on node {self.agent.node}")
        return server

    def start_page_server(self, key: str, images_dir: str) -> dict[str, Any]:
        """Destination: a page server on this node's address writing into ``images_dir``."""
        Path(images_dir).mkdir(parents=True, exist_ok=True)
        server = transfer.PageServer(images_dir, address=self.agent.address, port=0).start()
        self.servers[key] = server
        address, port = server.endpoint
        return {"address": address, "port": port}

    def dump_to_page_server(
        self, key: str, images_dir: str, page_server: tuple[str, int], quiesced: dict[str, Any]
    ) -> dict[str, Any]:
        """Source: dump the quiesced stage, memory to the destination's page server."""
        proc, pid = stage_checkpoint.running_stage(self.agent, key)
        context, _ = stage_checkpoint.stage_context(self.agent, key, quiesced)
        Path(images_dir).mkdir(parents=True, exist_ok=True)
        proc.checkpointing = True
        try:
            result = transfer.dump_to_page_server(pid, images_dir, page_server, leave_running=True)
        finally:
            proc.checkpointing = False
            criu_rpc.remove_network_lock()
        (Path(images_dir) / CONTEXT).write_text(json.dumps(context))
        return {"criu": result.as_dict(), "local_bytes": transfer.images_bytes(images_dir),
                **context}  # fmt: skip

    def finish_page_server(self, key: str, source_dir: str) -> dict[str, Any]:
        """Destination: wait for the page server, then bring the small images next to the
        pages. Returns the bytes that crossed (pages) and were copied (the rest)."""
        server = self._take(key, "page server")
        try:
            server.wait()
        finally:
            server.stop()
        copied = transfer.copy_images(source_dir, server.images_dir)
        context = json.loads((Path(source_dir) / CONTEXT).read_text())
        (Path(server.images_dir) / CONTEXT).write_text(json.dumps(context))
        pages = transfer.images_bytes(server.images_dir, memory_only=True)
        return {"pages_bytes": pages, "copied_bytes": copied.bytes}

    def lazy_dump(self, key: str, images_dir: str, quiesced: dict[str, Any]) -> dict[str, Any]:
        """Source: lazy-pages dump; its CRIU stays as the page server (kept in servers)."""
        proc, pid = stage_checkpoint.running_stage(self.agent, key)
        context, _ = stage_checkpoint.stage_context(self.agent, key, quiesced)
        Path(images_dir).mkdir(parents=True, exist_ok=True)
        proc.checkpointing = True
        source = transfer.LazySource(pid, images_dir, leave_running=True).start()
        self.servers[key] = source
        (Path(images_dir) / CONTEXT).write_text(json.dumps(context))
        return {"address": self.agent.address, "port": source.port,
                "local_bytes": transfer.images_bytes(images_dir), **context}  # fmt: skip

    def lazy_finish(self, key: str) -> dict[str, Any]:
        """Source: wait until every page was pulled; the source then sits asleep (discard it)."""
        source = self._take(key, "lazy-pages source")
        try:
            result = source.wait_done()
        finally:
            source.stop()
            proc = self.agent.supervisor.stages.get(key)
            if proc is not None:
                proc.checkpointing = False
            criu_rpc.remove_network_lock()
        return {"criu": result.as_dict()}

    def lazy_abort(self, key: str) -> None:
        """Source, on rollback: stop serving pages; the source resumes (still quiesced)."""
        source = self.servers.pop(key, None)
        if isinstance(source, transfer.LazySource):
            source.abort()
        if source is not None:
            source.stop()
        proc = self.agent.supervisor.stages.get(key)
        if proc is not None:
            proc.checkpointing = False
        criu_rpc.remove_network_lock()

    def restore_images(
        self, images_dir: str, lazy_source: tuple[str, int] | None = None
    ) -> dict[str, Any]:
        """Destination: restore a migrated stage from an images folder (not woken), adopt it.
        With ``lazy_source`` (address, port) the pages come later, through a lazy-pages
        daemon."""
        agent = self.agent
        source_dir = Path(images_dir).parent / "source"
        if lazy_source is not None:  # post-copy: the small images are still only at the source
            Path(images_dir).mkdir(parents=True, exist_ok=True)
            transfer.copy_images(source_dir, images_dir)
            (Path(images_dir) / CONTEXT).write_text((source_dir / CONTEXT).read_text())
        context = json.loads((Path(images_dir) / CONTEXT).read_text())
        key = f"{context['app']}/{context['stage']}"
        running = agent.supervisor.stages.get(key)
        if running is not None and not running.finished:
            raise DpmigrateError(f"stage {key!r} already runs on node {agent.node}")
        t0 = time.monotonic()
        logs = Path(context["run_dir"]) / "criu" / f"{context['stage']}-{int(time.time() * 1000)}"
        logs.mkdir(parents=True, exist_ok=True)
        if lazy_source is not None:
            daemon = transfer.LazyDestination(images_dir, lazy_source, log_dir=logs).start()
            self.lazy_daemons[key] = daemon
            result = daemon.restore(restore_sibling=True)
        else:
            result = criu_rpc.restore(images_dir, restore_sibling=True, log_dir=logs)
        stage_checkpoint.adopt(agent, context, result.pid)
        return {"stage": key, "node": agent.node, "pid": result.pid,
                "restore_s": round(time.monotonic() - t0, 4), "criu": result.as_dict()}  # fmt: skip

    def lazy_destination_done(self, key: str) -> None:
        daemon = self.lazy_daemons.pop(key, None)
        if daemon is not None:
            try:
                daemon.wait_done()
            finally:
                daemon.stop()

    def cancel(self, key: str) -> None:
        """Rollback: stop a page server or lazy-pages daemon left by a failed migration."""
        for table in (self.servers, self.lazy_daemons):
            obj = table.pop(key, None)
            if obj is not None:
                obj.stop()
