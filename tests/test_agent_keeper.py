"""The agent keeper (dpmigrate.runtime.agent_keeper): a killed agent comes back by itself.

The probe found that a destination agent killed mid-migration stayed dead: every later
`migrate` and `stop` failed until `cluster down`. Now each node's agent runs under a keeper.

* The keeper alone, with tiny fake children (real processes that exit or get killed): its
  backoff and give-up, its restart after a signal, SIGTERM forwarded, status 0 ending it.
* A local cluster: an agent SIGKILLed while its node runs a stage under traffic is back within
  seconds, the stage runs on untouched (same PID) and is in the new agent's status; a later
  `dpmigrate migrate` and `dpmigrate stop` work; the checker counts nothing lost or duplicated.
* An agent killed mid-migration (destination, then source): the migration completes or rolls
  back, and a migration of the same stage right after succeeds with nobody's help.

Each fault test first shows that its fault happened (the old agent's PID is gone).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import (
    alive,
    checker_of,
    paced_flows,
    reference_checker,
    require,
    run_cli,
    stage_status,
    wait_for_input,
    wait_until,
)

from dpmigrate.agentd import _agent_options
from dpmigrate.errors import DpmigrateError
from dpmigrate.migrate import LocalCluster, Migration
from dpmigrate.runtime.agent_keeper import Policy, read_state
from dpmigrate.runtime.manifest import App
from dpmigrate.runtime.multinode import MultiNodeRun

TOTAL = 60000
RATE = 8000

# -- the keeper alone -----------------------------------------------------------------------

#: Runs a Keeper with a small policy around the command given after the state file.
_KEEPER = (
    "import sys\n"
    "from dpmigrate.eventlog import EventLog\n"
    "from dpmigrate.runtime.agent_keeper import Keeper, Policy\n"
    "policy = Policy(max_restarts=3, window_s=30, first_delay_s=0.05, max_delay_s=0.2)\n"
    "sys.exit(Keeper(sys.argv[2:], sys.argv[1], EventLog('info'), policy).run())\n"
)


def _keeper(state: Path, *child: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _KEEPER, str(state), *child],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _events(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _finish(keeper: subprocess.Popen[str], state: Path) -> tuple[int, list[dict]]:
    """Wait for the keeper (bounded); if it hangs, kill it and its child (in a session of its
    own, so not killed with it), whose PID its state file names: nothing left behind."""
    try:
        out, _ = keeper.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        keeper.kill()
        keeper.communicate()
        child = (read_state(state) or {}).get("agent_pid")
        if child and alive(child):
            os.kill(child, signal.SIGKILL)
        raise
    return keeper.returncode, _events(out)


def test_policy_backs_off_doubling_to_its_bound() -> None:
    policy = Policy(max_restarts=5, window_s=60, first_delay_s=0.1, max_delay_s=2.0)
    assert [policy.delay(n) for n in range(7)] == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]


def test_the_agent_gets_the_keepers_arguments_without_its_own() -> None:
    """And ``--isolate`` as ``--isolated``: the keeper made the node's view, the agent uses it."""
    argv = ["--keep", "--node", "n1", "--keep-file", "/x/k.json", "--isolate", "--keep-file=/y"]
    assert _agent_options(argv) == ["--node", "n1", "--isolated"]


def test_a_crash_loop_is_given_up_after_the_bounded_restarts(tmp_path: Path) -> None:
    """A child that always fails: restarted 3 times (the policy's bound), with growing delays,
    then the keeper gives up, says why, and exits with the child's status."""
    state = tmp_path / "keeper.json"
    t0 = time.monotonic()
    code, events = _finish(_keeper(state, "/bin/sh", "-c", "exit 3"), state)
    took = time.monotonic() - t0
    assert code == 3, events
    names = [e["event"] for e in events]
    assert names.count("agent started by keeper") == 4, names  # the first start + 3 restarts
    died = [e for e in events if e["event"] == "agent died; restarting it"]
    assert [e["in_s"] for e in died] == [0.05, 0.1, 0.2], died
    assert all(e["level"] == "warning" and e["exit"] == "status 3" for e in died), died
    gave_up = events[-1]
    assert gave_up["event"] == "agent keeper gave up" and gave_up["level"] == "error", events
    assert "4 times within 30 s" in gave_up["reason"], gave_up
    final = read_state(state)
    assert final is not None and final["state"] == "gave up" and final["restarts"] == 3, final
    assert took < 10, took  # 0.35 s of delays: bounded, not a loop


