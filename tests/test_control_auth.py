"""The control plane against strangers: mutual authentication, a MAC on every frame, budgets
a stranger cannot use up, stage keys that open only a stage's operations.

Each test reproduces a finding of the adversarial probe of the first wave first (the fault is
in place: the relay really relayed, the idle connections really are open), then asserts that
it no longer works.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import in_netns, require, wait_until

from dpmigrate.errors import AuthError, RemoteError
from dpmigrate.runtime import control
from dpmigrate.runtime.admission import TCP_BUDGET
from dpmigrate.runtime.control import AgentClient, Credential
from dpmigrate.runtime.registry import AgentResolver
from dpmigrate.transports.resolver import Endpoint

TOKEN = "test-token-0123456789-control"
PORT = 7090  # not 7070 (agents) nor 7071 (their metrics)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str], Path]]:
    """An agent in a network namespace of its own (loopback up), on a socket file and on
    TCP 127.0.0.1:PORT inside that namespace; its log is a file."""
    require("root", "netns")
    sock = tmp_path / "agent.sock"
    log = tmp_path / "agent.log"
    env = {**os.environ, "DPMIGRATE_TOKEN": TOKEN, "DPMIGRATE_STATE_DIR": str(tmp_path / "s")}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["unshare", "--net", "sh", "-c",
             f'ip link set lo up && exec "$0" -m dpmigrate.agentd --node t1 --socket {sock} '
             f"--listen 127.0.0.1:{PORT}", sys.executable],
            env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    try:
        wait_until(lambda: sock.exists() or proc.poll() is not None, "the agent", timeout=30)
        assert proc.poll() is None, log.read_text()
        yield str(sock), proc, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def _agent_pid(proc: subprocess.Popen[str]) -> int:
    return proc.pid  # sh execs the agent: the same PID, in the namespace


# -- a fake agent in the middle ---------------------------------------------------------------
class Relay:
    """A unix socket that relays every byte between a victim and the real agent, and can
    rewrite what the agent says (a forged answer) or speak for the victim (an injection)."""

    def __init__(self, path: Path, agent: str) -> None:
        self.path = path
        self.agent = agent
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen(4)
        self.to_victim: list[bytes] = []  # everything relayed towards the victim
        self.to_agent: list[bytes] = []  # and towards the agent
        self.upstream: socket.socket | None = None
        self.forge: Callable[[bytes], bytes] = lambda data: data
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            victim, _ = self.server.accept()
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(self.agent)
            self.upstream = upstream
            threading.Thread(target=self._pump, args=(victim, upstream, False),
                             daemon=True).start()  # fmt: skip
            self._pump(upstream, victim, True)

    def _pump(self, src: socket.socket, dst: socket.socket, to_victim: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if to_victim:
                    self.to_victim.append(data)
                    data = self.forge(data)
                else:
                    self.to_agent.append(data)
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.server.close()
        if self.upstream is not None:
            self.upstream.close()


def test_a_fake_agent_relaying_the_real_one_can_neither_forge_nor_inject(
    agent, tmp_path: Path
) -> None:
    path, proc, _log = agent
    honest = AgentResolver(path, TOKEN)
    honest.register("flows.a-b", Endpoint("tcp", "10.0.0.1:4000", 1))
    honest.close()
    relay = Relay(tmp_path / "fake.sock", path)
    try:
        victim = AgentClient(str(relay.path), TOKEN, timeout=10)
        # the fault: the relay is in the middle and the handshake went through it
        assert relay.to_victim and relay.upstream is not None
        assert victim.call("lookup", ring="flows.a-b", timeout=0)["address"] == "10.0.0.1:4000"
        relay.forge = lambda data: data.replace(b"10.0.0.1:4000", b"10.6.6.6:4000")
        with pytest.raises(AuthError, match="failed its MAC"):
            victim.call("lookup", ring="flows.a-b", timeout=0)
        assert any(b"10.0.0.1:4000" in d for d in relay.to_victim[-1:]), "no answer relayed"
        victim.close()
    finally:
        relay.close()
    # speaking for a victim on its relayed session: refused, nothing registered
    relay2 = Relay(tmp_path / "fake2.sock", path)
    try:
        victim = AgentClient(str(relay2.path), TOKEN, timeout=10)
        assert relay2.upstream is not None
        body = json.dumps({"v": control.VERSION, "id": 1, "op": "register",
                           "args": {"ring": "flows.evil", "endpoint": {
                               "transport": "tcp", "address": "10.6.6.6:1"}}}).encode()
        forged = b"\0" * 32 + body  # no session key: any MAC is wrong
        relay2.upstream.sendall(len(forged).to_bytes(4, "big") + forged)
        wait_until(lambda: _closed(relay2.upstream), "the agent to hang up on the injection",
                   timeout=10)  # fmt: skip
        victim.close()
    finally:
        relay2.close()
    with AgentClient(path, TOKEN) as clean:
        assert clean.call("lookup", ring="flows.evil", timeout=0) is None
        assert clean.call("ping")["node"] == "t1"
    assert proc.poll() is None


def _closed(sock: socket.socket) -> bool:
    """The peer hung up (what it had sent before, a hello, is read and dropped)."""
    sock.settimeout(0.05)
    try:
        return any(sock.recv(65536) == b"" for _ in range(100))
    except TimeoutError:
        return False
    except OSError:
        return True


def test_a_client_refuses_a_peer_that_cannot_prove_it_is_an_agent(tmp_path: Path) -> None:
    """A fake agent that does not hold the token answers 'ok' to anything: the client still
    refuses it before sending a single request."""
    path = tmp_path / "liar.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)
    seen: list[dict[str, Any]] = []

    def lie() -> None:
        conn, _ = server.accept()
        with conn:
            control.send_frame(conn, {"v": control.VERSION, "hello": "dpmigrate-agent",
                                      "node": "n1", "nonce": "ab" * 16})  # fmt: skip
            seen.append(control.recv_frame(conn))
            control.send_frame(conn, {"v": control.VERSION, "ok": True, "auth": "00" * 32})
            conn.settimeout(2)
            with contextlib.suppress(OSError):
                seen.append({"after": conn.recv(100)})

    thread = threading.Thread(target=lie)
    thread.start()
    with pytest.raises(AuthError, match="cannot prove it holds the cluster token"):
        AgentClient(str(path), TOKEN, timeout=5)
    thread.join(10)
    server.close()
    assert seen[0]["as"] == "cluster" and TOKEN not in json.dumps(seen[0])
    assert seen[1:] in ([], [{"after": b""}]), seen  # no request followed


def test_a_replayed_frame_ends_the_session_and_is_not_obeyed(agent, tmp_path: Path) -> None:
    path, proc, _ = agent
    relay = Relay(tmp_path / "tap.sock", path)
    try:
        client = AgentClient(str(relay.path), TOKEN, timeout=10)
        client.call("register", ring="flows.r1",
                    endpoint={"transport": "tcp", "address": "10.0.0.1:1"})  # fmt: skip
        register = relay.to_agent[-1]
        client.call("unregister", ring="flows.r1")
        assert b"register" in register and relay.upstream is not None  # the captured frame
        relay.upstream.sendall(register)  # the register again, word for word
        wait_until(lambda: _closed(relay.upstream), "the agent to hang up on the replay",
                   timeout=10)  # fmt: skip
        client.close()
    finally:
        relay.close()
    with AgentClient(path, TOKEN) as clean:
        assert clean.call("lookup", ring="flows.r1", timeout=0) is None, "the replay was obeyed"
    # the whole handshake replayed on a new connection: a new nonce, so refused
    raw = socket.socket(socket.AF_UNIX)
    raw.settimeout(10)
    raw.connect(path)
    with raw:
        control.recv_frame(raw)
        raw.sendall(relay.to_agent[0])
        assert control.recv_frame(raw)["ok"] is False
    assert proc.poll() is None


def test_idle_strangers_at_the_tcp_port_exhaust_nothing(agent) -> None:
    """The probe: ~62 idle connections made `status` show the node dead and a restarted stage
    could not reach its agent. Now 100 idle strangers hold only a few pending slots, for a few
    seconds; the unix sockets (stages, CLI) and other hosts are untouched."""
    path, proc, log = agent
    pid = _agent_pid(proc)

    def flood() -> list[socket.socket]:
        socks = []
        for _ in range(100):
            s = socket.socket()
            s.settimeout(5)
            s.connect(("127.0.0.1", PORT))
            socks.append(s)
        return socks

    idle = in_netns(pid, flood)
    try:
        time.sleep(0.3)
        open_now = sum(not _closed(s) for s in idle)
        # the fault is in place: strangers hold connections open, up to their budget
        assert 1 <= open_now <= TCP_BUDGET.pending_per_source, open_now
        t0 = time.monotonic()
        with AgentClient(path, TOKEN, timeout=5) as local:  # what stages and the CLI use
            assert local.call("ping")["node"] == "t1"
            assert local.call("status")["node"] == "t1"
        assert time.monotonic() - t0 < control.HANDSHAKE_TIMEOUT_S, "the local client waited"
        # the strangers that held slots are dropped after the handshake timeout
        wait_until(lambda: all(_closed(s) for s in idle), "the agent to drop idle strangers",
                   timeout=control.HANDSHAKE_TIMEOUT_S + 10)  # fmt: skip
        # then the TCP port serves an authenticated client again
        def authed() -> str:
            with AgentClient(f"127.0.0.1:{PORT}", TOKEN, timeout=5) as c:
                return str(c.call("ping")["node"])

        assert in_netns(pid, authed) == "t1"
    finally:
        for s in idle:
            s.close()
    refusals = [line for line in log.read_text().splitlines() if '"refused"' in line]
    assert 1 <= len(refusals) <= 20, f"{len(refusals)} refusal lines: the log is flooded"
    assert proc.poll() is None


def test_deep_or_broken_frames_before_authentication_are_one_line(agent) -> None:
    path, proc, log = agent
    frames = [
        b"[" * 100_000,  # far beyond the handshake limit
        b"[" * 3000 + b"]" * 3000,  # under the limit, deeper than the parser's recursion
        b'{"v": 2, "as": "cluster", "nonce": "' + b"\xff" * 40 + b'"}',  # not UTF-8
        json.dumps({"v": 2, "as": "x" * 2000, "nonce": "ab" * 16, "auth": "00"}).encode(),
    ]
    for frame in frames:
        raw = socket.socket(socket.AF_UNIX)
        raw.settimeout(10)
        raw.connect(path)
        with raw:
            control.recv_frame(raw)  # the hello
            raw.sendall(len(frame).to_bytes(4, "big") + frame)
            with contextlib.suppress(OSError):
                while raw.recv(65536):
                    pass
    with AgentClient(path, TOKEN) as c:
        assert c.call("ping")["node"] == "t1"
    text = log.read_text()
    assert "Traceback" not in text and "RecursionError" not in text, text[-2000:]
    assert proc.poll() is None


# -- stage keys --------------------------------------------------------------------------------
def test_a_stage_key_opens_only_what_a_stage_needs(agent) -> None:
    path, proc, _ = agent
    mine = Credential.stage("flows", "table", control.stage_key(TOKEN, "flows", "table"))
    with AgentClient(path, mine) as stage:
        assert stage.call("ping")["node"] == "t1"
        stage.call("register", ring="flows.gen-table",
                   endpoint={"transport": "tcp", "address": "10.0.0.1:5"})  # fmt: skip
        assert stage.call("lookup", ring="flows.gen-table", timeout=0)["address"] == "10.0.0.1:5"
        key = stage.call("ring_key", ring="flows.gen-table")["key"]
        assert bytes.fromhex(key) == control.ring_key(TOKEN, "flows.gen-table")
        assert stage.call("ring_key", ring="flows.table.statesync")["key"]
        refused = [
            ("status", {}),
            ("shutdown", {}),
            ("start_stage", {"app": "flows", "stage": "x", "manifest": "/m", "run_dir": "/r",
                             "model": "multi-node"}),
            ("stop_app", {"app": "flows"}),
            ("register", {"ring": "other.r", "endpoint": {"transport": "tcp",
                                                         "address": "10.0.0.1:5"}}),
            ("placement", {"app": "other"}),
            ("ring_key", {"ring": "other.r"}),
            ("ring_key", {"ring": "flows.gen.statesync"}),  # another stage's channel
            ("standbys", {"app": "flows", "stage": "gen"}),
        ]  # fmt: skip
        for op, args in refused:
            with pytest.raises(RemoteError, match=r"not open to a stage|may not use"):
                stage.call(op, **args)
        assert stage.call("ping")["node"] == "t1"  # a refusal does not end the session
    with AgentClient(path, TOKEN) as admin:
        assert admin.call("lookup", ring="other.r", timeout=0) is None
        assert admin.call("status")["stages"] == []
    forged = Credential.stage("flows", "table", control.stage_key(TOKEN, "flows", "gen"))
    with pytest.raises(AuthError, match="authentication failed"):
        AgentClient(path, forged)
    assert proc.poll() is None
