"""Each agent's Prometheus metrics (issue 14).

On a real local cluster running the flows example, every scrape is made from inside the
node's own network namespace, at the node's address, on DPMIGRATE_METRICS_PORT, and parsed
with prometheus-client's own parser: ring counters grow under traffic, the state version is
the one the status says, a SIGKILLed stage's restart is counted, a stop-and-copy migration's
phases and downtime appear on its destination, anything but ``GET /metrics`` is refused and
changes nothing, and after ``cluster down`` nothing holds the exporter's socket. Without
root: the collector on status files written by hand (what is not measured is absent), the
migration record's checks, and the endpoint's refusals, bounds and stop, in this process.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from support import alive, in_netns, paced_flows, stage_status, wait_for_input, wait_until

from dpmigrate.eventlog import EventLog
from dpmigrate.runtime import metrics, metrics_http
from dpmigrate.runtime.agent import Agent
from dpmigrate.runtime.migration_record import RECORD, MigrationRecord
from dpmigrate.runtime.supervisor import StageProcess

TOKEN = "test-token-0123456789"
PORT = 9464  # not the default: the agents must take it from DPMIGRATE_METRICS_PORT


# -- scraping and reading ---------------------------------------------------------------------
def parse(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float | None:
    """The value of the one sample ``name`` whose labels include ``labels`` (None: absent)."""
    found = [s.value for s in samples
             if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]  # fmt: skip
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


def bucket_of(samples: list[Sample], name: str, **labels: str) -> float:
    """The ``le`` of the lowest bucket of histogram ``name`` that counts anything (one
    observation: the bucket it fell in)."""
    counted = [float(s.labels["le"]) for s in samples if s.name == f"{name}_bucket"
               and s.value > 0 and all(s.labels.get(k) == v for k, v in labels.items())]  # fmt: skip
    assert counted, (name, labels)
    return min(counted)


def smallest_bound_above(seconds: float) -> float:
    from dpmigrate.runtime.migration_record import BUCKETS

    return next((b for b in BUCKETS if seconds <= b), float("inf"))


def request(host: str, port: int, method: str = "GET", path: str = "/metrics",
            body: bytes | None = None) -> tuple[int, bytes]:  # fmt: skip
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path, body=body)
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def raw_request(host: str, port: int, data: bytes) -> bytes:
    """Send ``data`` as it is and read the answer until the server closes."""
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def scrape_node(cluster: Any, node: str) -> list[Sample]:
    """GET /metrics from inside ``node``'s network namespace, at its address."""
    entry = cluster.node(node)
    status, body = in_netns(entry.agent_pid, lambda: request(entry.address, PORT))
    assert status == 200, body
    return parse(body.decode())


def in_node(cluster: Any, node: str, fn: Callable[[str], Any]) -> Any:
    entry = cluster.node(node)
    return in_netns(entry.agent_pid, lambda: fn(entry.address))


def listening_inode(pid: int, port: int) -> int | None:
    """The inode of the TCP socket listening on ``port`` in ``pid``'s network namespace."""
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                return int(fields[9])
    return None


def socket_holders(inode: int) -> list[int]:
    """PIDs of the processes that hold socket ``inode`` open."""
    holders = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            links = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
        except OSError:
            continue
        if f"socket:[{inode}]" in links:
            holders.append(int(entry.name))
    return holders


