"""The node agent's core — one per node, in the foreground, logs as JSON lines; run by the
agent program, :mod:`dpmigrate.agentd` (`dpmigrate agent`).

It starts, watches and stops the stages of its node (through a :class:`Supervisor`), hosts the
ring-endpoint registry that ring ends use to find their peers, and reports status. It listens
on:

* the abstract unix socket ``@dpmigrate-agent`` — per network namespace, so a stage reaches
  the agent of whatever node it runs on without being told an address (also after a move);
* a unix socket file (``--socket``), for the CLI in the host's namespace;
* optionally TCP (``--listen HOST:PORT``), for the agents of other nodes.

Registrations are pushed to every peer agent (``--peers``), so a lookup is answered locally.
Every connection must authenticate with the cluster token (DPMIGRATE_TOKEN, see
:mod:`dpmigrate.runtime.control`). SIGTERM stops the node's stages (each finishes its batch)
and the agent exits 0.

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
import queue
import socket
import threading
import time
from pathlib import Path
from typing import Any

from dpmigrate.errors import DpmigrateError, ProtocolError
from dpmigrate.runtime import control, stagehost
from dpmigrate.runtime.operations import AbsPath, Name, NoArgs, OperationTable, Request
from dpmigrate.runtime.supervisor import Supervisor
from dpmigrate.transports.resolver import Endpoint

ABSTRACT_NAME = "@dpmigrate-agent"
#: The models whose stages an agent runs (the in-process model has no agent).
AGENT_MODELS = ("multi-process", "multi-node")
_MAX_LOOKUP_WAIT_S = 30.0
_MAX_CONNECTIONS = 64
_PUSH_ATTEMPTS = 10


def log(event: str, **fields: Any) -> None:
    """One JSON line on stdout: the agent's event stream."""
    print(json.dumps({"t": round(time.time(), 3), "event": event, **fields}), flush=True)


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
class Lookup(Request):
    ring: Name
    timeout: float  # seconds to wait for a registration, at most _MAX_LOOKUP_WAIT_S


@dataclasses.dataclass(frozen=True)
class StartStage(StageRef):
    manifest: AbsPath
    run_dir: AbsPath
    model: str  # one of AGENT_MODELS


