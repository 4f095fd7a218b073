"""The node agent: `dpmigrate agent` — one per node, in the foreground, logs as JSON lines.

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
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from dpmigrate import config
from dpmigrate.errors import DpmigrateError, ProtocolError
from dpmigrate.runtime import control, stage_checkpoint, stage_transfer, stagehost
from dpmigrate.runtime.supervisor import Supervisor

ABSTRACT_NAME = "@dpmigrate-agent"
_MAX_LOOKUP_WAIT_S = 30.0
_MAX_CONNECTIONS = 64
_PUSH_ATTEMPTS = 10


def _abs(path: str) -> str:
    if not path.startswith("/"):
        raise ProtocolError(f"path {path!r} must be absolute")
    return path


def log(event: str, **fields: Any) -> None:
    """One JSON line on stdout: the agent's event stream."""
    print(json.dumps({"t": round(time.time(), 3), "event": event, **fields}), flush=True)


class Agent:
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
        self.transfers: dict[str, Any] = {}  # migrations in flight: page servers, lazy sources
        self.lazy_daemons: dict[str, Any] = {}
        self.stage_args: dict[str, tuple[str, str, str]] = {}  # stage -> manifest, run dir, model
        self.stopping = threading.Event()
        self.listeners: list[socket.socket] = []
        self._connections = threading.BoundedSemaphore(_MAX_CONNECTIONS)
        self.lock = threading.Lock()
        #: Every CRIU dump and restore runs on this one thread, which lives as long as the agent.
        self.criu_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="criu")
        self._outboxes: dict[str, queue.Queue[tuple[str, dict[str, Any]]]] = {}

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
                control.send_frame(conn, self._handle(request))
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

    def _handle(self, request: dict[str, Any]) -> dict[str, Any]:
        rid = request.get("id")
        reply: dict[str, Any] = {"v": control.VERSION, "id": rid}
        op = request.get("op")
        handler = (
            getattr(self, f"op_{op}", None) if isinstance(op, str) and op.isidentifier() else None
        )
        if handler is None:
            return {**reply, "ok": False, "error": f"unknown operation {op!r}"}
        try:
            result = handler(request.get("args", {}))
        except (ProtocolError, DpmigrateError, ValueError, KeyError) as err:
            return {**reply, "ok": False, "error": str(err)}
        except Exception as err:  # a bug must not take the agent (or the connection) down
            log("internal error", op=op, error=repr(err), traceback=traceback.format_exc())
            return {**reply, "ok": False, "error": f"internal error in {op}: {err!r}"}
        return {**reply, "ok": True, "result": result}

    # -- operations (each validates its arguments) --------------------------------------
    def op_ping(self, args: Any) -> dict[str, Any]:
        control.check_args(args, {})
        return {"node": self.node, "pid": os.getpid(), "address": self.address}

    def op_register(self, args: Any) -> None:
        a = control.check_args(args, {"ring": str, "endpoint": dict})
        self._store(a["ring"], a["endpoint"])
        self._push("peer_register", {"ring": a["ring"], "endpoint": a["endpoint"]})

    def op_peer_register(self, args: Any) -> None:
        a = control.check_args(args, {"ring": str, "endpoint": dict})
        self._store(a["ring"], a["endpoint"])

    def _store(self, ring: str, endpoint: dict[str, Any]) -> None:
        from dpmigrate.transports.resolver import Endpoint, check_ring_name

        check_ring_name(ring)
        ep = Endpoint.from_dict(endpoint)
        with self.changed:
            old = self.registry.get(ring)
            if old is not None and old["generation"] > ep.generation:
                return  # a stale forward arriving late
            self.registry[ring] = ep.as_dict()
            self.changed.notify_all()
        log("registered", ring=ring, endpoint=ep.as_dict())

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

    def op_unregister(self, args: Any) -> None:
        a = control.check_args(args, {"ring": str})
        self.op_peer_unregister(a)
        self._push("peer_unregister", {"ring": a["ring"]})

    def op_peer_unregister(self, args: Any) -> None:
        a = control.check_args(args, {"ring": str})
        with self.changed:
            self.registry.pop(a["ring"], None)
            self.changed.notify_all()

    def op_lookup(self, args: Any) -> dict[str, Any] | None:
        a = control.check_args(args, {"ring": str, "timeout": (int, float)})
        deadline = time.monotonic() + min(max(0.0, float(a["timeout"])), _MAX_LOOKUP_WAIT_S)
        with self.changed:
            while a["ring"] not in self.registry:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.changed.wait(remaining)
            return self.registry[a["ring"]]

    def op_start_stage(self, args: Any) -> dict[str, Any]:
        a = control.check_args(
            args, {"app": str, "manifest": str, "stage": str, "run_dir": str, "model": str}
        )
        if a["model"] not in ("multi-process", "multi-node"):
            raise ProtocolError(f"model {a['model']!r} cannot run in an agent")
        for key in ("manifest", "run_dir"):
            if not a[key].startswith("/"):
                raise ProtocolError(f"{key} must be an absolute path")
        key = f"{a['app']}/{a['stage']}"
        with self.lock:
            existing = self.supervisor.stages.get(key)
            if existing is not None and not existing.finished:
                raise ProtocolError(f"stage {key!r} already runs on node {self.node}")
            proc = self.supervisor.start(
                key, stagehost.command(a["manifest"], a["stage"], a["run_dir"], a["model"], "agent")
            )
            self.stage_args[key] = (a["manifest"], a["run_dir"], a["model"])
        pid = proc.proc.pid if proc.proc else None
        log("stage start", stage=key, pid=pid)
        return {"stage": key, "node": self.node, "pid": pid}

    def op_stop_stage(self, args: Any) -> None:
        a = control.check_args(args, {"app": str, "stage": str})
        key = f"{a['app']}/{a['stage']}"
        if key not in self.supervisor.stages:
            raise ProtocolError(f"no stage {key!r} on node {self.node}")
        self.supervisor.stop_one(key)

    def op_stop_app(self, args: Any) -> list[str]:
        """Stop every stage of an app on this node (each finishes its batch)."""
        a = control.check_args(args, {"app": str})
        prefix = a["app"] + "/"
        keys = [k for k, p in self.supervisor.stages.items() if k.startswith(prefix)]
        for key in keys:
            if not self.supervisor.stages[key].finished:
                self.supervisor.stop_one(key)
        return keys

    def op_forget_app(self, args: Any) -> None:
        """Drop an app's finished stages from the status (after `dpmigrate stop`)."""
        a = control.check_args(args, {"app": str})
        with self.lock:
            for key in [k for k in self.supervisor.stages if k.startswith(a["app"] + "/")]:
                if self.supervisor.stages[key].finished:
                    del self.supervisor.stages[key]
                    self.stage_args.pop(key, None)

    def op_checkpoint_stage(self, args: Any) -> dict[str, Any]:
        """Quiesce a stage and dump it with CRIU into a bundle (see stage_checkpoint)."""
        a = control.check_args(args, {"app": str, "stage": str, "out": str, "leave_running": bool})
        if not a["out"].startswith("/"):
            raise ProtocolError("out must be an absolute path")
        key = f"{a['app']}/{a['stage']}"
        log("checkpoint", stage=key, out=a["out"], leave_running=a["leave_running"])
        result = self.criu_thread.submit(
            stage_checkpoint.checkpoint_stage, self, key, a["out"], a["leave_running"]
        ).result()
        log("checkpointed", stage=key, frozen_time_us=result["criu"]["frozen_time"])
        return result

    def op_restore_stage(self, args: Any) -> dict[str, Any]:
        """Restore a stage bundle on this node, adopt it and (unless told not to) wake it."""
        a = control.check_args(args, {"bundle": str, "wake": bool})
        if not a["bundle"].startswith("/"):
            raise ProtocolError("bundle must be an absolute path")
        # On the long-lived CRIU thread: a restored process's parent is the thread that ran
        # criu, and the parent-death signal CRIU restores would fire when that thread ends.
        result = self.criu_thread.submit(
            stage_checkpoint.restore_stage, self, a["bundle"], wake_it=a["wake"]
        ).result()
        log("restored", stage=result["stage"], pid=result["pid"])
        return result

    def _key(self, args: Any) -> str:
        a = control.check_args(args, {"app": str, "stage": str})
        return f"{a['app']}/{a['stage']}"

    def op_quiesce_stage(self, args: Any) -> dict[str, Any]:
        return stage_checkpoint.quiesce_stage(self, self._key(args))

    def op_wake_stage(self, args: Any) -> dict[str, Any]:
        a = control.check_args(args, {"app": str, "stage": str, "timeout": (int, float)})
        key = f"{a['app']}/{a['stage']}"
        timeout = min(max(1.0, float(a["timeout"])), stage_checkpoint.PHASE_TIMEOUT_S)
        return stage_checkpoint.wake_stage(self, key, timeout)

    def op_restart_stage(self, args: Any) -> dict[str, Any]:
        key = self._key(args)
        log("restart", stage=key)
        return stage_checkpoint.restart_stage(self, key)

    def op_discard_stage(self, args: Any) -> None:
        key = self._key(args)
        log("discard", stage=key)
        stage_checkpoint.discard_stage(self, key)

    def op_dump_stage(self, args: Any) -> dict[str, Any]:
        """Dump an already quiesced stage, leaving it asleep (migration transfer phase)."""
        a = control.check_args(args, {"app": str, "stage": str, "out": str, "quiesced": dict})
        if not a["out"].startswith("/"):
            raise ProtocolError("out must be an absolute path")
        key = f"{a['app']}/{a['stage']}"
        return self.criu_thread.submit(
            stage_checkpoint.dump_stage, self, key, a["out"], True, a["quiesced"]
        ).result()

    # -- live-migration transfer (see stage_transfer) --------------------------------------
    def op_page_server(self, args: Any) -> dict[str, Any]:
        a = control.check_args(args, {"app": str, "stage": str, "images_dir": str})
        return stage_transfer.start_page_server(self, self._key_of(a), _abs(a["images_dir"]))

    def op_dump_to_page_server(self, args: Any) -> dict[str, Any]:
        a = control.check_args(args, {"app": str, "stage": str, "images_dir": str,
                                      "page_server": list, "quiesced": dict})  # fmt: skip
        return self.criu_thread.submit(
            stage_transfer.dump_to_page_server, self, self._key_of(a), _abs(a["images_dir"]),
            a["page_server"], a["quiesced"],
        ).result()  # fmt: skip

    def op_finish_page_server(self, args: Any) -> dict[str, Any]:
        a = control.check_args(args, {"app": str, "stage": str, "source_dir": str})
        return stage_transfer.finish_page_server(self, self._key_of(a), _abs(a["source_dir"]))

    def op_lazy_dump(self, args: Any) -> dict[str, Any]:
        a = control.check_args(
            args, {"app": str, "stage": str, "images_dir": str, "quiesced": dict}
        )
        return self.criu_thread.submit(
            stage_transfer.lazy_dump, self, self._key_of(a), _abs(a["images_dir"]), a["quiesced"]
        ).result()

    def op_lazy_finish(self, args: Any) -> dict[str, Any]:
        return stage_transfer.lazy_finish(self, self._key(args))

    def op_lazy_abort(self, args: Any) -> None:
        stage_transfer.lazy_abort(self, self._key(args))

    def op_lazy_destination_done(self, args: Any) -> None:
        stage_transfer.lazy_destination_done(self, self._key(args))

    def op_restore_images(self, args: Any) -> dict[str, Any]:
        a = control.check_args(args, {"images_dir": str, "lazy_source": (list, type(None))})
        return self.criu_thread.submit(
            stage_transfer.restore_images, self, _abs(a["images_dir"]), a["lazy_source"]
        ).result()

    def op_cancel_transfer(self, args: Any) -> None:
        """Rollback: stop a page server or lazy-pages daemon left by a failed migration."""
        key = self._key(args)
        for table in (self.transfers, self.lazy_daemons):
            obj = table.pop(key, None)
            if obj is not None:
                obj.stop()

    @staticmethod
    def _key_of(a: dict[str, Any]) -> str:
        return f"{a['app']}/{a['stage']}"

    def op_facts(self, args: Any) -> dict[str, Any]:
        """What a migration's pre-flight compares: CRIU, CPU flags, kernel, free space."""
        control.check_args(args, {})
        return stage_checkpoint.node_facts(self)

    def op_status(self, args: Any) -> dict[str, Any]:
        control.check_args(args, {})
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

    def op_shutdown(self, args: Any) -> None:
        control.check_args(args, {})
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpmigrate agent")
    parser.add_argument("--node", required=True)
    parser.add_argument("--socket", help="unix socket file for the CLI")
    parser.add_argument("--listen", help="HOST:PORT for other agents")
    parser.add_argument("--peers", default="", help="comma-separated HOST:PORT of peer agents")
    args = parser.parse_args(argv)
    cfg = config.load()
    if not cfg.token:
        print("dpmigrate agent: DPMIGRATE_TOKEN is not set; every agent of a cluster needs the "
              "cluster token", file=sys.stderr)  # fmt: skip
        return 2
    address = args.listen.rpartition(":")[0] if args.listen else "127.0.0.1"
    peers = [p for p in args.peers.split(",") if p]
    agent = Agent(args.node, cfg.token, Path(cfg.state_dir), peers, address)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=agent.shutdown).start())
    signal.signal(signal.SIGINT, lambda *_: threading.Thread(target=agent.shutdown).start())
    agent.listen(ABSTRACT_NAME)
    if args.socket:
        agent.listen(args.socket)
    if args.listen:
        agent.listen(args.listen)
    log("agent started", node=args.node, pid=os.getpid())
    agent.run()
    log("agent stopped", node=args.node)
    return 0


if __name__ == "__main__":
    sys.exit(main())
