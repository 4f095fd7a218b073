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

A transfer in flight is kept in ``agent.transfers`` under the stage's key between the calls.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpmigrate.checkpoint import criu_rpc, transfer
from dpmigrate.errors import DpmigrateError
from dpmigrate.runtime import stage_checkpoint

if TYPE_CHECKING:
    from dpmigrate.runtime.agent import Agent

CONTEXT = "context.json"


def start_page_server(agent: Agent, key: str, images_dir: str) -> dict[str, Any]:
    """Destination: a page server on this node's address writing into ``images_dir``."""
    Path(images_dir).mkdir(parents=True, exist_ok=True)
    server = transfer.PageServer(images_dir, address=agent.address, port=0).start()
    agent.transfers[key] = server
    address, port = server.endpoint
    return {"address": address, "port": port}


def dump_to_page_server(
    agent: Agent, key: str, images_dir: str, page_server: list[Any], quiesced: dict[str, Any]
) -> dict[str, Any]:
    """Source: dump the quiesced stage, memory to the destination's page server."""
    proc, pid = stage_checkpoint.running_stage(agent, key)
    context, _ = stage_checkpoint.stage_context(agent, key, quiesced)
    Path(images_dir).mkdir(parents=True, exist_ok=True)
    proc.checkpointing = True
    try:
        result = transfer.dump_to_page_server(
            pid, images_dir, (str(page_server[0]), int(page_server[1])), leave_running=True
        )
    finally:
        proc.checkpointing = False
        criu_rpc.remove_network_lock()
    (Path(images_dir) / CONTEXT).write_text(json.dumps(context))
    return {"criu": result.as_dict(), "local_bytes": transfer.images_bytes(images_dir),
            **context}  # fmt: skip


def finish_page_server(agent: Agent, key: str, source_dir: str) -> dict[str, Any]:
    """Destination: wait for the page server, then bring the small images next to the
    pages. Returns the bytes that crossed (pages) and were copied (the rest)."""
    server = agent.transfers.pop(key)
    try:
        server.wait()
    finally:
        server.stop()
    copied = transfer.copy_images(source_dir, server.images_dir)
    context = json.loads((Path(source_dir) / CONTEXT).read_text())
    (Path(server.images_dir) / CONTEXT).write_text(json.dumps(context))
    pages = transfer.images_bytes(server.images_dir, memory_only=True)
    return {"pages_bytes": pages, "copied_bytes": copied.bytes}


def lazy_dump(agent: Agent, key: str, images_dir: str, quiesced: dict[str, Any]) -> dict[str, Any]:
    """Source: lazy-pages dump; its CRIU stays as the page server (kept in transfers)."""
    proc, pid = stage_checkpoint.running_stage(agent, key)
    context, _ = stage_checkpoint.stage_context(agent, key, quiesced)
    Path(images_dir).mkdir(parents=True, exist_ok=True)
    proc.checkpointing = True
    source = transfer.LazySource(pid, images_dir, leave_running=True).start()
    agent.transfers[key] = source
    (Path(images_dir) / CONTEXT).write_text(json.dumps(context))
    return {"address": agent.address, "port": source.port,
            "local_bytes": transfer.images_bytes(images_dir), **context}  # fmt: skip


def lazy_finish(agent: Agent, key: str) -> dict[str, Any]:
    """Source: wait until every page was pulled; the source then sits asleep (discard it)."""
    source = agent.transfers.pop(key)
    try:
        result = source.wait_done()
    finally:
        source.stop()
        proc = agent.supervisor.stages.get(key)
        if proc is not None:
            proc.checkpointing = False
        criu_rpc.remove_network_lock()
    return {"criu": result.as_dict()}


def lazy_abort(agent: Agent, key: str) -> None:
    """Source, on rollback: stop serving pages; the source resumes (still quiesced)."""
    source = agent.transfers.pop(key, None)
    if source is not None:
        source.abort()
        source.stop()
    proc = agent.supervisor.stages.get(key)
    if proc is not None:
        proc.checkpointing = False
    criu_rpc.remove_network_lock()


def restore_images(
    agent: Agent, images_dir: str, lazy_source: list[Any] | None = None
) -> dict[str, Any]:
    """Destination: restore a migrated stage from an images folder (not woken), adopt it.
    With ``lazy_source`` (address, port) the pages come later, through a lazy-pages daemon."""
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
        daemon = transfer.LazyDestination(
            images_dir, (str(lazy_source[0]), int(lazy_source[1])), log_dir=logs
        ).start()
        agent.lazy_daemons[key] = daemon
        result = daemon.restore(restore_sibling=True)
    else:
        result = criu_rpc.restore(images_dir, restore_sibling=True, log_dir=logs)
    stage_checkpoint.adopt(agent, context, result.pid)
    return {"stage": key, "node": agent.node, "pid": result.pid,
            "restore_s": round(time.monotonic() - t0, 4), "criu": result.as_dict()}  # fmt: skip


def lazy_destination_done(agent: Agent, key: str) -> None:
    daemon = agent.lazy_daemons.pop(key, None)
    if daemon is not None:
        try:
            daemon.wait_done()
        finally:
            daemon.stop()
