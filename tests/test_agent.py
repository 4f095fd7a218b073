"""The node agent: authenticated control protocol, registry, and robustness to bad input."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import require

from dpmigrate.errors import RingTimeout
from dpmigrate.runtime.control import (
    AgentClient,
    AuthError,
    RemoteError,
)
from dpmigrate.runtime.registry import AgentResolver
from dpmigrate.transports.resolver import Endpoint

TOKEN = "test-token-0123456789"


@pytest.fixture
def agent(tmp_path: Path):
    require("root", "netns")
    sock = tmp_path / "agent.sock"
    env = {**os.environ, "DPMIGRATE_TOKEN": TOKEN, "DPMIGRATE_STATE_DIR": str(tmp_path / "state")}
    # Its own network namespace: the abstract socket and the node are then truly its own.
    proc = subprocess.Popen(
        ["unshare", "--net", sys.executable, "-m", "dpmigrate.agentd", "--node", "t1",
         "--socket", str(sock)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "agent did not start"
        time.sleep(0.02)
    yield str(sock), proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_registry_roundtrip(agent) -> None:
    path, _ = agent
    resolver = AgentResolver(path, TOKEN)
    resolver.register("flows.a-b", Endpoint("tcp", "127.0.0.1:4000", 2))
    assert resolver.lookup("flows.a-b") == Endpoint("tcp", "127.0.0.1:4000", 2)
    resolver.register("flows.a-b", Endpoint("tcp", "127.0.0.1:4001", 1))  # stale: ignored
    assert resolver.lookup("flows.a-b").address == "127.0.0.1:4000"
    with pytest.raises(RingTimeout, match="no producer registered"):
        resolver.lookup("flows.none", timeout=0.1)
    resolver.unregister("flows.a-b")
    with pytest.raises(RingTimeout):
        resolver.lookup("flows.a-b", timeout=0)
    resolver.close()


def test_wrong_token_is_refused_and_changes_nothing(agent) -> None:
    path, _ = agent
    with pytest.raises(AuthError, match="wrong or missing cluster token"):
        AgentClient(path, "not-the-cluster-token")
    with AgentClient(path, TOKEN) as client:
        assert client.call("status")["registry"] == {}


def test_malformed_requests_get_errors_and_the_agent_survives(agent) -> None:
    path, proc = agent
    with AgentClient(path, TOKEN) as client:
        for op, args, phrase in [
            ("no_such_op", {}, "unknown operation 'no_such_op'"),
            ("lookup", {"ring": "x"}, "'lookup': missing argument 'timeout'"),
            ("lookup", {"ring": "x", "timeout": "soon"}, "'timeout' has the wrong type string"),
            ("lookup", {"ring": "x", "timeout": True}, "'timeout' has the wrong type bool"),
            (
                "register",
                {"ring": "bad name!", "endpoint": {"transport": "tcp", "address": "a"}},
                "'ring' is not valid",
            ),
            ("register", {"ring": "r", "endpoint": {"transport": 5}}, "lacks a string"),
            (
                "start_stage",
                {
                    "app": "a",
                    "manifest": "rel.toml",
                    "stage": "s",
                    "run_dir": "/x",
                    "model": "multi-node",
                },
                "'manifest' is not valid: 'rel.toml' is not an absolute path",
            ),
            ("ping", {"extra": 1}, "'ping': unknown argument"),
            (
                "checkpoint_stage",
                {"app": "a", "stage": "s", "out": "/x/../y", "leave_running": False},
                "'out' is not valid: .* '..' component",
            ),
            (
                "restore_images",
                {"app": "a", "stage": "s", "migration": "m1", "lazy_source": ["h", "7"]},
                r"'lazy_source'\[1\] has the wrong type string; expected an int",
            ),
            (
                "restore_images",
                {"app": "a", "stage": "s", "migration": "m1", "lazy_source": None},
                "has not received and verified migration m1",
            ),
            (
                "migration_chunk",
                {"migration": "m1", "file": "../../etc/shadow", "offset": 0, "size": 10},
                "'file' is not valid: .* not a plain relative file name",
            ),
            (
                "migration_chunk",
                {"migration": "m1", "file": "images/core-1.img", "offset": 0, "size": 10},
                "no sealed outgoing folder of migration m1",
            ),
            ("migration_files", {"migration": ".."}, "'migration' is not valid"),
            (
                "pull_migration",
                {"app": "a", "stage": "s", "migration": "m1", "source": "/run/x.sock"},
                "'source' is not valid: '/run/x.sock' is not HOST:PORT",
            ),
            (
                "dump_stage",
                {"app": "a", "stage": "s", "out": "/x", "quiesced": {}},
                "not running on node t1",
            ),
        ]:
            with pytest.raises(RemoteError, match=phrase):
                client.call(op, **args)
        assert client.call("status")["registry"] == {}, "a refused request changed the registry"
    # Raw garbage: before authentication, after authentication, and an oversized length.
    for payload in (b"\xff" * 64, b"GET / HTTP/1.0\r\n\r\n", struct.pack("!I", 10) + b"not json!!"):
        raw = socket.socket(socket.AF_UNIX)
        raw.connect(path)
        hello = raw.recv(4096)
        assert b"dpmigrate-agent" in hello
        raw.sendall(payload)
        raw.settimeout(5)
        try:
            reply = raw.recv(4096)
        except ConnectionResetError:
            reply = b""
        raw.close()
        if reply:
            assert json.loads(reply[4:])["ok"] is False
    assert proc.poll() is None, "the agent died on garbage"
    with AgentClient(path, TOKEN) as client:
        assert client.call("ping")["node"] == "t1"


def test_only_registered_operations_are_served(agent) -> None:
    """Method names of the agent (and the old op_* spelling) are not operations."""
    path, proc = agent
    with AgentClient(path, TOKEN) as client:
        for op in (
            "_handle",
            "run",
            "listen",
            "__init__",
            "_serve",
            "_store",
            "_ping",
            "op_ping",
            "op_shutdown",
            "_shutdown_soon",
            "shutdown_",
            "PING",
            "",
        ):
            with pytest.raises(RemoteError, match="unknown operation"):
                client.call(op)
        assert client.call("ping")["node"] == "t1"
    assert proc.poll() is None


def test_start_stage_with_a_traversing_name_is_refused_and_starts_nothing(
    agent, tmp_path: Path
) -> None:
    path, proc = agent
    logs = tmp_path / "state" / "logs" / "t1"
    before = sorted(logs.iterdir()) if logs.exists() else []
    with AgentClient(path, TOKEN, timeout=10) as client:
        for app, stage in (("../../../tmp/evil", "s"), ("a", "../s"), ("a", "s/../../x")):
            args = {"app": app, "stage": stage, "manifest": str(tmp_path / "app.toml"),
                    "run_dir": str(tmp_path / "run"), "model": "multi-node"}  # fmt: skip
            with pytest.raises(RemoteError, match="is not a name"):
                client.call("start_stage", **args)
        status = {"ok": True, "result": client.call("status")}
    assert status["ok"] is True and status["result"]["stages"] == [], status
    assert (sorted(logs.iterdir()) if logs.exists() else []) == before, "a stage log appeared"
    assert not (tmp_path / "run").exists()
    assert proc.poll() is None


def test_sigterm_stops_the_agent_cleanly(agent) -> None:
    _path, proc = agent
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    events = [
        json.loads(line)["event"]
        for line in proc.stdout.read().splitlines()
        if line.startswith("{")
    ]
    assert events[-1] == "agent stopped"


def test_an_agent_whose_port_is_taken_says_so_in_one_line_and_exits_1(tmp_path: Path) -> None:
    """Another program holds the TCP port (here: a listener started first in the same new
    network namespace): the agent exits 1 with one line naming the address, no traceback."""
    require("root", "netns")
    script = (
        "import socket, subprocess, sys\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 7090)); s.listen()\n"
        "sys.exit(subprocess.run([sys.executable, '-m', 'dpmigrate.agentd', '--node', 't1', "
        "'--listen', '127.0.0.1:7090'], timeout=60).returncode)\n"
    )
    env = {**os.environ, "DPMIGRATE_TOKEN": "t" * 32, "DPMIGRATE_STATE_DIR": str(tmp_path / "s"),
           "DPMIGRATE_METRICS_PORT": "0"}  # fmt: skip
    done = subprocess.run(["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$0" -c "$1"',
                           sys.executable, script], env=env, capture_output=True, text=True,
                          timeout=90)  # fmt: skip
    assert done.returncode == 1, (done.stdout, done.stderr)
    failed = [json.loads(line) for line in done.stdout.splitlines() if '"agent failed"' in line]
    assert len(failed) == 1, done.stdout
    assert "cannot listen on 127.0.0.1:7090: Address already in use" in failed[0]["error"]
    assert "Traceback" not in done.stdout + done.stderr