def test_a_killed_child_is_restarted_and_sigterm_is_forwarded(tmp_path: Path) -> None:
    """SIGKILL the child: a new one starts (new PID in the state file). SIGTERM the keeper: the
    child gets it and exits 0, and so does the keeper, restarting nothing."""
    state = tmp_path / "keeper.json"
    ready = tmp_path / "ready"
    child = (
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
        f"open({str(ready)!r} + str(os.getpid()), 'w').close()\n"
        "time.sleep(60)\n"
    )
    keeper = _keeper(state, sys.executable, "-c", child)
    children: list[int] = []

    def child_ready() -> int | None:
        pid = (read_state(state) or {}).get("agent_pid")
        return pid if pid and Path(f"{ready}{pid}").exists() else None

    try:
        wait_until(child_ready, "the first child", 10, 0.01)
        first = child_ready()
        assert first is not None
        children.append(first)
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: child_ready() not in (None, first), "a new child", 10, 0.01)
        assert not alive(first)  # the fault happened
        second = child_ready()
        assert second is not None and alive(second)
        children.append(second)
        assert (read_state(state) or {}).get("restarts") == 1
        keeper.send_signal(signal.SIGTERM)
        code, events = _finish(keeper, state)
    finally:
        if keeper.poll() is None:
            keeper.kill()
            keeper.communicate()
        for pid in children:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert code == 0, events
    names = [e["event"] for e in events]
    assert "forwarding a signal to the agent" in names, names
    assert names[-1] == "agent exited; keeper stops", names
    assert events[-1]["exit"] == "status 0" and events[-1]["restarts"] == 1, events[-1]
    assert not alive(second)
    assert (read_state(state) or {}).get("state") == "stopped"


# -- a local cluster ------------------------------------------------------------------------


def _cluster_gate() -> None:
    require("root", "netns", "etcd", "criu", "nftables")


def _ping(cluster: LocalCluster, node: str) -> int | None:
    """The PID of the agent that answers on ``node``'s socket now (None: nobody answers)."""
    try:
        with cluster.client(node, timeout=1) as agent:
            return int(agent.call("ping")["pid"])
    except DpmigrateError:
        return None


def _back(cluster: LocalCluster, node: str, killed: int) -> tuple[int, float]:
    """Wait (bounded) until a new agent answers on ``node``: its PID and the seconds it took."""
    t0 = time.monotonic()
    wait_until(lambda: _ping(cluster, node) not in (None, killed), f"{node}'s new agent", 30,
               0.01)  # fmt: skip
    pid = _ping(cluster, node)
    assert pid is not None and pid != killed
    return pid, time.monotonic() - t0


def _stages_on(cluster: LocalCluster, node: str) -> dict[str, int]:
    with cluster.client(node) as agent:
        return {s["name"]: s["pid"] for s in agent.call("status")["stages"]
                if not s.get("finished") and s.get("pid")}  # fmt: skip