# -- on a real cluster --------------------------------------------------------------------------
@pytest.fixture
def metrics_port(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setenv("DPMIGRATE_METRICS_PORT", str(PORT))
    return PORT


def test_the_agents_metrics_follow_rings_stages_restarts_and_a_migration(
    cluster_state_dir: Path, tmp_path: Path, metrics_port: int
) -> None:
    from dpmigrate.migrate import LocalCluster
    from dpmigrate.runtime.manifest import App
    from dpmigrate.runtime.multinode import MultiNodeRun

    app = App.load(paced_flows(tmp_path, 2_000_000, rate=5000))
    table_in = "flows.gen.out-table.in"
    cluster = LocalCluster(3)
    cluster.up()
    try:
        run = MultiNodeRun(app, cluster)
        run.start()
        wait_for_input(run, 2000)

        # every node serves, each about its own stages
        for node, stage in (("node1", "gen"), ("node2", "table"), ("node3", "check")):
            samples = scrape_node(cluster, node)
            assert value(samples, "dpmigrate_agent_info", node=node) == 1
            assert value(samples, "dpmigrate_stage_running", stage=stage) == 1, (node, stage)
            assert {s.labels["stage"] for s in samples if "stage" in s.labels} == {stage}

        # and across the cluster's bridge, from the hub, as a Prometheus there would
        etcd_pid = cluster.status()["store"]["pid"]  # the embedded etcd runs in the hub
        node2 = cluster.node("node2").address
        status, body = in_netns(etcd_pid, lambda: request(node2, PORT))
        assert status == 200 and value(parse(body.decode()), "dpmigrate_agent_info",
                                       node="node2") == 1  # fmt: skip

        # ring counters grow between two scrapes under traffic
        first = scrape_node(cluster, "node2")
        before = value(first, "dpmigrate_ring_messages_total", stage="table", ring=table_in,
                       direction="in")  # fmt: skip
        assert before is not None and before > 0
        assert value(first, "dpmigrate_ring_bytes_total", stage="table", ring=table_in,
                     direction="in") >= before  # fmt: skip
        assert value(first, "dpmigrate_ring_capacity_messages", stage="table", ring=table_in,
                     direction="in") == 1024  # fmt: skip
        # gen runs on node1: not node2's to say
        assert value(first, "dpmigrate_ring_occupancy_messages", stage="gen") is None
        later: list[float] = []

        def grew() -> bool:
            samples = scrape_node(cluster, "node2")
            later[:] = [value(samples, "dpmigrate_ring_messages_total", stage="table",
                              ring=table_in, direction="in") or 0]  # fmt: skip
            return later[0] > before

        wait_until(grew, "table's input counter to grow", timeout=30, interval=0.2)
        on_gen = scrape_node(cluster, "node1")
        assert value(on_gen, "dpmigrate_ring_messages_total", stage="gen", ring=table_in,
                     direction="out") > 0  # fmt: skip

        # the state version is the one the status says, between the status before and after
        version_before = stage_status(run)["state_version"]
        samples = scrape_node(cluster, "node2")
        version_after = stage_status(run)["state_version"]
        scraped = value(samples, "dpmigrate_stage_state_version", stage="table", role="primary")
        assert scraped is not None and version_before <= scraped <= version_after
        assert value(samples, "dpmigrate_stage_cpu_seconds_total", stage="table") > 0
        assert value(samples, "dpmigrate_stage_resident_memory_bytes", stage="table") > 1 << 20
        assert value(samples, "dpmigrate_stage_epoch", stage="table") is not None
        assert value(samples, "dpmigrate_standby_lag_points") is None  # no standby here
        assert value(samples, "dpmigrate_stage_cgroup_cpu_seconds_total") is None  # no limits
        assert value(samples, "dpmigrate_stage_restarts_total", stage="table") == 0

        # a SIGKILLed stage: the kill happened, the restart is counted
        table = stage_status(run)
        os.kill(table["pid"], signal.SIGKILL)
        wait_until(lambda: not alive(table["pid"]), "the killed table to be gone", timeout=30)
        wait_until(lambda: stage_status(run).get("restarts") == 1
                   and stage_status(run).get("phase") == "running", "table's restart",
                   timeout=60, interval=0.05)  # fmt: skip
        assert stage_status(run)["pid"] != table["pid"]
        samples = scrape_node(cluster, "node2")
        assert value(samples, "dpmigrate_stage_restarts_total", stage="table") == 1
        assert value(samples, "dpmigrate_stage_running", stage="table") == 1

        # a stop-and-copy migration's phases and downtime, on its destination
        assert value(scrape_node(cluster, "node1"), "dpmigrate_migrations_total") is None
        wait_for_input(run, stage_status(run)["msgs_in"] + 2000)
        report = cluster.migrate("table", to="node1")
        assert not report.rolled_back, report.error
        on_dest = scrape_node(cluster, "node1")
        who = {"app": "flows", "stage": "table", "strategy": "stop-and-copy",
               "source": "node2", "outcome": "moved"}  # fmt: skip
        phases = {s.labels["phase"]: s.value for s in on_dest
                  if s.name == "dpmigrate_last_migration_phase_seconds"}  # fmt: skip
        assert phases == report.phases and set(phases) >= {"quiesce", "transfer", "restore"}
        assert report.downtime_s is not None
        downtime = value(on_dest, "dpmigrate_last_migration_downtime_seconds", **who)
        assert downtime == report.downtime_s
        duration = value(on_dest, "dpmigrate_last_migration_duration_seconds", **who)
        assert duration == report.total_time_s
        frozen = value(on_dest, "dpmigrate_last_migration_frozen_seconds", **who)
        assert frozen == report.frozen_time_s
        assert value(on_dest, "dpmigrate_migrations_total", strategy="stop-and-copy",
                     outcome="moved") == 1  # fmt: skip
        # and the histograms over every migration here: this one, in its buckets
        sac = {"strategy": "stop-and-copy"}
        assert value(on_dest, "dpmigrate_migration_downtime_seconds_count", **sac) == 1
        assert value(on_dest, "dpmigrate_migration_downtime_seconds_sum", **sac) == downtime
        assert bucket_of(on_dest, "dpmigrate_migration_downtime_seconds", **sac) == (
            smallest_bound_above(downtime))  # fmt: skip
        for phase, seconds in report.phases.items():
            assert value(on_dest, "dpmigrate_migration_phase_seconds_sum", phase=phase,
                         **sac) == pytest.approx(seconds)  # fmt: skip
            assert bucket_of(on_dest, "dpmigrate_migration_phase_seconds", phase=phase,
                             **sac) == smallest_bound_above(seconds)  # fmt: skip
        # the stage's own series moved with it
        assert value(on_dest, "dpmigrate_stage_running", stage="table") == 1
        on_source = scrape_node(cluster, "node2")
        assert value(on_source, "dpmigrate_stage_running", stage="table") is None
        assert value(on_source, "dpmigrate_migrations_total") is None  # not its destination

        # anything but GET /metrics is refused and changes nothing
        record = json.dumps({"last": {}, "counts": {"x moved": 99}}).encode()
        refused = in_node(cluster, "node1", lambda host: [
            request(host, PORT, "POST", "/metrics", record)[0],
            request(host, PORT, "PUT", "/metrics", record)[0],
            request(host, PORT, "DELETE", "/metrics")[0],
            request(host, PORT, "GET", "/metrics/../record")[0],
            request(host, PORT, "GET", "/")[0],
            raw_request(host, PORT, b"GET /metrics HTTP/1.0\r\nX: " + b"a" * 9000
                        + b"\r\n\r\n").split(b" ", 2)[1],
        ])  # fmt: skip
        assert refused == [405, 405, 405, 404, 404, b"431"], refused
        again = scrape_node(cluster, "node1")
        migration_series = {(s.name, tuple(sorted(s.labels.items())), s.value)
                            for s in on_dest if "migration" in s.name}  # fmt: skip
        assert migration_series == {(s.name, tuple(sorted(s.labels.items())), s.value)
                                    for s in again if "migration" in s.name}  # fmt: skip

        run.stop()
        run.cleanup()
        # after `cluster down` nothing holds an exporter's socket
        inodes = {}
        for node in cluster.nodes:
            inode = listening_inode(node.agent_pid, PORT)
            assert inode is not None and node.agent_pid in socket_holders(inode), node.name
            inodes[node.name] = (inode, node.agent_pid)
    finally:
        cluster.down()
    for name, (inode, pid) in inodes.items():
        assert not alive(pid), name
        assert socket_holders(inode) == [], name


def test_a_standbys_lag_is_served_by_its_node_and_its_gating_by_the_primarys(
    cluster_state_dir: Path, tmp_path: Path, metrics_port: int
) -> None:
    from dpmigrate.migrate import LocalCluster
    from dpmigrate.runtime.manifest import App
    from dpmigrate.runtime.multinode import MultiNodeRun

    path = paced_flows(tmp_path, 2_000_000, rate=5000)
    text = path.read_text().replace('entry = "stages:FlowTable"\nnode = "node2"',
                                    'entry = "stages:FlowTable"\nnode = "node2"\n'
                                    'standby = "node3"')  # fmt: skip
    assert 'standby = "node3"' in text
    path.write_text(text)
    with LocalCluster(3) as cluster:
        run = MultiNodeRun(app := App.load(path), cluster)
        run.start()
        try:

            def in_sync() -> bool:
                return any(s.get("node") == "node3" and s.get("in_sync")
                           for s in stage_status(run).get("standbys", []))  # fmt: skip

            wait_until(in_sync, "the standby in sync", timeout=60, interval=0.1)
            wait_for_input(run, 4000)
            on_primary = scrape_node(cluster, "node2")
            assert value(on_primary, "dpmigrate_standby_in_sync", stage="table",
                         standby="node3") == 1  # fmt: skip
            assert value(on_primary, "dpmigrate_standby_lag_points") is None  # not a replica
            replica = next(r for r in run.status(replicas=True) if r["name"] == "table")
            assert replica["lag"]["lag_points"] is not None, replica
            on_standby = scrape_node(cluster, "node3")
            standby = {"app": app.name, "stage": "table", "role": "standby"}
            points = value(on_standby, "dpmigrate_standby_lag_points", **standby)
            seconds = value(on_standby, "dpmigrate_standby_lag_seconds", **standby)
            assert points is not None and points >= 0 and seconds is not None and seconds >= 0
            assert value(on_standby, "dpmigrate_stage_state_version", **standby) > 0
            assert value(on_standby, "dpmigrate_stage_running", **standby) == 1
            assert value(on_standby, "dpmigrate_stage_running", stage="table",
                         role="primary") is None  # fmt: skip
        finally:
            run.stop()
            run.cleanup()


# -- the collector, on status files written by hand ----------------------------------------------
@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    return Agent("n1", TOKEN, tmp_path / "node", log=EventLog("warning", write=lambda _: None))


def _stage(agent: Agent, key: str, status: dict[str, Any] | None, **proc: Any) -> None:
    """A stage in the agent's supervisor (this test process stands in for its process)
    and its status file, as a stage host writes it."""
    name = key.partition("/")[2]
    run_dir = agent.run_dir / "runs" / "r1"
    (run_dir / "status").mkdir(parents=True, exist_ok=True)
    if status is not None:
        (run_dir / "status" / f"{name}.json").write_text(json.dumps(status))
    agent.supervisor.stages[key] = StageProcess(key, [], agent.run_dir / "log", **proc)
    agent.stage_args[key] = ("/m/app.toml", str(run_dir), "multi-node")


def _ring(name: str, role: str, **counts: int) -> dict[str, Any]:
    base = {"name": name, "transport": "tcp", "role": role, "capacity": 64, "messages": 0,
            "bytes": 0, "occupancy": 0, "reconnects": 0, "resent": 0,
            "duplicates_dropped": 0}  # fmt: skip
    return {**base, **counts}


def _scrape(service: metrics.MetricsService) -> list[Sample]:
    from prometheus_client.exposition import generate_latest

    return parse(generate_latest(service.registry).decode())


def test_the_collector_reads_status_files_and_makes_up_nothing(agent: Agent) -> None:
    service = metrics.register(agent, 0)
    _stage(agent, "flows/table", {"state_version": 41, "epoch": 3, "time": 1.5e9, "rings": [
        _ring("flows.gen.out-table.in", "consumer", messages=10, bytes=640, occupancy=2,
              reconnects=1, duplicates_dropped=3),
        _ring("flows.table.out-check.in", "producer", messages=9, bytes=576, resent=4),
    ], "standbys": [{"node": "n3", "in_sync": True}, {"node": "n4", "in_sync": False}]},
        adopted_pid=os.getpid(), restarts=2)  # fmt: skip
    _stage(agent, "flows/check", None, adopted_pid=os.getpid(), finished=True)
    _stage(agent, "flows/gen", {"state_version": 7}, adopted_pid=os.getpid(), moved=True)
    _stage(agent, "other/replica", {"state_version": 5, "lag": {"lag_points": 4,
                                                               "lag_s": 0.25}},
           adopted_pid=os.getpid())  # fmt: skip
    agent.roles["other/replica"] = "standby"
    _stage(agent, "other/fresh", {"state_version": 0, "lag": {"lag_points": None,
                                                             "lag_s": None}},
           adopted_pid=os.getpid())  # fmt: skip
    agent.roles["other/fresh"] = "target"
    samples = _scrape(service)
    ring_in = {"stage": "table", "ring": "flows.gen.out-table.in", "direction": "in"}
    ring_out = {"stage": "table", "ring": "flows.table.out-check.in", "direction": "out"}
    assert value(samples, "dpmigrate_ring_messages_total", **ring_in) == 10
    assert value(samples, "dpmigrate_ring_bytes_total", **ring_in) == 640
    assert value(samples, "dpmigrate_ring_occupancy_messages", **ring_in) == 2
    assert value(samples, "dpmigrate_ring_reconnects_total", **ring_in) == 1
    assert value(samples, "dpmigrate_ring_duplicates_dropped_messages_total", **ring_in) == 3
    assert value(samples, "dpmigrate_ring_resent_messages_total", **ring_in) is None
    assert value(samples, "dpmigrate_ring_resent_messages_total", **ring_out) == 4
    assert value(samples, "dpmigrate_ring_messages_total", **ring_out) == 9
    table = {"app": "flows", "stage": "table", "role": "primary"}
    assert value(samples, "dpmigrate_stage_state_version", **table) == 41
    assert value(samples, "dpmigrate_stage_epoch", **table) == 3
    assert value(samples, "dpmigrate_stage_restarts_total", **table) == 2
    assert value(samples, "dpmigrate_stage_status_timestamp_seconds", **table) == 1.5e9
    assert value(samples, "dpmigrate_stage_cpu_seconds_total", **table) > 0
    assert value(samples, "dpmigrate_stage_resident_memory_bytes", **table) > 0
    assert value(samples, "dpmigrate_standby_in_sync", stage="table", standby="n3") == 1
    assert value(samples, "dpmigrate_standby_in_sync", stage="table", standby="n4") == 0
    # a finished stage without a status: it is not running, and nothing else is said of it
    check = [s for s in samples if s.labels.get("stage") == "check"]
    assert {(s.name, s.value) for s in check} == {
        ("dpmigrate_stage_running", 0),
        ("dpmigrate_stage_restarts_total", 0),
    }
    # a stage that left this node is not this node's to report
    assert not [s for s in samples if s.labels.get("stage") == "gen"]
    # a replica's lag, where it has one; none made up where it has not
    assert value(samples, "dpmigrate_standby_lag_points", stage="replica", role="standby") == 4
    assert value(samples, "dpmigrate_standby_lag_seconds", stage="replica") == 0.25
    assert value(samples, "dpmigrate_standby_lag_points", stage="fresh") is None
    assert value(samples, "dpmigrate_standby_lag_points", stage="table") is None
    # no control group, no store, no migration: no such series
    names = {s.name for s in samples}
    assert not {n for n in names if "cgroup" in n or "migration" in n or "store" in n}, names
    assert value(samples, "dpmigrate_agent_info", node="n1", version=metrics.__version__) == 1
    assert value(samples, "dpmigrate_metrics_collect_errors_total") == 0
    assert value(samples, "process_cpu_seconds_total") > 0  # the agent process itself


def test_a_stage_with_a_control_group_shows_its_usage(agent: Agent) -> None:
    service = metrics.register(agent, 0)
    _stage(agent, "flows/table", {"state_version": 1}, adopted_pid=os.getpid(), ooms=1)

    class Usage:  # what StageProcess.resources() returns for a stage with a group
        def resources(self) -> dict[str, Any]:
            return {"group": "g", "usage": {"cpu_seconds": 1.25, "memory_bytes": 4096,
                                            "throttled_periods": 7,
                                            "throttled_seconds": 0.5}}  # fmt: skip

    agent.supervisor.stages["flows/table"].resources = Usage().resources  # type: ignore[method-assign]
    samples = _scrape(service)
    assert value(samples, "dpmigrate_stage_cgroup_cpu_seconds_total", stage="table") == 1.25
    assert value(samples, "dpmigrate_stage_cgroup_memory_bytes", stage="table") == 4096
    assert value(samples, "dpmigrate_stage_cgroup_throttled_periods_total") == 7
    assert value(samples, "dpmigrate_stage_cgroup_throttled_seconds_total") == 0.5
    assert value(samples, "dpmigrate_stage_oom_kills_total", stage="table") == 1


def test_a_broken_status_is_counted_and_logged_not_a_failed_scrape(tmp_path: Path) -> None:
    lines: list[str] = []
    agent = Agent("n1", TOKEN, tmp_path / "node", log=EventLog("warning", write=lines.append))
    service = metrics.register(agent, 0)
    _stage(agent, "flows/check", {"state_version": 2}, adopted_pid=os.getpid())
    _stage(agent, "flows/bad", {"state_version": 3, "rings": 5}, adopted_pid=os.getpid())
    for scrape in (1, 2):
        samples = _scrape(service)
        assert value(samples, "dpmigrate_stage_state_version", stage="check") == 2
        assert value(samples, "dpmigrate_metrics_collect_errors_total") == scrape
    problems = [json.loads(line) for line in lines if "metrics collection problem" in line]
    assert len(problems) == 1, lines  # logged once a minute at most, counted every time
    assert problems[0]["part"] == "flows/bad" and "TypeError" in problems[0]["error"]


# -- the migration record ------------------------------------------------------------------------
def _done(**change: Any) -> dict[str, Any]:
    base = {"app": "flows", "stage": "table", "strategy": "post-copy", "source": "node2",
            "outcome": "moved", "phases": {"quiesce": 0.03, "transfer": 0.2},
            "total_time_s": 1.1, "downtime_s": 0.4, "frozen_time_s": 0.1,
            "transferred_bytes": 4096, "ended_at": 1.7e9}  # fmt: skip
    return {**base, **change}


def test_migrations_recorded_here_are_exported_and_kept_across_agents(agent: Agent) -> None:
    service = metrics.register(agent, 0)
    ops = agent.operations
    assert ops.dispatch("record_migration", _done())["ok"] is True
    assert ops.dispatch("record_migration", _done(stage="gen", downtime_s=3.0,
                                                  phases={"quiesce": 0.07}))["ok"]  # fmt: skip
    assert ops.dispatch("record_migration", _done(outcome="rolled_back", downtime_s=None,
                                                  phases={"rollback": 0.5}))["ok"]  # fmt: skip
    samples = _scrape(service)
    last = {"stage": "table", "strategy": "post-copy", "outcome": "rolled_back"}
    name = "dpmigrate_last_migration_phase_seconds"
    assert value(samples, name, phase="rollback", **last) == 0.5
    assert value(samples, name, stage="table", phase="quiesce") is None  # the last one only
    assert value(samples, name, stage="gen", phase="quiesce") == 0.07
    assert value(samples, "dpmigrate_last_migration_downtime_seconds", **last) is None
    assert value(samples, "dpmigrate_last_migration_duration_seconds", **last) == 1.1
    assert value(samples, "dpmigrate_migrations_total", outcome="moved") == 2
    assert value(samples, "dpmigrate_migrations_total", outcome="rolled_back") == 1
    # the histograms: both moves, not the rollback
    pc = {"strategy": "post-copy"}
    assert value(samples, "dpmigrate_migration_downtime_seconds_count", **pc) == 2
    assert value(samples, "dpmigrate_migration_downtime_seconds_sum", **pc) == 3.4
    downtime = {s.labels["le"]: s.value for s in samples
                if s.name == "dpmigrate_migration_downtime_seconds_bucket"}  # fmt: skip
    assert (downtime["0.25"], downtime["0.5"], downtime["2.5"], downtime["5.0"],
            downtime["+Inf"]) == (0, 1, 1, 2, 2)  # fmt: skip
    assert value(samples, "dpmigrate_migration_phase_seconds_count", phase="quiesce") == 2
    assert value(samples, "dpmigrate_migration_phase_seconds_sum",
                 phase="quiesce") == pytest.approx(0.1)  # fmt: skip
    assert value(samples, "dpmigrate_migration_phase_seconds_count", phase="transfer") == 1
    assert value(samples, "dpmigrate_migration_phase_seconds_count", phase="rollback") is None
    assert value(samples, "dpmigrate_migration_duration_seconds_count", **pc) == 2
    # the next agent of this node reads the same record
    again = _scrape(metrics.register(Agent("n1", TOKEN, agent.run_dir), 0))
    assert value(again, "dpmigrate_migrations_total", outcome="moved") == 2
    assert value(again, "dpmigrate_migration_downtime_seconds_count", **pc) == 2
    assert value(again, name, stage="gen", phase="quiesce") == 0.07
    assert (agent.run_dir / RECORD).exists()


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        ({"outcome": "won"}, "not one of"),
        ({"phases": {"Quiesce!": 0.1}}, "not a phase name"),
        ({"phases": {"quiesce": -1}}, "not a duration"),
        ({"phases": {"quiesce": "fast"}}, "not a number"),
        ({"phases": {f"p{'a' * i}": 0.1 for i in range(20)}}, "at most"),
        ({"downtime_s": -0.5}, "never negative"),
        ({"stage": "../x"}, "not a name"),
        ({"strategy": "a b"}, "not a name"),
    ],
)
def test_a_bad_migration_record_is_refused_and_changes_nothing(
    agent: Agent, change: dict[str, Any], phrase: str
) -> None:
    service = metrics.register(agent, 0)
    reply = agent.operations.dispatch("record_migration", _done(**change))
    assert reply["ok"] is False and phrase in reply["error"], reply
    assert service.record.last() == [] and service.record.counts() == {}
    assert service.record.histograms() == {}
    assert not (agent.run_dir / RECORD).exists()