class Agent:
    """One node's agent core: supervisor, registry, listeners and the operation table."""

    def __init__(
        self, node: str, token: str, run_dir: Path, peers: list[str], address: str = "127.0.0.1"
    ) -> None:
        self.node = node
        self.address = address  # where this node's stages listen for tcp rings
        self.token = token
        self.run_dir = run_dir
        self.peers = peers
        self.registry: dict[str, dict[str, Any]] = {}
        self.changed = threading.Condition()
        self.supervisor = Supervisor(
            run_dir / "logs" / node, on_event=lambda m: log("stage", message=m)
        )
        self.stage_args: dict[str, tuple[str, str, str]] = {}  # stage -> manifest, run dir, model
        self.stopping = threading.Event()
        self.listeners: list[socket.socket] = []
        self._connections = threading.BoundedSemaphore(_MAX_CONNECTIONS)
        self.lock = threading.Lock()
        self._outboxes: dict[str, queue.Queue[tuple[str, dict[str, Any]]]] = {}
        #: What this agent serves; services register theirs here before it starts listening.
        self.operations = OperationTable(log)
        self._register_operations()

    def _register_operations(self) -> None:
        """The core's operations: the one place that says what of this class is remote."""
        ops = self.operations
        ops.register("ping", NoArgs, self._ping)
        ops.register("status", NoArgs, self._status)
        ops.register("shutdown", NoArgs, self._shutdown_soon)
        # the ring-endpoint registry; peer_* are the pushes between agents
        ops.register("register", RegisterRing, self._register_ring)
        ops.register("unregister", RingRef, self._unregister_ring)
        ops.register("peer_register", RegisterRing, self._store)
        ops.register("peer_unregister", RingRef, self._forget)
        ops.register("lookup", Lookup, self._lookup)
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
        log("listening", address=address)

    def _accept_loop(self, sock: socket.socket, address: str) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            if not self._connections.acquire(blocking=False):
                conn.close()
                log("refused", reason="too many connections", listener=address)
                continue
            threading.Thread(target=self._serve, args=(conn, address), daemon=True).start()

    def _serve(self, conn: socket.socket, address: str) -> None:
        try:
            conn.settimeout(60)
            control.server_handshake(conn, self.token, self.node)
            conn.settimeout(None)
            while not self.stopping.is_set():
                try:
                    request = control.recv_frame(conn)
                except ProtocolError as err:
                    control.send_frame(conn, {"v": control.VERSION, "ok": False, "error": str(err)})
                    log("bad request", listener=address, error=str(err))
                    return  # the stream may be out of step: hang up
                reply = self.operations.dispatch(request.get("op"), request.get("args", {}))
                self._send_reply(conn, {"v": control.VERSION, "id": request.get("id"), **reply})
        except control.AuthError:
            log("refused", reason="authentication failed", listener=address)
        except ProtocolError as err:
            log("refused", reason=str(err), listener=address)
            with contextlib.suppress(OSError):
                control.send_frame(conn, {"v": control.VERSION, "ok": False, "error": str(err)})
        except (OSError, ConnectionError):
            pass
        finally:
            conn.close()
            self._connections.release()

    def _send_reply(self, conn: socket.socket, reply: dict[str, Any]) -> None:
        """Send a reply; one that cannot be encoded (a handler's bug: not JSON, too large)
        becomes an error reply, so the client is answered and the connection stays usable."""
        try:
            control.send_frame(conn, reply)
        except (TypeError, ValueError, ProtocolError) as err:  # raised before anything is sent
            error = f"internal error: the reply cannot be sent: {err}"
            log("internal error", id=reply.get("id"), error=error)
            control.send_frame(
                conn, {"v": control.VERSION, "id": reply.get("id"), "ok": False, "error": error}
            )

    # -- operations: the handlers registered above --------------------------------------
    def _ping(self, _: NoArgs) -> dict[str, Any]:
        return {"node": self.node, "pid": os.getpid(), "address": self.address}

    def _register_ring(self, req: RegisterRing) -> None:
        self._store(req)
        self._push("peer_register", {"ring": req.ring, "endpoint": req.endpoint})

    def _store(self, req: RegisterRing) -> None:
        ep = Endpoint.from_dict(req.endpoint)
        with self.changed:
            old = self.registry.get(req.ring)
            if old is not None and old["generation"] > ep.generation:
                return  # a stale forward arriving late
            self.registry[req.ring] = ep.as_dict()
            self.changed.notify_all()
        log("registered", ring=req.ring, endpoint=ep.as_dict())

    def _push(self, op: str, args: dict[str, Any]) -> None:
        """Queue a registry change for every peer; one sender per peer keeps the order."""
        for peer in self.peers:
            with self.lock:
                box = self._outboxes.get(peer)
                if box is None:
                    box = self._outboxes[peer] = queue.Queue()
                    threading.Thread(target=self._forward, args=(peer, box), daemon=True).start()
            box.put((op, args))

    def _forward(self, peer: str, box: queue.Queue[tuple[str, dict[str, Any]]]) -> None:
        client: control.AgentClient | None = None
        while not self.stopping.is_set():
            try:
                op, args = box.get(timeout=0.5)
            except queue.Empty:
                continue
            for attempt in range(_PUSH_ATTEMPTS):  # a peer may still be starting
                try:
                    if client is None:
                        client = control.AgentClient(peer, self.token, timeout=10)
                    client.call(op, **args)
                    break
                except DpmigrateError as err:
                    if client is not None:
                        client.close()
                        client = None
                    if attempt == _PUSH_ATTEMPTS - 1:
                        log("push failed", peer=peer, op=op, ring=args.get("ring"), error=str(err))
                    else:
                        self.stopping.wait(0.2 * (attempt + 1))

    def _unregister_ring(self, req: RingRef) -> None:
        self._forget(req)
        self._push("peer_unregister", {"ring": req.ring})

    def _forget(self, req: RingRef) -> None:
        with self.changed:
            self.registry.pop(req.ring, None)
            self.changed.notify_all()

    def _lookup(self, req: Lookup) -> dict[str, Any] | None:
        deadline = time.monotonic() + min(max(0.0, req.timeout), _MAX_LOOKUP_WAIT_S)
        with self.changed:
            while req.ring not in self.registry:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.changed.wait(remaining)
            return self.registry[req.ring]

    def _start_stage(self, req: StartStage) -> dict[str, Any]:
        if req.model not in AGENT_MODELS:
            raise ProtocolError(
                f"model {req.model!r} cannot run in an agent; use one of {', '.join(AGENT_MODELS)}"
            )
        key = req.key
        with self.lock:
            existing = self.supervisor.stages.get(key)
            if existing is not None and not existing.finished:
                raise ProtocolError(f"stage {key!r} already runs on node {self.node}")
            proc = self.supervisor.start(
                key, stagehost.command(req.manifest, req.stage, req.run_dir, req.model, "agent")
            )
            self.stage_args[key] = (req.manifest, req.run_dir, req.model)
        pid = proc.proc.pid if proc.proc else None
        log("stage start", stage=key, pid=pid)
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
        """Drop an app's finished stages from the status (after `dpmigrate stop`)."""
        with self.lock:
            for key in [k for k in self.supervisor.stages if k.startswith(req.app + "/")]:
                if self.supervisor.stages[key].finished:
                    del self.supervisor.stages[key]
                    self.stage_args.pop(key, None)

    def _status(self, _: NoArgs) -> dict[str, Any]:
        stages = []
        for key, proc in list(self.supervisor.stages.items()):
            app, _, name = key.partition("/")
            info: dict[str, Any] = {"app": app, "name": name, "node": self.node}
            manifest, run_dir, _model = self.stage_args[key]
            info.update(stagehost.read_status(run_dir, name))
            info.update(pid=proc.stage_pid, restarts=proc.restarts, finished=proc.finished,
                        moved=proc.moved, run_dir=run_dir, manifest=manifest,
                        failed=proc.failed, log=str(proc.log))  # fmt: skip
            stages.append(info)
        with self.changed:
            rings = dict(self.registry)
        return {"node": self.node, "pid": os.getpid(), "stages": stages, "registry": rings}

    def _shutdown_soon(self, _: NoArgs) -> None:
        """Answer first, then stop (the reply must not wait for the stages to finish)."""
        threading.Thread(target=self.shutdown, daemon=True).start()

    # -- lifecycle ----------------------------------------------------------------------
    def run(self) -> None:
        while not self.stopping.is_set():
            with self.lock:
                self.supervisor.poll()
            self.stopping.wait(0.2)

    def shutdown(self) -> None:
        if self.stopping.is_set():
            return
        log("stopping", stages=len(self.supervisor.stages))
        with self.lock:
            self.supervisor.stop()
        self.stopping.set()
        for sock in self.listeners:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
