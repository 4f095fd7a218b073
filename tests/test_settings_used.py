"""Every documented setting changes behaviour, read at the entry points only (DESIGN.md §9).

DPMIGRATE_RING_CAPACITY is the capacity of a ring the manifest gives none, DPMIGRATE_
RECONNECT_TIMEOUT what every ring end of a stage gets as its reconnect timeout, and
DPMIGRATE_LOG_LEVEL the least level of the events the agents and stages log. A bad value is
one line from the agent and the stage host, as from the CLI. Only the agent-as-a-process test
needs root (a network namespace of its own for its abstract socket).
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import EXAMPLE, paced_flows, require, run_cli, wait_until

from dpmigrate import transports
from dpmigrate.config import Config
from dpmigrate.eventlog import EventLog
from dpmigrate.runtime import inprocess, stagehost
from dpmigrate.runtime.agent import Agent
from dpmigrate.runtime.manifest import App

TOKEN = "test-token-0123456789"


def flows_without_capacity(folder: Path, total: int = 2_000_000, rate: int = 2000) -> Path:
    """The flows example, slowly paced, whose manifest sets no default capacity; only the ring
    table → check has one of its own (200)."""
    path = paced_flows(folder, total, rate)
    text = path.read_text().replace("capacity = 1024\n", "")
    text = text.replace('to = "check.in"', 'to = "check.in"\ncapacity = 200')
    assert "capacity = 1024" not in text and "capacity = 200" in text
    path.write_text(text)
    return path


def events(path: Path) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.startswith("{")]


# -- the defaults agree -----------------------------------------------------------------------
def test_the_transports_defaults_are_the_settings_defaults() -> None:
    """README and `dpmigrate config` say 10 s and 1024: so does every transport."""
    cfg = Config.from_env({})
    assert transports.DEFAULT_RECONNECT_TIMEOUT == cfg.reconnect_timeout == 10.0
    assert transports.DEFAULT_CAPACITY == cfg.ring_capacity == 1024
    for name in transports.TRANSPORTS:
        module = transports.module(name)
        for fn in (module.open_sender, module.open_receiver):
            default = inspect.signature(fn).parameters["reconnect_timeout"].default
            assert default == cfg.reconnect_timeout, (name, fn.__name__)


# -- DPMIGRATE_RING_CAPACITY ------------------------------------------------------------------
def test_ring_capacity_is_the_default_when_the_manifest_gives_none(tmp_path: Path) -> None:
    path = flows_without_capacity(tmp_path)
    app = App.load(path, ring_capacity=48)
    assert {r.name: r.capacity for r in app.rings} == {"gen.out-table.in": 48,
                                                       "table.out-check.in": 200}  # fmt: skip
    assert {r.capacity for r in App.load(path).rings} == {1024, 200}
    # The manifest's own default wins over the environment's.
    assert {r.capacity for r in App.load(EXAMPLE, ring_capacity=48).rings} == {1024}
    runners = inprocess.build(app)  # the in-process model's mem rings
    sent = {tx.statistics().capacity for r in runners for tx in r.outputs.values()}
    assert sent == {48, 200}


@pytest.fixture
def stage_hosts(tmp_path: Path) -> Iterator[dict]:
    """Starts stage hosts of a slow flows run (dir registry, no root), each with its own
    environment; stops them all at the end."""
    manifest = flows_without_capacity(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(stage: str, **env: str) -> Path:
        log = tmp_path / f"{stage}.log"
        procs[stage] = subprocess.Popen(
            [sys.executable, *stagehost.command(str(manifest), stage, str(run_dir),
                                                "multi-process"), "--log", str(log)],
            env={**os.environ, **env}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        return log

    try:
        yield {"start": start, "run_dir": run_dir, "procs": procs}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _rings(run_dir: Path, stage: str) -> dict[str, dict]:
    return {f"{r['role']} {r['name']}": r
            for r in stagehost.read_status(run_dir, stage).get("rings", [])}  # fmt: skip


def test_a_stage_hosts_rings_get_capacity_and_reconnect_timeout_from_the_environment(
    stage_hosts: dict,
) -> None:
    env = {"DPMIGRATE_RING_CAPACITY": "48", "DPMIGRATE_RECONNECT_TIMEOUT": "2.5",
           "DPMIGRATE_LOG_LEVEL": "debug"}  # fmt: skip
    gen_log = stage_hosts["start"]("gen", **env)
    table_log = stage_hosts["start"]("table", **env)
    run_dir = stage_hosts["run_dir"]
    wait_until(lambda: len(_rings(run_dir, "table")) == 2, "table's two rings", timeout=30)
    wait_until(lambda: _rings(run_dir, "gen"), "gen's ring", timeout=30)
    gen, table = _rings(run_dir, "gen"), _rings(run_dir, "table")
    producer = gen["producer flows.gen.out-table.in"]
    consumer = table["consumer flows.gen.out-table.in"]
    own = table["producer flows.table.out-check.in"]
    assert (producer["transport"], producer["capacity"], consumer["capacity"]) == ("shm", 48, 48)
    assert own["capacity"] == 200  # the manifest's capacity of that ring wins
    for end in (producer, consumer, own):
        assert end["reconnect_timeout"] == 2.5, end
    # At debug the stage logs every ring it opens, with what it got.
    opened = {(e["role"], e.get("capacity"), e["reconnect_timeout"], e["level"])
              for e in events(table_log) if e["event"] == "ring opened"}  # fmt: skip
    assert opened == {("consumer", None, 2.5, "debug"), ("producer", 200, 2.5, "debug")}
    assert any(e["event"] == "stage started" for e in events(gen_log))


def test_a_stage_at_warning_writes_no_info_and_at_info_no_debug(stage_hosts: dict) -> None:
    quiet = stage_hosts["start"]("gen", DPMIGRATE_LOG_LEVEL="warning")
    normal = stage_hosts["start"]("table", DPMIGRATE_LOG_LEVEL="info")
    run_dir = stage_hosts["run_dir"]
    wait_until(lambda: len(_rings(run_dir, "table")) == 2, "table's two rings", timeout=30)
    wait_until(lambda: _rings(run_dir, "gen"), "gen's ring", timeout=30)
    for proc in stage_hosts["procs"].values():
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    assert events(quiet) == []  # started and stopped are info
    seen = events(normal)
    # (a host without hugepages adds one info line per shm ring: "ring on 4 KB pages")
    named = {e["event"] for e in seen}
    assert {"stage started", "stage stopped"} <= named <= {"stage started", "stage stopped",
                                                           "ring on 4 KB pages"}, seen  # fmt: skip
    assert {e["level"] for e in seen} == {"info"} and all(e["stage"] == "table" for e in seen)


# -- DPMIGRATE_LOG_LEVEL in the agent ---------------------------------------------------------
def test_an_agents_log_honours_its_level(tmp_path: Path) -> None:
    for level, expect in (("warning", set()), ("info", set()), ("debug", {"registered"})):
        lines: list[str] = []
        agent = Agent("n0", "token", tmp_path / level, log=EventLog(level, write=lines.append))
        endpoint = {"transport": "tcp", "address": "127.0.0.1:1"}
        reply = agent.operations.dispatch("register", {"ring": "app.r", "endpoint": endpoint})
        assert reply["ok"] is True, reply
        agent.log("listening", address="x")  # an info event
        logged = [json.loads(line) for line in lines]
        assert {e["event"] for e in logged if e["level"] == "debug"} == expect, logged
        assert any(e["event"] == "listening" for e in logged) == (level != "warning")


def test_the_agent_program_at_warning_writes_no_info_events(tmp_path: Path) -> None:
    """`dpmigrate agent` reads DPMIGRATE_LOG_LEVEL: at warning a refused client is logged,
    its start, stop and listeners are not."""
    require("root", "netns")
    from dpmigrate.errors import DpmigrateError
    from dpmigrate.runtime.control import AgentClient

    sock = tmp_path / "agent.sock"
    env = {**os.environ, "DPMIGRATE_TOKEN": TOKEN, "DPMIGRATE_STATE_DIR": str(tmp_path / "s"),
           "DPMIGRATE_LOG_LEVEL": "warning"}  # fmt: skip
    proc = subprocess.Popen(
        ["unshare", "--net", sys.executable, "-m", "dpmigrate.agentd", "--node", "t1",
         "--socket", str(sock)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_until(lambda: sock.exists() or proc.poll() is not None, "the agent", timeout=30)
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        with pytest.raises(DpmigrateError):
            AgentClient(str(sock), "not-the-cluster-token-at-all")
        with AgentClient(str(sock), TOKEN) as client:
            client.call("ping")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    logged = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert logged, out
    assert {e["level"] for e in logged} <= {"warning", "error"}, logged
    assert [e["event"] for e in logged] == ["refused"] and logged[0]["node"] == "t1"


# -- bad values: one line ---------------------------------------------------------------------
def _one_line(result: subprocess.CompletedProcess[str], var: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and var in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_a_bad_value_is_one_line_from_the_agent_and_the_stage_host(tmp_path: Path) -> None:
    env = {**os.environ, "DPMIGRATE_LOG_LEVEL": "loud", "DPMIGRATE_TOKEN": TOKEN}
    agent = subprocess.run([sys.executable, "-m", "dpmigrate.agentd", "--node", "t1"], env=env,
                           capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    _one_line(agent, "DPMIGRATE_LOG_LEVEL")
    manifest = flows_without_capacity(tmp_path)
    env = {**os.environ, "DPMIGRATE_RECONNECT_TIMEOUT": "soon"}
    stage = subprocess.run(
        [sys.executable, *stagehost.command(str(manifest), "gen", str(tmp_path / "run"),
                                            "multi-process")],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    _one_line(stage, "DPMIGRATE_RECONNECT_TIMEOUT")
    assert not (tmp_path / "run").exists(), "the stage started before its settings were read"
    _one_line(run_cli("run", str(manifest), env={"DPMIGRATE_RING_CAPACITY": "0"}),
              "DPMIGRATE_RING_CAPACITY")  # fmt: skip


# -- the event log itself ---------------------------------------------------------------------
def test_event_log_levels_and_lines() -> None:
    lines: list[str] = []
    log = EventLog("info", write=lines.append, stage="s")
    assert log("hidden", level="debug") is None and lines == []
    assert not log.enabled("debug") and log.enabled("error")
    line = log("shown", level="warning", n=1)
    assert line == lines[0]
    event = json.loads(lines[0])
    assert (event["level"], event["event"], event["stage"], event["n"]) == ("warning", "shown",
                                                                         "s", 1)  # fmt: skip
    assert list(event)[:3] == ["t", "level", "event"]
    with pytest.raises(ValueError, match="debug, info, warning, error"):
        log("x", level="loud")
    with pytest.raises(ValueError):
        EventLog("verbose")


def test_the_library_reads_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """What used to read DPMIGRATE_* deep inside now takes it as a value."""
    from dpmigrate.runtime.multiprocess import MultiProcessRun
    from dpmigrate.runtime.registry import AgentResolver

    monkeypatch.setenv("DPMIGRATE_RING_CAPACITY", "not-a-number")  # any config.load() fails
    with pytest.raises(TypeError):
        AgentResolver("@x")  # type: ignore[call-arg]
    assert AgentResolver("@x", TOKEN).credential == TOKEN
    app = App.load(EXAMPLE)
    with pytest.raises(TypeError, match="run_dir or the state_dir"):
        MultiProcessRun(app)
