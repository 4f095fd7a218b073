"""The agent's side of a live migration's transfer (DESIGN.md §6, §7: nodes share nothing).

Each agent keeps a migration's files in a folder of its own, ``agent.run_dir/migrations/ID``
(mode 0700; ``ID`` is the engine's migration id, a checked name): ``outgoing/`` on the
source, ``incoming/`` on the destination, and beside each the CRIU logs of that side
(``outgoing-logs/``, ``incoming-logs/``), never shipped. Where files go is decided here, from
``agent.run_dir`` alone — never from a path received over the network.

* stop-and-copy — the destination agent runs a CRIU page server writing into
  ``incoming/images``; the source agent dumps the quiesced stage with its memory streamed to
  it, the small non-memory images landing in ``outgoing/images``. The source is dumped with
  ``leave_running``: it stays asleep, quiesced, until the destination confirms — or is simply
  woken on rollback.
* post-copy — the source agent dumps with lazy pages and its CRIU stays behind as the page
  server; the destination restores at once with a ``criu lazy-pages`` daemon that pulls the
  pages on demand and in the background. The source stays frozen until every page moved;
  ``lazy_finish`` waits for that. Rollback before then: abort the source's CRIU first (the
  source resumes, asleep in its quiesce), then drop the destination (see checkpoint.transfer).

After its dump the source *seals* ``outgoing/`` as a bundle (:func:`bundle.seal`): the
images, the stage's committed state at the quiesced point (``state.bin``, from its journal),
its context (``rings.json``: app, stage, manifest, run folder, model, positions, state version
and digest), and a manifest with the size and sha256 of every file — the pages CRIU's page
server moved named as ``streamed``. The destination then *pulls* (:meth:`Transfers.pull`):
over the authenticated agent-to-agent channel it asks the source for the manifest
(``migration_files``) and for each listed file in chunks (``migration_chunk``; the source
serves nothing its manifest does not list), writes them into ``incoming/`` and verifies every
file before CRIU sees any: a mismatch is a BundleError naming the file, and the migration
rolls back. Before the restore it writes the stage's journal from the shipped state and
positions (:meth:`StageJournal.start_at`), so a node that never ran the stage has its
committed state. ``remove_migration`` removes an agent's folder of a migration; each side's
agent removes its own.

A transfer in flight is kept in a :class:`Transfers` between the calls of one migration; the
agent's migration service owns it (:mod:`dpmigrate.migrate.agent_service`).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpmigrate.checkpoint import bundle as bundles
from dpmigrate.checkpoint import criu_rpc, transfer
from dpmigrate.errors import BundleError, CheckpointError, DpmigrateError, ProtocolError
from dpmigrate.migrate import stage_checkpoint
from dpmigrate.runtime import control
from dpmigrate.statesync.state import State

if TYPE_CHECKING:
    from dpmigrate.runtime.agent import Agent

MIGRATIONS = "migrations"
OUTGOING, INCOMING = "outgoing", "incoming"
#: Bytes of a file per ``migration_chunk`` reply: base64 makes 4/3 of it, JSON a little more,
#: well under control.MAX_FRAME.
CHUNK_BYTES = 256 << 10
#: Seconds the destination waits to connect to the source, or for one reply of it, while
#: pulling: one chunk of 256 KiB between agents of one cluster network takes milliseconds, so
#: a link that gives nothing for this long is cut, and the stage is better off rolled back
#: (it sleeps, quiesced, all this time).
PULL_TIMEOUT_S = 8.0
#: What a migrated stage's context must hold (``rings.json`` of the migration's bundle).
_CONTEXT_KEYS = ("app", "stage", "manifest", "run_dir", "model", "positions", "state_version",
                 "state_digest")  # fmt: skip


class Transfers:
    """The migrations in flight on one node: page servers (destination) and lazy-pages
    sources (source), lazy-pages daemons (destination), and the manifests of the migration
    folders this agent sealed (source) or received and verified (destination)."""

    def __init__(self, agent: Agent, criu: str) -> None:
        self.agent = agent
        self.criu = criu  # the criu binary the agent was configured with
        self.servers: dict[str, transfer.PageServer | transfer.LazySource] = {}
        self.lazy_daemons: dict[str, transfer.LazyDestination] = {}
        self.sealed: dict[str, dict[str, Any]] = {}  # migration id -> manifest it serves
        self.received: dict[str, dict[str, Any]] = {}  # migration id -> verified manifest
        self._host: bundles.HostFacts | None = None

    # -- folders --------------------------------------------------------------------------
    def folder(self, migration: str) -> Path:
        """This agent's folder of ``migration`` (a checked name)."""
        return self.agent.run_dir / MIGRATIONS / migration

    def _new_side(self, migration: str, side: str) -> tuple[Path, Path]:
        """Make ``side/images`` and ``side-logs`` in the migration's folder (all 0700); the
        side must be new: a migration id is used once."""
        folder = self.folder(migration)
        for path in (folder.parent, folder):
            path.mkdir(mode=0o700, exist_ok=True)
            os.chmod(path, 0o700)
        root, logs = folder / side, folder / f"{side}-logs"
        try:
            root.mkdir(mode=0o700)
        except FileExistsError as err:
            raise DpmigrateError(
                f"migration {migration} already has an {side} folder on node {self.agent.node} "
                f"({root}); a migration id is used once: start a new migration"
            ) from err
        (root / bundles.IMAGES).mkdir(mode=0o700)
        logs.mkdir(mode=0o700, exist_ok=True)
        return root, logs

    @property
    def host(self) -> bundles.HostFacts:
        """This node's facts (CRIU version, CPU flags), read once: it takes a criu run."""
        if self._host is None:
            self._host = bundles.HostFacts.local(self.criu)
        return self._host

    def remove(self, migration: str) -> dict[str, Any]:
        """Remove this agent's folder of ``migration`` (what is there of either side). A
        folder that cannot be removed is a DpmigrateError naming it, never ignored."""
        self.sealed.pop(migration, None)
        self.received.pop(migration, None)
        folder = self.folder(migration)
        if not folder.exists():
            return {"node": self.agent.node, "removed": False}
        failures: list[str] = []
        shutil.rmtree(folder, onerror=lambda _fn, path, exc: failures.append(f"{path}: {exc[1]}"))
        if failures:
            raise DpmigrateError(
                f"could not remove migration {migration}'s folder {folder} on node "
                f"{self.agent.node}: {failures[0]}"
                + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else "")
                + "; remove it by hand"
            )
        return {"node": self.agent.node, "removed": True}

    def _take(self, key: str, what: str) -> Any:
        server = self.servers.pop(key, None)
        if server is None:
            raise DpmigrateError(f"no {what} for stage {key!r} on node {self.agent.node}")
        return server

    # -- source -----------------------------------------------------------------------------
    def dump_to_page_server(
        self, key: str, migration: str, page_server: tuple[str, int], quiesced: dict[str, Any]
    ) -> dict[str, Any]:
        """Source: dump the quiesced stage, memory to the destination's page server, the rest
        into ``outgoing/``; seal it."""
        proc, pid = stage_checkpoint.running_stage(self.agent, key)
        context, state = stage_checkpoint.stage_context(self.agent, key, quiesced)
        root, logs = self._new_side(migration, OUTGOING)
        proc.checkpointing = True
        try:
            result = transfer.dump_to_page_server(
                pid, root / bundles.IMAGES, page_server, leave_running=True, log_dir=logs
            )
        except CheckpointError as err:
            stage_checkpoint.release_network_lock(
                self.agent, key, criu_rpc.run_id(root / bundles.IMAGES, err.log_file)
            )
            raise
        finally:
            proc.checkpointing = False
        lock = stage_checkpoint.release_network_lock(self.agent, key, result.criu_run_id)
        manifest = self._seal(
            migration, root, pid, result.as_dict(), state, context, bundles.PAGE_IMAGES
        )
        return {"criu": result.as_dict(), "local_bytes": manifest["sizes"]["total"],
                "bundle": str(root), "network_lock": lock, **context}  # fmt: skip

    def lazy_dump(self, key: str, migration: str, quiesced: dict[str, Any]) -> dict[str, Any]:
        """Source: lazy-pages dump into ``outgoing/``, sealed; its CRIU stays as the page
        server (kept in servers)."""
        proc, pid = stage_checkpoint.running_stage(self.agent, key)
        context, state = stage_checkpoint.stage_context(self.agent, key, quiesced)
        root, logs = self._new_side(migration, OUTGOING)
        proc.checkpointing = True
        try:
            source = transfer.LazySource(pid, root / bundles.IMAGES, leave_running=True,
                                         log_dir=logs).start()  # fmt: skip
        except BaseException:
            proc.checkpointing = False  # a failed lazy dump resumed the source
            raise
        self.servers[key] = source
        try:  # complete once it serves: only the lazy pages stay in the process
            dumped = {"lazy_pages": True, "log_file": source.log_file}
            manifest = self._seal(migration, root, pid, dumped, state, context, ())
        except BaseException:
            self.lazy_abort(key)  # the source resumes: nobody will pull what was not sealed
            raise
        return {"address": self.agent.address, "port": source.port,
                "local_bytes": manifest["sizes"]["total"], "bundle": str(root),
                **context}  # fmt: skip

    def _seal(
        self,
        migration: str,
        root: Path,
        pid: int,
        dump: dict[str, Any],
        state: State,
        context: dict[str, Any],
        streamed: tuple[str, ...],
    ) -> dict[str, Any]:
        manifest = bundles.seal(
            root, pid, dump=dump, state=state.snapshot(), rings=context,
            stage=f"{context['app']}/{context['stage']}", node=self.agent.node,
            streamed=streamed, host=self.host,
        )  # fmt: skip
        self.sealed[migration] = manifest
        return manifest

    def files(self, migration: str) -> dict[str, Any]:
        """Source: the manifest of the migration's sealed folder (what the destination
        pulls)."""
        manifest = self.sealed.get(migration)
        if manifest is None:
            raise DpmigrateError(
                f"node {self.agent.node} has no sealed outgoing folder of migration {migration}"
            )
        return manifest

    def chunk(self, migration: str, name: str, offset: int, size: int) -> dict[str, Any]:
        """Source: up to ``size`` (at most CHUNK_BYTES) bytes at ``offset`` of a file the
        migration's manifest lists, base64; and the file's size here."""
        manifest = self.files(migration)
        root = self.folder(migration) / OUTGOING
        data, file_size = bundles.read_part(root, manifest, name, offset, min(size, CHUNK_BYTES))
        return {"data": base64.b64encode(data).decode("ascii"), "size": file_size}

    def lazy_finish(self, key: str) -> dict[str, Any]:
        """Source: wait until every page was pulled; the source then sits asleep (discard it)."""
        source = self._take(key, "lazy-pages source")
        try:
            result = source.wait_done()
        except CheckpointError:
            stage_checkpoint.release_network_lock(
                self.agent, key, criu_rpc.run_id(source.images_dir, source.log_file)
            )
            raise
        finally:
            source.stop()
            proc = self.agent.supervisor.stages.get(key)
            if proc is not None:
                proc.checkpointing = False
        lock = stage_checkpoint.release_network_lock(self.agent, key, result.criu_run_id)
        return {"criu": result.as_dict(), "network_lock": lock}

    def lazy_abort(self, key: str) -> None:
        """Source, on rollback: stop serving pages; the source resumes (still quiesced)."""
        source = self.servers.pop(key, None)
        if isinstance(source, transfer.LazySource):
            # resumes the source and removes that dump's own lock table
            stage_checkpoint.report_network_lock(self.agent, key, source.abort())
        if source is not None:
            source.stop()
        proc = self.agent.supervisor.stages.get(key)
        if proc is not None:
            proc.checkpointing = False

    # -- destination ------------------------------------------------------------------------
    def start_page_server(self, key: str, migration: str) -> dict[str, Any]:
        """Destination: a page server on this node's address writing into ``incoming/``."""
        root, logs = self._new_side(migration, INCOMING)
        server = transfer.PageServer(root / bundles.IMAGES, address=self.agent.address, port=0,
                                     log_dir=logs).start()  # fmt: skip
        self.servers[key] = server
        address, port = server.endpoint
        return {"address": address, "port": port}

    def finish_page_server(self, key: str) -> dict[str, Any]:
        """Destination: wait for the page server to end after the dump; the bytes of pages
        it received."""
        server = self._take(key, "page server")
        try:
            server.wait()
        finally:
            server.stop()
        return {"pages_bytes": transfer.images_bytes(server.images_dir, memory_only=True)}

    def pull(self, key: str, migration: str, source: str) -> dict[str, Any]:
        """Destination: fetch the migration's sealed files from the source agent at
        ``source`` (HOST:PORT) into ``incoming/`` and verify each (size, sha256) and this
        node against the dump (CRIU version, CPU flags). BundleError naming the file on any
        mismatch."""
        root = self.folder(migration) / INCOMING
        if not root.is_dir():  # post-copy: no page server made it
            root, _logs = self._new_side(migration, INCOMING)
        with control.AgentClient(source, self.agent.token, timeout=PULL_TIMEOUT_S) as peer:
            manifest = peer.call("migration_files", migration=migration)
            if not isinstance(manifest, dict) or manifest.get("stage") != key:
                raise BundleError(
                    f"migration {migration} at {source} is not of stage {key!r} "
                    f"(its manifest says {_stage_of(manifest)!r}); nothing was pulled"
                )

            def read(name: str, offset: int, size: int) -> tuple[bytes, int]:
                reply = peer.call("migration_chunk", migration=migration, file=name,
                                  offset=offset, size=size)  # fmt: skip
                if not (isinstance(reply, dict) and isinstance(reply.get("data"), str)
                        and type(reply.get("size")) is int):  # fmt: skip
                    raise ProtocolError(f"{source} answered migration_chunk with {reply!r:.80}")
                return base64.b64decode(reply["data"], validate=True), reply["size"]

            try:
                received = bundles.receive(root, manifest, read, chunk=CHUNK_BYTES,
                                           host=self.host)  # fmt: skip
            except BundleError as err:
                raise BundleError(f"migration {migration} from {peer.node}: {err}") from err
        self.received[migration] = manifest
        return {"copied_bytes": received, "bundle": str(root)}

    def restore_images(
        self, key: str, migration: str, lazy_source: tuple[str, int] | None = None
    ) -> dict[str, Any]:
        """Destination: write the stage's journal from the received state and positions,
        restore the received images (not woken), adopt the stage. With ``lazy_source``
        (address, port) the pages come later, through a lazy-pages daemon."""
        agent = self.agent
        if migration not in self.received:
            raise DpmigrateError(
                f"node {agent.node} has not received and verified migration {migration}; "
                "pull it first"
            )
        root = self.folder(migration) / INCOMING
        context = json.loads((root / bundles.RINGS).read_text())
        state = State.restore((root / bundles.STATE).read_bytes())
        _check_context(context, state, key, migration)
        running = agent.supervisor.stages.get(key)
        if running is not None and not running.finished:
            raise DpmigrateError(f"stage {key!r} already runs on node {agent.node}")
        stage_checkpoint.prepare_run_folder(agent, context, state)
        t0 = time.monotonic()
        logs = agent.run_dir / "criu" / f"{context['stage']}-{int(time.time() * 1000)}"
        logs.mkdir(parents=True, exist_ok=True)
        images = root / bundles.IMAGES
        with stage_checkpoint.restore_group(agent, context) as group:
            charge = stage_checkpoint.charge_files(group)  # born in its group: see there
            if lazy_source is not None:
                daemon = transfer.LazyDestination(images, lazy_source, log_dir=logs).start()
                self.lazy_daemons[key] = daemon
                result = daemon.restore(restore_sibling=True, cgroup_procs=charge)
            else:
                result = criu_rpc.restore(images, restore_sibling=True, log_dir=logs,
                                          cgroup_procs=charge)  # fmt: skip
        stage_checkpoint.adopt(agent, context, result.pid, group)
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


def _stage_of(manifest: object) -> object:
    return manifest.get("stage") if isinstance(manifest, dict) else manifest


def _check_context(context: object, state: State, key: str, migration: str) -> None:
    """The received context is a migrated stage's, of stage ``key``, and the received state
    is the one it names (version and digest)."""
    what = f"migration {migration}: {bundles.RINGS}"
    if not isinstance(context, dict) or any(k not in context for k in _CONTEXT_KEYS):
        raise BundleError(f"{what} is not a migrated stage's context (it needs {_CONTEXT_KEYS})")
    if f"{context['app']}/{context['stage']}" != key:
        raise BundleError(f"{what} is of stage {context['app']}/{context['stage']}, not {key}")
    positions = context["positions"]
    if not (isinstance(positions, dict) and isinstance(positions.get("inputs"), dict)
            and isinstance(positions.get("outputs"), dict)):  # fmt: skip
        raise BundleError(f"{what} holds no input and output positions")
    if (state.version, state.digest()) != (context["state_version"], context["state_digest"]):
        raise BundleError(
            f"migration {migration}: {bundles.STATE} holds state version {state.version} "
            f"(digest {state.digest()}), the context says {context['state_version']} "
            f"({context['state_digest']})"
        )