def test_a_killed_agent_is_back_with_its_stages_and_the_cluster_works(
    cluster_state_dir: Path, tmp_path: Path
) -> None:
    _cluster_gate()
    app = App.load(paced_flows(tmp_path, TOTAL, rate=RATE))
    expected = reference_checker(app)
    with LocalCluster(4) as cluster:
        run = MultiNodeRun(app, cluster)
        run.start()
        try:
            wait_for_input(run, 3000)
            keeper = cluster.node("node2").keeper_pid
            old = cluster.node("node2").agent_pid
            assert keeper is not None and old is not None and keeper != old
            stages = _stages_on(cluster, "node2")
            assert "table" in stages, stages
            os.kill(old, signal.SIGKILL)
            killed_at = time.monotonic()
            wait_until(lambda: not alive(old), "the agent's death", 5, 0.005)  # it happened
            new, _ = _back(cluster, "node2", old)
            back_s = time.monotonic() - killed_at
            print(f"kill -9 of node2's agent to a new agent answering: {back_s:.2f} s")
            assert back_s < 10, back_s
            assert alive(keeper) and cluster.node("node2").keeper_pid == keeper
            assert cluster.node("node2").agent_pid == new
            # the stages ran on through it, untouched, and the new agent has them
            assert _stages_on(cluster, "node2") == stages
            assert all(alive(pid) for pid in stages.values())
            before = stage_status(run)["msgs_in"]
            wait_for_input(run, before + 2000)  # still taking in traffic
            row = next(n for n in cluster.status()["nodes"] if n["name"] == "node2")
            assert row["alive"] and row["agent_pid"] == new and row["agent_restarts"] == 1, row
            assert row["agent_last_exit"] == "signal SIGKILL" and row["keeper_running"], row
            # a later migrate, from another process (its record still names the dead agent)
            moved = run_cli("migrate", "flows/table", "--to", "node4", "--json", timeout=180)
            report = json.loads(moved.stdout or "{}")
            assert moved.returncode == 0, (report.get("error"), moved.stderr)
            assert report["lost"] == 0 and report["duplicated"] == 0, report
            assert stage_status(run)["node"] == "node4"
            assert run.wait(duration=120), run.status()
        finally:
            run.stop()
        stages_now = run.status()
        assert checker_of(stages_now) == {
            "received": TOTAL, "lost": 0, "duplicated": 0, "digest": expected["digest"],
        }  # fmt: skip
        stopped = run_cli("stop", "flows", "--json", timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        assert any(s.startswith("node2:") for s in json.loads(stopped.stdout)["stopped"]), stopped
        removed = cluster.down()
    assert any(r.startswith("agent keeper node2") for r in removed), removed
    assert any(r == f"agent node2 (pid {new})" for r in removed), removed
    assert not alive(keeper) and not alive(new)


@pytest.mark.parametrize("victim", ["destination", "source"])
def test_an_agent_killed_mid_migration_heals_and_the_next_migration_works(
    cluster_state_dir: Path, tmp_path: Path, victim: str
) -> None:
    """The destination's agent killed as the restore starts, or the source's once it has
    dumped: the migration completes or rolls back cleanly; the keeper brought the agent back;
    a migration of the same stage right after succeeds; nothing lost, nothing duplicated."""
    _cluster_gate()
    app = App.load(paced_flows(tmp_path, TOTAL, rate=RATE))
    expected = reference_checker(app)
    node = "node4" if victim == "destination" else "node2"
    killed: list[int] = []

    def kill() -> None:
        pid = cluster.node(node).agent_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    with LocalCluster(4) as cluster:
        run = MultiNodeRun(app, cluster)
        run.start()
        try:
            wait_for_input(run, 3000)
            first = Migration(
                cluster, "table", "node4",
                on_phase=lambda p: kill() if victim == "destination" and p == "restore" else None,
                on_step=lambda s: kill() if victim == "source" and s == "dumped" else None,
                flow_timeout=3.0,
            ).run()  # fmt: skip
            assert killed, "the agent was never killed"
            assert not alive(killed[0])  # the fault happened
            print(f"{victim} agent killed: rolled back={first.rolled_back} ({first.error}); "
                  f"steps {first.rollback_steps}")  # fmt: skip
            assert first.rollback_failures == [], first
            assert first.lost == 0 and first.duplicated == 0, first
            new, _ = _back(cluster, node, killed[0])
            assert cluster.node(node).agent_pid == new
            where = stage_status(run)
            assert where.get("phase") == "running", where
            assert where["node"] == ("node2" if first.rolled_back else "node4"), (first, where)
            # nobody did anything: the same stage migrates again
            again = Migration(cluster, "table", "node4" if where["node"] == "node2" else "node2",
                              flow_timeout=3.0).run()  # fmt: skip
            assert not again.rolled_back, again
            assert again.lost == 0 and again.duplicated == 0, again
            assert run.wait(duration=120), run.status()
        finally:
            run.stop()
        assert checker_of(run.status()) == {
            "received": TOTAL, "lost": 0, "duplicated": 0, "digest": expected["digest"],
        }  # fmt: skip
        run.cleanup()


def test_a_stage_that_died_while_no_agent_watched_is_restarted_from_its_journal(
    cluster_state_dir: Path, tmp_path: Path
) -> None:
    """The keeper paused (SIGSTOP) so the killed agent stays dead; the stage is killed then;
    when the keeper goes on, the new agent finds the stage gone while it was working and
    starts it from its journal: the stream loses and duplicates nothing."""
    _cluster_gate()
    app = App.load(paced_flows(tmp_path, TOTAL, rate=RATE))
    expected = reference_checker(app)
    with LocalCluster(3) as cluster:
        run = MultiNodeRun(app, cluster)
        run.start()
        try:
            wait_for_input(run, 3000)
            keeper = cluster.node("node2").keeper_pid
            old = cluster.node("node2").agent_pid
            assert keeper is not None and old is not None
            table = _stages_on(cluster, "node2")["table"]
            os.kill(keeper, signal.SIGSTOP)
            try:
                os.kill(old, signal.SIGKILL)
                wait_until(lambda: not alive(old), "the agent's death", 5, 0.005)
                os.kill(table, signal.SIGKILL)
                wait_until(lambda: not alive(table), "the stage's death", 5, 0.005)
                assert _ping(cluster, "node2") is None  # nobody watches node2 now
            finally:
                os.kill(keeper, signal.SIGCONT)
            _back(cluster, "node2", old)
            wait_until(lambda: _stages_on(cluster, "node2").get("table") not in (None, table),
                       "the table stage to be started again", 30, 0.05)  # fmt: skip
            assert run.wait(duration=120), run.status()
        finally:
            run.stop()
        assert checker_of(run.status()) == {
            "received": TOTAL, "lost": 0, "duplicated": 0, "digest": expected["digest"],
        }  # fmt: skip
