"""CRIU's network-lock table is removed by the dump's run id — that table only, never by a
name pattern — and what became of it is logged and reported.

CRIU names the table ``inet CRIU-<run id>`` (cut to its 32-byte buffer up to CRIU 4.2) and
records the run id in the dump's inventory.img and log. The real-CRIU tests dump a process in a
network namespace the test creates, beside tables that look like CRIU's but are not this
dump's; the fixtures remove those tables and the namespace whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import paced_flows, require, wait_for_input

from dpmigrate.checkpoint import criu_rpc
from dpmigrate.eventlog import EventLog
from dpmigrate.migrate import stage_checkpoint


def nft(netns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", f"--net={netns}", "--", "nft", *args], capture_output=True,
                          text=True, timeout=10, check=False)  # fmt: skip


@contextlib.contextmanager
def decoy_table(netns: str, name: str) -> Iterator[str]:
    """A table ``inet NAME`` in ``netns`` for the length of the block ("inet NAME")."""
    made = nft(netns, "add", "table", "inet", name)
    assert made.returncode == 0, made.stderr
    try:
        yield f"inet {name}"
    finally:
        nft(netns, "delete", "table", "inet", name)  # gone already if the test failed early


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace of this test (lo up), deleted with everything in it afterwards."""
    require("root", "criu", "netns", "nftables")
    name = f"dpmt-{os.getpid()}-lock"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10, capture_output=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=10,
                       capture_output=True)  # fmt: skip
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10, capture_output=True)


