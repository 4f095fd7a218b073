"""The node agent's core — one per node, in the foreground, logs as JSON lines; run by the
agent program, :mod:`dpmigrate.agentd` (`dpmigrate agent`).

It starts, watches and stops the stages of its node (through a :class:`Supervisor`), hosts the
ring-endpoint registry that ring ends use to find their peers, and reports status. It listens
on:

* the abstract unix socket ``@dpmigrate-agent`` — per network namespace, so a stage reaches
  the agent of whatever node it runs on without being told an address (also after a move);
* a unix socket file (``--socket``), for the CLI in the host's namespace;
* optionally TCP (``--listen HOST:PORT``), for the agents of other nodes.

The ring registry and the placements live in the cluster store (etcd, DESIGN.md §7); the
agent keeps its node's lease there and local copies that watches keep current
(:class:`~dpmigrate.runtime.node_store.NodeStore`), so a lookup is answered locally, at once.
Every connection must authenticate mutually — with the cluster token (DPMIGRATE_TOKEN), or a
stage with its own key, which opens only :mod:`~dpmigrate.runtime.stage_access`'s operations
— and every frame after that carries a MAC (:mod:`dpmigrate.runtime.control`); strangers get
only the few pending slots of :mod:`~dpmigrate.runtime.admission`.

SIGTERM stops the node's stages (each finishes its batch) and the agent exits 0.

A stage whose manifest gives it ``resources`` runs in a control group of its own,
``<run>.<node>.<app>.<stage>`` (:mod:`dpmigrate.runtime.cgroups`), recorded in the node's
folder (``cgroups.json``, which ``cluster down`` and ``clean`` read too). The agent reads the
limits from the manifest's TOML (never importing the app's code) whenever the stage is
started, restarted, re-adopted or restored here, so every path — a migration's restore, a
statesync replica's start_stage — applies the same limits before the stage runs.

It serves only what is registered in its :class:`~dpmigrate.runtime.operations.OperationTable`
(``Agent.operations``): its own operations, listed in :meth:`Agent._register_operations`, and
those of the services the agent program wires in (:mod:`dpmigrate.agentd`: checkpoint and
migration, from :mod:`dpmigrate.migrate.agent_service`). The runtime imports none of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from dpmigrate import atomic
from dpmigrate.errors import DpmigrateError, ProtocolError
from dpmigrate.eventlog import EventLog
from dpmigrate.runtime import cgroups, control, stage_access, stagehost
from dpmigrate.runtime.admission import LOCAL_BUDGET, TCP_BUDGET, Admission
from dpmigrate.runtime.manifest import stage_resources
from dpmigrate.runtime.node_store import NodeStore
from dpmigrate.runtime.operations import AbsPath, Name, NoArgs, OperationTable, Request
from dpmigrate.runtime.registry import STAGE_KEY_ENV
from dpmigrate.runtime.supervisor import Supervisor, process_resident_bytes, process_start_time
from dpmigrate.transports.resolver import NAME_RE, Endpoint

if TYPE_CHECKING:
    from dpmigrate.cluster import pki

ABSTRACT_NAME = "@dpmigrate-agent"
#: In the node's folder: the stages this agent runs, for the agent that follows it.
STAGE_TABLE = "agent-stages.json"
#: The models whose stages an agent runs (the in-process model has no agent).
AGENT_MODELS = ("multi-process", "multi-node")
_MAX_LOOKUP_WAIT_S = 30.0
_SHUTDOWN_WAIT_S = 30.0
_MAX_PEM = 64 << 10  # characters of one PEM file handed to a stage


class AgentService(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


# -- the core's request records ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StageRef(Request):
    """One stage of one app; services extend it with their own fields."""

    app: Name
    stage: Name

    @property
    def key(self) -> str:
        """The stage's key in the supervisor and the status: ``APP/STAGE``."""
        return f"{self.app}/{self.stage}"


@dataclasses.dataclass(frozen=True)
class AppRef(Request):
    app: Name


@dataclasses.dataclass(frozen=True)
class RingRef(Request):
    ring: Name


@dataclasses.dataclass(frozen=True)
class RegisterRing(Request):
    ring: Name
    endpoint: dict[str, Any]  # checked by Endpoint.from_dict