def test_a_damaged_record_file_starts_afresh(tmp_path: Path) -> None:
    path = tmp_path / RECORD
    path.write_text("{not json")
    record = MigrationRecord(path)
    assert record.last() == [] and record.counts() == {} and record.histograms() == {}
    path.write_text(
        json.dumps(
            {
                "last": {},
                "counts": {},
                "histograms": {"downtime post-copy": {"buckets": [1, 2], "sum": 0.5}},
            }
        )
    )  # other buckets: unusable
    assert MigrationRecord(path).histograms() == {}


def test_the_record_keeps_one_migration_per_stage_and_a_bounded_number(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dpmigrate.runtime import migration_record
    from dpmigrate.runtime.migration_record import MigrationDone

    monkeypatch.setattr(migration_record, "MAX_STAGES", 3)
    monkeypatch.setattr(migration_record, "MAX_KEYS", 4)
    record = MigrationRecord(tmp_path / RECORD)
    for i in range(5):
        record.add(MigrationDone(**_done(stage=f"s{i}", ended_at=1000.0 + i)))
    record.add(MigrationDone(**_done(stage="s4", ended_at=2000.0, strategy="statesync")))
    kept = {m["stage"]: m["strategy"] for m in record.last()}
    assert kept == {"s2": "post-copy", "s3": "post-copy", "s4": "statesync"}
    assert record.counts() == {("post-copy", "moved"): 5, ("statesync", "moved"): 1}
    # four histograms at most: post-copy's two phases, downtime and duration
    assert sorted(record.histograms()) == [("downtime", "post-copy"), ("duration", "post-copy"),
                                           ("phase", "post-copy", "quiesce"),
                                           ("phase", "post-copy", "transfer")]  # fmt: skip


# -- the endpoint -----------------------------------------------------------------------------------
@pytest.fixture
def server() -> Iterator[metrics_http.MetricsServer]:
    registry = CollectorRegistry(auto_describe=False)
    lines: list[str] = []
    srv = metrics_http.MetricsServer("127.0.0.1", _free_port(), registry,
                                     EventLog("debug", write=lines.append))  # fmt: skip
    srv.lines = lines  # type: ignore[attr-defined]
    assert srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_endpoint_serves_get_metrics_and_refuses_the_rest(
    server: metrics_http.MetricsServer,
) -> None:
    host, port = server.host, server.port
    status, body = request(host, port)
    assert (status, body) == (200, b"")  # an empty registry
    assert request(host, port, "GET", "/metrics?x=1")[0] == 200
    for method in ("POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "BREW"):
        assert request(host, port, method, "/metrics", b"x" * 100)[0] == 405, method
    for path in ("/", "/metrics/", "/favicon.ico", "/../metrics", "http://x/metrics"):
        assert request(host, port, "GET", path)[0] == 404, path
    answer = raw_request(host, port, b"GET /" + b"m" * 10000 + b" HTTP/1.0\r\n\r\n")
    assert answer.split(b" ", 2)[1] == b"414", answer[:80]
    answer = raw_request(host, port, b"GET /metrics HTTP/1.0\r\n" + b"X-A: b\r\n" * 2000
                         + b"\r\n")  # fmt: skip
    assert answer.split(b" ", 2)[1] == b"431", answer[:80]
    answer = raw_request(host, port, b"POST /metrics HTTP/1.0\r\nContent-Length: 99999999\r\n"
                         b"\r\n" + b"y" * 65536)  # fmt: skip
    assert answer.split(b" ", 2)[1] == b"405", answer[:80]
    assert request(host, port)[0] == 200  # still serving


def test_the_endpoint_serves_a_few_at_once_and_hangs_up_on_the_rest(
    server: metrics_http.MetricsServer,
) -> None:
    host, port = server.host, server.port
    idle = [socket.create_connection((host, port), timeout=10)
            for _ in range(metrics_http.MAX_CLIENTS)]  # fmt: skip
    try:
        for sock in idle:
            sock.sendall(b"GET /metr")  # and nothing more: each holds a slot

        def refused() -> bool:
            with socket.create_connection((host, port), timeout=10) as extra:
                try:
                    extra.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                    return extra.recv(100) == b""
                except (ConnectionResetError, BrokenPipeError):
                    return True

        wait_until(refused, "a connection beyond the slots to be hung up on", timeout=10)
    finally:
        for sock in idle:
            sock.close()

    def served() -> bool:
        try:
            return request(host, port)[0] == 200
        except (http.client.RemoteDisconnected, ConnectionResetError):
            return False  # the slots are not free yet: hung up on

    wait_until(served, "a slot to be free again", timeout=20, interval=0.05)


def test_a_failing_collector_is_a_500_and_the_endpoint_serves_on(
    server: metrics_http.MetricsServer,
) -> None:
    class Broken:
        def collect(self) -> Iterator[Any]:
            raise RuntimeError("boom")

    broken = Broken()
    server.registry.register(broken)  # type: ignore[arg-type]
    assert request(server.host, server.port)[0] == 500
    assert any('"metrics scrape failed"' in line and "boom" in line
               for line in server.lines)  # type: ignore[attr-defined]  # fmt: skip
    server.registry.unregister(broken)  # type: ignore[arg-type]
    assert request(server.host, server.port)[0] == 200


def test_a_taken_port_is_logged_and_stop_closes_the_port() -> None:
    lines: list[str] = []
    registry = CollectorRegistry(auto_describe=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = int(taken.getsockname()[1])
        second = metrics_http.MetricsServer("127.0.0.1", port, registry,
                                            EventLog("info", write=lines.append))  # fmt: skip
        assert second.start() is False
        assert any('"metrics not served"' in line and "DPMIGRATE_METRICS_PORT" in line
                   for line in lines)  # fmt: skip
        second.stop()  # nothing to stop: no error
    srv = metrics_http.MetricsServer("127.0.0.1", port, registry, EventLog("warning"))
    assert srv.start()
    assert request("127.0.0.1", port)[0] == 200
    srv.stop()
    with pytest.raises(ConnectionRefusedError):
        request("127.0.0.1", port)


def test_the_agent_starts_and_stops_its_exporter(tmp_path: Path) -> None:
    """The service the agent program registers: on at the port, off with the agent (and not
    there at all with port 0)."""
    port = _free_port()
    agent = Agent("n1", TOKEN, tmp_path / "node", log=EventLog("warning"))
    agent.services.append(metrics.register(agent, port))
    off = Agent("n2", TOKEN, tmp_path / "off", log=EventLog("warning"))
    off.services.append(metrics.register(off, 0))
    for service in (*agent.services, *off.services):
        service.start()
    status, body = request("127.0.0.1", port)
    assert status == 200 and b'dpmigrate_agent_info{node="n1"' in body
    done = threading.Event()
    threading.Thread(target=lambda: (agent.shutdown(), done.set()), daemon=True).start()
    assert done.wait(30)
    with pytest.raises(ConnectionRefusedError):
        request("127.0.0.1", port)
    off.shutdown()