@pytest.fixture
def sleeper(netns: str) -> Iterator[int]:
    """A process tree in ``netns`` started as the supervisor starts stages; its inner PID."""
    proc = subprocess.Popen(
        ["nsenter", f"--net={netns}", "--", "unshare", "--pid", "--fork", "--kill-child",
         "setsid", "sleep", "120"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        close_fds=True, cwd="/",
    )  # fmt: skip
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        deadline = time.monotonic() + 5
        while not (pids := children.read_text().split()) or not _is_sleep(int(pids[0])):
            assert time.monotonic() < deadline, "the process did not start"
            time.sleep(0.01)
        yield int(pids[0])
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def _is_sleep(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "sleep"
    except OSError:
        return False


def test_a_dump_leaves_its_table_and_only_that_one_is_removed(
    netns: str, sleeper: int, tmp_path: Path
) -> None:
    with decoy_table(netns, f"CRIU-something-else-{os.getpid()}") as other:
        assert criu_rpc.network_lock_tables(netns) == [other]
        result = criu_rpc.dump(sleeper, tmp_path, netns=netns)  # not left running: locked
        run_id = result.criu_run_id
        assert len(run_id) == 36 and criu_rpc.run_id(None, result.log_file) == run_id
        [mine] = result.network_lock_tables
        assert mine in criu_rpc.network_lock_table(run_id)
        assert mine.startswith(f"inet CRIU-{run_id[:8]}")
        assert sorted(criu_rpc.network_lock_tables(netns)) == sorted([other, mine])
        # Named like a prefix of this dump's table: removal by pattern or prefix would take it.
        with decoy_table(netns, f"CRIU-{run_id[:8]}") as prefix:
            removed = criu_rpc.remove_network_lock(netns, run_id=run_id)
            assert removed.removed and removed.table == mine, removed
            assert sorted(criu_rpc.network_lock_tables(netns)) == sorted([other, prefix])
            again = criu_rpc.remove_network_lock(netns, run_id=run_id)
            assert again.outcome == "absent" and "nothing to remove" in str(again)
            assert sorted(criu_rpc.network_lock_tables(netns)) == sorted([other, prefix])


def test_a_left_running_dump_leaves_no_table_and_removal_says_so(
    netns: str, sleeper: int, tmp_path: Path
) -> None:
    result = criu_rpc.dump(sleeper, tmp_path, netns=netns, leave_running=True)
    assert result.criu_run_id and result.network_lock_tables == []
    outcome = criu_rpc.remove_network_lock(netns, run_id=result.criu_run_id)
    assert outcome.outcome == "absent" and outcome.ok, outcome


def test_a_stage_checkpoint_removes_its_own_table_and_reports_it(
    cluster_state_dir: Path, tmp_path: Path
) -> None:
    """Through the agent: `checkpoint` (the stage ends) removes the table of its dump from
    the node's namespace, not the look-alike beside it, and says so in its reply and log."""
    from dpmigrate.runtime.cluster import LocalCluster
    from dpmigrate.runtime.manifest import App
    from dpmigrate.runtime.multinode import MultiNodeRun

    app = App.load(paced_flows(tmp_path, 40000))
    with LocalCluster(3) as cluster:
        node = cluster.node("node2")
        netns = f"/run/netns/{node.netns}"
        run = MultiNodeRun(app, cluster)
        run.start()
        try:
            wait_for_input(run, 3000)
            with decoy_table(netns, f"CRIU-something-else-{os.getpid()}") as other:
                made = cluster.checkpoint("table", tmp_path / "table.bundle")
                lock = made["network_lock"]
                assert lock["outcome"] == "removed", lock
                assert lock["table"] in criu_rpc.network_lock_table(made["criu"]["criu_run_id"])
                assert criu_rpc.network_lock_tables(netns) == [other]
        finally:
            run.stop()
        events = [json.loads(line) for line in Path(node.log).read_text().splitlines()
                  if line.startswith("{")]  # fmt: skip
        [logged] = [e for e in events if e["event"].startswith("network lock")]
        assert logged["event"] == "network lock removed" and logged["level"] == "info"
        assert logged["table"] == lock["table"] and logged["stage"] == "flows/table"


# -- without root: what is reported ---------------------------------------------------------
def test_removal_that_cannot_happen_is_a_failure_with_its_reason() -> None:
    gone = criu_rpc.remove_network_lock("/run/netns/dpm-no-such-ns", run_id="0" * 36)
    assert gone.outcome == "failed" and not gone.ok and gone.detail
    assert "/run/netns/dpm-no-such-ns" in str(gone)
    unknown = criu_rpc.remove_network_lock(run_id="")
    assert unknown.outcome == "unknown" and not unknown.ok
    assert "no CRIU run id" in str(unknown)


def test_network_lock_table_names_are_exact() -> None:
    run_id = "73da2018-0f18-4911-91a0-c7983880dd22"
    assert criu_rpc.network_lock_table(run_id) == [
        "inet CRIU-73da2018-0f18-4911-91",  # CRIU 4.2: "inet CRIU-%s" in a 32-byte buffer
        f"inet CRIU-{run_id}",  # a CRIU that keeps the whole id
    ]
    for bad in ("", "a b"):
        with pytest.raises(ValueError):
            criu_rpc.network_lock_table(bad)


def test_run_id_from_the_log_when_there_is_no_inventory(tmp_path: Path) -> None:
    log = tmp_path / "dump.log"
    log.write_text("(00.000000) CRIU run id = 11111111-aaaa\n(00.000000) CRIU run id = "
                   "22222222-bbbb\n(00.001) pie: ...\n")  # fmt: skip
    assert criu_rpc.run_id(tmp_path, str(log)) == "22222222-bbbb"  # the session's, the last
    assert criu_rpc.run_id(tmp_path) == ""
    assert criu_rpc.run_id(None, str(tmp_path / "missing.log")) == ""


class _Agent:
    def __init__(self, log: EventLog) -> None:
        self.log = log


def test_an_agent_logs_a_lock_table_left_behind_as_a_warning() -> None:
    lines: list[str] = []
    agent = _Agent(EventLog("warning", write=lines.append, node="n1"))
    failed = criu_rpc.LockRemoval("abc", "", "failed", "inet CRIU-abc", "nft: Operation not "
                                  "permitted")  # fmt: skip
    absent = criu_rpc.LockRemoval("abc", "", "absent")
    assert stage_checkpoint.report_network_lock(agent, "a/s", failed)["outcome"] == "failed"  # type: ignore[arg-type]
    stage_checkpoint.report_network_lock(agent, "a/s", absent)  # type: ignore[arg-type]
    [event] = [json.loads(line) for line in lines]  # absent is info: below this agent's level
    assert event["event"] == "network lock failed" and event["level"] == "warning"
    assert event["table"] == "inet CRIU-abc" and "Operation not permitted" in event["detail"]
    assert event["node"] == "n1" and event["stage"] == "a/s"