@dataclasses.dataclass(frozen=True)
class UnregisterRing(Request):
    ring: Name
    endpoint: dict[str, Any] | None = None  # withdraw only this registration


@dataclasses.dataclass(frozen=True)
class Lookup(Request):
    ring: Name
    timeout: float  # seconds to wait for a registration, at most _MAX_LOOKUP_WAIT_S
    newer_than: int = -1  # wait for a generation above this one (the end's last known)


@dataclasses.dataclass(frozen=True)
class StartStage(StageRef):
    manifest: AbsPath
    run_dir: AbsPath
    model: str  # one of AGENT_MODELS
    role: str = "primary"  # or a replica: one of stagehost.ROLES


class Agent:
    """One node's agent core: supervisor, registry, listeners and the operation table."""

    def __init__(
        self,
        node: str,
        token: str,
        run_dir: Path,
        address: str = "127.0.0.1",
        store: NodeStore | None = None,
        log: EventLog | None = None,
    ) -> None:
        self.node = node
        #: the agent's event stream (JSON lines on stdout; the agent program sets its level)
        self.log = log or EventLog()
        self.address = address  # where this node's stages listen for tcp rings
        self.token = token
        #: the rings' TLS files when the cluster runs its tcp rings over TLS (agentd sets it)
        self.ring_tls: pki.TlsFiles | None = None
        #: this node's own folder: stage runs, logs, migrations (nothing of other nodes)
        self.run_dir = run_dir
        self.store = store or NodeStore(None, node, {}, 0, self.log)
        #: the stages' control groups, recorded in the node's own folder
        self.groups = cgroups.StageGroups(run_dir / cgroups.RECORD)
        self.supervisor = Supervisor(
            run_dir / "logs",
            on_event=lambda m: self.log("stage", message=m),
            on_problem=lambda m: self.log("stage", level="warning", message=m),
            stage_env=self._stage_env,
            groups=self.groups,
            group_for=self._group_for,
        )
        self.stage_args: dict[str, tuple[str, str, str]] = {}  # stage -> manifest, run dir, model
        #: stage -> "primary", or the replica role it was started in (until it takes over)
        self.roles: dict[str, str] = {}
        self.stopping = threading.Event()
        #: set once shutdown has stopped everything (run() returns only then)
        self.stopped = threading.Event()
        self.listeners: list[socket.socket] = []
        #: listener address -> its connection budgets (see :mod:`.admission`)
        self.admissions: dict[str, Admission] = {}
        self.lock = threading.Lock()
        self._saved_table: dict[str, dict[str, Any]] = {}  # the stage table last written
        #: What this agent serves; services register theirs here before it starts listening.
        self.operations = OperationTable(self.log)
        #: Services with a life of their own (a watcher thread): started once the agent
        #: joined the store, stopped when it shuts down.
        self.services: list[AgentService] = []
        self._register_operations()

    def _register_operations(self) -> None:
        """The core's operations: the one place that says what of this class is remote."""
        ops = self.operations
        ops.register("ping", NoArgs, self._ping)
        ops.register("status", NoArgs, self._status)
        ops.register("shutdown", NoArgs, self._shutdown_soon)
        # the ring-endpoint registry and placements (kept in the cluster store)
        ops.register("register", RegisterRing, self._register_ring)
        ops.register("unregister", UnregisterRing, self._unregister_ring)
        ops.register("lookup", Lookup, self._lookup)
        ops.register("placement", AppRef, self._placement)
        ops.register("ring_key", RingRef, self._ring_key)
        ops.register("ring_tls", NoArgs, self._ring_tls)
        # stages
        ops.register("start_stage", StartStage, self._start_stage)
        ops.register("stop_stage", StageRef, self._stop_stage)
        ops.register("stop_app", AppRef, self._stop_app)
        ops.register("forget_app", AppRef, self._forget_app)

    # -- serving ------------------------------------------------------------------------
    def listen(self, address: str) -> None:
        if address.startswith("@") or address.startswith("/"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            if address.startswith("/"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(address)
                sock.bind(address)
                os.chmod(address, 0o600)
            else:
                sock.bind("\0" + address[1:])
        else:
            host, _, port = address.rpartition(":")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, int(port)))
        sock.listen(32)
        self.listeners.append(sock)
        threading.Thread(target=self._accept_loop, args=(sock, address), daemon=True).start()
        self.log("listening", address=address)

    def _accept_loop(self, sock: socket.socket, address: str) -> None:
        tcp = sock.family == socket.AF_INET
        admission = Admission(TCP_BUDGET if tcp else LOCAL_BUDGET, self.log, address)
        self.admissions[address] = admission
        while not self.stopping.is_set():
            try:
                conn, peer = sock.accept()
            except OSError:
                return
            source = str(peer[0]) if tcp else "local"
            if not admission.admit(source):
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn, admission, source),
                             daemon=True).start()  # fmt: skip

    def _group_for(self, key: str, argv: Sequence[str]) -> cgroups.Group | None:
        """The control group of stage ``key`` as its manifest's ``resources`` say (None
        when it has none), made or taken over (same name) before the stage runs. ``argv``
        is the stage host's (:func:`stagehost.command`), which names manifest and run. A
        run's own overrides (``run --resources``) come from the store's ``apps/<app>``
        record, so every node that starts, restarts or adopts the stage applies the same."""
        manifest, run_dir = _flag(argv, "--manifest"), _flag(argv, "--run-dir")
        if manifest is None or run_dir is None:
            return None
        app, _, stage = key.partition("/")
        limits = stage_resources(manifest, stage)
        override = self.store.resource_overrides(app, Path(run_dir).name).get(stage)
        if override is not None:  # the run's --resources: already merged and validated
            limits = cgroups.limits_from_dict(override)
        if limits.empty:
            return None
        name = cgroups.group_name(f"{Path(run_dir).name}.{self.node}", key)
        group = self.groups.create(name, limits)
        level = "warning" if group.unsupported else "info"
        self.log("stage group", level=level, stage=key, group=name, applied=group.applied,
                 not_applied=group.unsupported)  # fmt: skip
        return group

    def _stage_env(self, key: str) -> dict[str, str]:
        """A stage's own key in its environment instead of the token (see stage_access)."""
        app, _, stage = key.partition("/")
        return {STAGE_KEY_ENV: control.stage_key(self.token, app, stage).hex()}

    def _credential_key(self, principal: str) -> bytes | None:
        """The key that proves ``principal``: the token, or a stage's key derived from it."""
        if principal == control.CLUSTER:
            return self.token.encode()
        stage = control.stage_of(principal)
        return None if stage is None else control.stage_key(self.token, *stage)

    def _serve(self, conn: socket.socket, admission: Admission, source: str) -> None:
        promoted = False
        try:
            conn.settimeout(control.HANDSHAKE_TIMEOUT_S)
            session = control.server_handshake(conn, self._credential_key, self.node)
            if not admission.promote(source):
                session.send({"v": control.VERSION, "ok": False,
                              "error": f"agent {self.node} has too many connections; retry"})
                return  # fmt: skip
            promoted = True
            conn.settimeout(None)
            while not self.stopping.is_set():
                try:
                    request = session.recv()
                except ProtocolError as err:
                    session.send({"v": control.VERSION, "ok": False, "error": str(err)})
                    self.log("bad request", level="warning", principal=session.principal,
                             error=str(err))  # fmt: skip
                    return  # the stream may be out of step: hang up
                reply = self._dispatch(session, request)
                self._send_reply(session, {"v": control.VERSION, "id": request.get("id"),
                                           **reply})  # fmt: skip
        except control.AuthError:
            admission.refused("authentication failed")
        except ProtocolError:
            admission.refused("malformed handshake")
        except (OSError, ConnectionError):
            pass
        finally:
            conn.close()
            admission.release(source, promoted)

    def _dispatch(self, session: control.Session, request: dict[str, Any]) -> dict[str, Any]:
        op, args = request.get("op"), request.get("args", {})
        if session.stage is not None:
            try:
                stage_access.check(*session.stage, op, args)
            except ProtocolError as err:
                self.log("stage request refused", level="warning", principal=session.principal,
                         op=str(op)[:64], error=str(err))  # fmt: skip
                return {"ok": False, "error": str(err)}
        return self.operations.dispatch(op, args)

    def _send_reply(self, session: control.Session, reply: dict[str, Any]) -> None:
        """Send a reply; one that cannot be encoded (a handler's bug: not JSON, too large)
        becomes an error reply, so the client is answered and the connection stays usable."""
        try:
            session.send(reply)
        except (TypeError, ValueError, ProtocolError) as err:  # raised before anything is sent
            error = f"internal error: the reply cannot be sent: {err}"
            self.log("internal error", level="error", id=reply.get("id"), error=error)
            session.send({"v": control.VERSION, "id": reply.get("id"), "ok": False,
                          "error": error})  # fmt: skip

    # -- operations: the handlers registered above --------------------------------------
    def _ping(self, _: NoArgs) -> dict[str, Any]:
        return {"node": self.node, "pid": os.getpid(), "address": self.address}

    def _register_ring(self, req: RegisterRing) -> None:
        ep = Endpoint.from_dict(req.endpoint)
        owner = ep.owner
        if owner:
            app, _, stage = owner.partition("/")
            placed, _fresh = self.store.placement(app)
            current = placed.get(stage)
            if current is not None and (current.node != self.node or ep.epoch < current.epoch):
                raise ProtocolError(
                    f"ring {req.ring!r}: refused the registration of {owner} epoch {ep.epoch} "
                    f"on {self.node}: the stage is placed on {current.node} with epoch "
                    f"{current.epoch} (a stale copy)"
                )
        self.store.register(req.ring, ep.as_dict())
        self.log("registered", level="debug", ring=req.ring, endpoint=ep.as_dict())

    def _unregister_ring(self, req: UnregisterRing) -> None:
        endpoint = Endpoint.from_dict(req.endpoint).as_dict() if req.endpoint else None
        self.store.unregister(req.ring, endpoint)

    def _lookup(self, req: Lookup) -> dict[str, Any] | None:
        wait = min(max(0.0, req.timeout), _MAX_LOOKUP_WAIT_S)
        return self.store.lookup(req.ring, wait, req.newer_than)

    def _ring_key(self, req: RingRef) -> dict[str, str]:
        """The credential of one ring, for its two ends (a stage asks for its own app's)."""
        return {"key": control.ring_key(self.token, req.ring).hex()}

    def _ring_tls(self, _: NoArgs) -> dict[str, str]:
        """The rings' TLS files (CA, certificate, key) as PEM, for a stage of this node when
        the cluster runs its rings over TLS (ring_tls)."""
        files = self.ring_tls
        if files is None:
            raise DpmigrateError(
                f"ring TLS is off on node {self.node}: its agent was started without "
                "DPMIGRATE_RING_TLS=1 (set it for `dpmigrate cluster up`)"
            )
        named = (("ca", files.ca), ("cert", files.cert), ("key", files.key))
        try:
            return {name: Path(path).read_text()[:_MAX_PEM] for name, path in named}
        except OSError as err:
            raise DpmigrateError(
                f"node {self.node}: cannot read the rings' TLS files: {err}"
            ) from err

    def _placement(self, req: AppRef) -> dict[str, Any]:
        """Where the app's stages are and their epochs (fresh from etcd when it answers)."""
        placed, fresh = self.store.placement(req.app)
        return {"stages": {name: p.as_dict() for name, p in placed.items()}, "fresh": fresh}

    def _start_stage(self, req: StartStage) -> dict[str, Any]:
        if req.model not in AGENT_MODELS:
            raise ProtocolError(
                f"model {req.model!r} cannot run in an agent; use one of {', '.join(AGENT_MODELS)}"
            )
        key = req.key
        if req.role != "primary" and req.role not in stagehost.ROLES:
            raise ProtocolError(
                f"role {req.role!r} is not a stage role; use primary, {', '.join(stagehost.ROLES)}"
            )
        if Path(req.run_dir).parent != self.run_dir / "runs":
            raise ProtocolError(
                f"run_dir {req.run_dir!r} is not a run folder of node {self.node} "
                f"({self.run_dir / 'runs'}/RUN)"
            )
        with self.lock:
            existing = self.supervisor.stages.get(key)
            if existing is not None and not existing.finished:
                raise ProtocolError(f"stage {key!r} already runs on node {self.node}")
            proc = self.supervisor.start(
                key,
                stagehost.command(
                    req.manifest, req.stage, req.run_dir, req.model, "agent", req.role
                ),
            )
            self.stage_args[key] = (req.manifest, req.run_dir, req.model)
            self.roles[key] = req.role
        pid = proc.proc.pid if proc.proc else None
        self.log("stage start", stage=key, pid=pid, role=req.role)
        return {"stage": key, "node": self.node, "pid": pid}

    def _stop_stage(self, req: StageRef) -> None:
        if req.key not in self.supervisor.stages:
            raise ProtocolError(f"no stage {req.key!r} on node {self.node}")
        self.supervisor.stop_one(req.key)

    def _stop_app(self, req: AppRef) -> list[str]:
        """Stop every stage of an app on this node (each finishes its batch)."""
        prefix = req.app + "/"
        keys = [k for k in self.supervisor.stages if k.startswith(prefix)]
        for key in keys:
            if not self.supervisor.stages[key].finished:
                self.supervisor.stop_one(key)
        return keys

    def _forget_app(self, req: AppRef) -> None:
        """Drop an app's finished stages from the status and remove their run folders on
        this node (after `dpmigrate stop`)."""
        folders = set()
        with self.lock:
            for key in [k for k in self.supervisor.stages if k.startswith(req.app + "/")]:
                if self.supervisor.stages[key].finished:
                    del self.supervisor.stages[key]
                    _manifest, run_dir, _model = self.stage_args.pop(key)
                    self.roles.pop(key, None)
                    folders.add(run_dir)
            in_use = {run_dir for _m, run_dir, _model in self.stage_args.values()}
        for folder in sorted(folders - in_use):
            if Path(folder).parent == self.run_dir / "runs":  # only ours, never a given path
                shutil.rmtree(folder, ignore_errors=True)
                self.log("run folder removed", folder=folder)

    def _status(self, _: NoArgs) -> dict[str, Any]:
        stages = []
        for key, proc in list(self.supervisor.stages.items()):
            app, _, name = key.partition("/")
            info: dict[str, Any] = {"app": app, "name": name, "node": self.node}
            manifest, run_dir, _model = self.stage_args[key]
            info.update(stagehost.read_status(run_dir, name))
            info.update(role=self.roles.get(key, "primary"), rss_bytes=_rss(proc.stage_pid))
            info.update(pid=proc.stage_pid, restarts=proc.restarts, finished=proc.finished,
                        moved=proc.moved, fenced=proc.fenced, run_dir=run_dir, manifest=manifest,
                        failed=proc.failed, log=str(proc.log),
                        resources=proc.resources())  # fmt: skip
            stages.append(info)
        with self.store.changed:
            rings = dict(self.store.rings)
        return {"node": self.node, "pid": os.getpid(), "stages": stages, "registry": rings,
                "store": self.store.health()}  # fmt: skip

    def took_over(self, key: str) -> None:
        """A replica of ``key`` took over: from now on it is the primary, and a crash of it
        restarts it as one, from its journal."""
        with self.lock:
            self.roles[key] = "primary"
            proc = self.supervisor.stages.get(key)
            if proc is not None and key in self.stage_args:
                manifest, run_dir, model = self.stage_args[key]
                proc.argv = stagehost.command(manifest, key.partition("/")[2], run_dir, model,
                                              "agent")  # fmt: skip

    def _shutdown_soon(self, _: NoArgs) -> None:
        """Answer first, then stop (the reply must not wait for the stages to finish)."""
        threading.Thread(target=self.shutdown, daemon=True).start()

    # -- lifecycle ----------------------------------------------------------------------
    def run(self) -> None:
        while not self.stopping.is_set():
            with self.lock:
                self.supervisor.poll()
                self._save_stage_table()
            self.stopping.wait(0.2)
        # the shutdown thread still stops the services and the store: "agent stopped" is
        # the last word only once they are (bounded: a stuck service does not hang exit)
        self.stopped.wait(_SHUTDOWN_WAIT_S)

    # -- surviving the agent's own death --------------------------------------------------
    @property
    def stage_table_path(self) -> Path:
        return self.run_dir / STAGE_TABLE

    def _stage_table(self) -> dict[str, dict[str, Any]]:
        table = {}
        for key, proc in self.supervisor.stages.items():
            pid = proc.stage_pid
            start = process_start_time(pid) if pid is not None else None
            if proc.finished or pid is None or start is None or key not in self.stage_args:
                continue
            manifest, run_dir, model = self.stage_args[key]
            table[key] = {"pid": pid, "start_time": start, "manifest": manifest,
                          "run_dir": run_dir, "model": model,
                          "role": self.roles.get(key, "primary")}  # fmt: skip
        return table

    def _save_stage_table(self) -> None:
        """What runs here, in the node's own folder: a restarted agent takes these over."""
        table = self._stage_table()
        if table != self._saved_table:
            atomic.write_json(self.stage_table_path, table)
            self._saved_table = table

    def readopt(self) -> list[str]:
        """Take over the stages an earlier agent of this node left running (it died): each
        one named in its table whose PID still has the recorded start time. One that died
        meanwhile while it was working is started again from its journal (it checks its
        placement first, so a copy that moved on meanwhile is fenced, not duplicated). Their
        journals and run folders are here; a later crash restarts one as usual."""
        try:
            table = json.loads(self.stage_table_path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as err:
            self.log("stage table unreadable", level="warning", error=str(err))
            return []
        taken = []
        for key, entry in table.items() if isinstance(table, dict) else []:
            try:
                app, _, stage = str(key).partition("/")
                pid, start = int(entry["pid"]), int(entry["start_time"])
                manifest, run_dir, model = (str(entry[k]) for k in ("manifest", "run_dir", "model"))
                role = str(entry.get("role", "primary"))
            except (KeyError, TypeError, ValueError, AttributeError):
                self.log("stage table entry refused", level="warning", key=str(key))
                continue
            if (
                not (NAME_RE.fullmatch(app) and NAME_RE.fullmatch(stage))
                or Path(run_dir).parent != self.run_dir / "runs"
                or model not in AGENT_MODELS
                or (role != "primary" and role not in stagehost.ROLES)
            ):
                self.log("stage table entry refused", level="warning", key=str(key))
                continue
            argv = stagehost.command(manifest, stage, run_dir, model, "agent", role)
            if process_start_time(pid) != start:  # it ended while no agent watched it
                if not _died_working(run_dir, stage):
                    continue  # finished, stopped or fenced: nothing to bring back
                self.supervisor.start(key, argv)
                self.log("stage restarted from its journal", level="warning", stage=key,
                         reason="it died while no agent watched it")  # fmt: skip
            else:
                self.supervisor.adopt_orphan(key, pid, start, argv,
                                             stagehost.status_path(run_dir, stage))  # fmt: skip
            self.stage_args[key] = (manifest, run_dir, model)
            self.roles[key] = role
            taken.append(key)
        self.log("stages re-adopted", stages=taken)
        self._saved_table = self._stage_table()
        return taken

    def shutdown(self) -> None:
        if self.stopping.is_set():
            return
        self.log("stopping", stages=len(self.supervisor.stages))
        with self.lock:
            self.supervisor.stop()
            try:  # what the supervisor could not remove, and the parents it made
                self.groups.remove_all()
            except DpmigrateError as err:
                self.log("control groups left", level="warning", error=str(err))
        self.stopping.set()
        for service in self.services:
            service.stop()
        self.store.stop()
        for sock in self.listeners:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.stopped.set()


#: The last phases of a stage (or replica) that was working when its process died.
_WORKING_PHASES = frozenset({"starting", "running", "quiesced", "standby", "target"})


def _died_working(run_dir: str, stage: str) -> bool:
    """Whether a stage whose process is gone was working (then it crashed or was killed)
    rather than done: its status file's last phase says which; no status at all means it
    died before saying anything."""
    status = stagehost.read_status(run_dir, stage)
    phase = status.get("phase") if isinstance(status, dict) else None
    return phase is None or phase in _WORKING_PHASES


def _flag(argv: Sequence[str], flag: str) -> str | None:
    """The value after ``flag`` in ``argv`` (None if absent)."""
    args = list(argv)
    return args[args.index(flag) + 1] if flag in args[:-1] else None


def _rss(pid: int | None) -> int | None:
    """The resident memory of a stage process (what a CRIU dump of it moves), or None."""
    return None if pid is None else process_resident_bytes(pid)
