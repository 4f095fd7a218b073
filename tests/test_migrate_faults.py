"""A real fault in every phase of a migration (issue 11): each test first shows that its fault
happened, then that the migration rolled back and the stage runs on where it should, with
nothing lost or duplicated at a checker on a node the fault did not touch.

The app: gen on node1, table on node2, check on node3; table migrates to node4, which holds
nothing else, so every ring stays tcp and no peer has to sleep.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from support import (
    checker_of,
    in_mount_ns,
    paced_flows,
    reference_checker,
    stage_status,
    wait_for_input,
    wait_until,
)

from dpmigrate.cli_migrate import exit_status
from dpmigrate.cluster import nodefs
from dpmigrate.migrate import LocalCluster, Migration, MigrationReport
from dpmigrate.migrate.stage_transfer import PULL_TIMEOUT_S
from dpmigrate.runtime.manifest import App
from dpmigrate.runtime.multinode import MultiNodeRun

TOTAL = 60000


def _link(cluster: LocalCluster, node: str, state: str) -> None:
    subprocess.run(["ip", "-n", cluster.node(node).netns, "link", "set", "eth0", state],
                   check=True, timeout=10)  # fmt: skip


def _in_agent_mount_ns(cluster: LocalCluster, node: str, *cmd: str) -> None:
    done = in_mount_ns(cluster.node(node).agent_pid, *cmd)
    assert done.returncode == 0, (cmd, done.stderr)


class Faults:
    """The fault of one test, with what it takes to prove it happened and to heal it."""

    def __init__(self, cluster: LocalCluster, state_dir: Path) -> None:
        self.cluster = cluster
        self.state_dir = state_dir
        self.happened: list[str] = []
        self.heal: list[Callable[[], None]] = []
        self.migration: Migration | None = None

    def run_heal(self) -> None:
        while self.heal:
            self.heal.pop()()


def _inject(kind: str, faults: Faults, run: MultiNodeRun) -> tuple[Callable, Callable]:
    """(on_phase, on_step) hooks that inject ``kind`` at its moment."""
    cluster = faults.cluster

    def on_phase(phase: str) -> None:
        if kind == "preflight: etcd paused" and phase == "preflight":
            pid = cluster.status()["store"]["pid"]
            os.kill(pid, signal.SIGSTOP)
            faults.heal.append(lambda: os.kill(pid, signal.SIGCONT))
            faults.happened.append(f"etcd {pid} stopped")
        if kind == "quiesce: stage killed" and phase == "quiesce":
            pid = stage_status(run)["pid"]
            os.kill(pid, signal.SIGKILL)
            faults.happened.append(f"table {pid} killed")
        if kind == "transfer: image filesystem full" and phase == "transfer":
            # a 64 KiB tmpfs where the destination's agent keeps migrations (its own view)
            folder = str(nodefs.node_dir(str(faults.state_dir)) / "migrations")
            _in_agent_mount_ns(cluster, "node4", "mkdir", "-p", folder)
            _in_agent_mount_ns(cluster, "node4", "mount", "-t", "tmpfs", "-o", "size=64k",
                               "dpm-test-full", folder)  # fmt: skip
            faults.heal.append(lambda: _in_agent_mount_ns(cluster, "node4", "umount", folder))
            faults.happened.append("node4's migrations folder is a 64 KiB tmpfs")
        if kind == "restore: image removed after verification" and phase == "restore":
            m = faults.migration
            assert m is not None and m.destination_bundle is not None
            inventory = (
                cluster.host_path("node4", m.destination_bundle) / "images" / "inventory.img"
            )
            inventory.unlink()
            faults.happened.append(str(inventory))
        if kind == "restore: destination agent killed" and phase == "restore":
            os.kill(cluster.node("node4").agent_pid, signal.SIGKILL)
            faults.happened.append("node4's agent killed")
        if kind == "reconnect: destination link cut" and phase == "reconnect":
            _link(cluster, "node4", "down")
            faults.heal.append(lambda: _link(cluster, "node4", "up"))
            faults.happened.append("node4's eth0 down")
        if kind.startswith("verify: restored stage hangs") and phase == "verify":
            # SIGSTOP, not SIGKILL: a killed copy is restarted from its journal by its agent
            # (a recovery, not a fault); a hung one lets no message through
            # once the copy has taken in (and acknowledged) inputs of its own: the rollback must
            # then carry its committed point back to the source (upstream forgot those inputs)
            def copy_on_node4() -> dict:
                with cluster.client("node4") as agent:
                    return next(s for s in agent.call("status")["stages"] if s["name"] == "table")

            start = copy_on_node4().get("msgs_in", 0)
            wait_until(lambda: copy_on_node4().get("msgs_in", 0) > start + 500,
                       "the copy on node4 to work", 10)  # fmt: skip
            mine = copy_on_node4()
            os.kill(mine["pid"], signal.SIGSTOP)
            faults.happened.append(f"restored table {mine['pid']} stopped")

    def on_step(step: str) -> None:
        if kind == "transfer: source agent killed" and step == "dumped":
            pid = cluster.node("node2").agent_pid
            os.kill(pid, signal.SIGKILL)  # the sleeping source now has nobody to wake it
            faults.happened.append(f"node2's agent {pid} killed")
        if kind == "transfer: source link cut" and step == "dumped":
            # cut for longer than the pull waits (PULL_TIMEOUT_S): the pull fails and the
            # migration rolls back; the source can wake (and reach its peers) only once the
            # link is back, which the rollback's wake waits for
            _link(cluster, "node2", "down")
            faults.happened.append("node2's eth0 down")
            timer = threading.Timer(PULL_TIMEOUT_S + 1.5, _link, (cluster, "node2", "up"))
            timer.start()
            faults.heal.append(timer.join)

    return on_phase, on_step


FAULTS = [
    "preflight: etcd paused",
    "quiesce: stage killed",
    "transfer: source link cut",
    "transfer: source agent killed",
    "transfer: image filesystem full",
    "restore: image removed after verification",
    "restore: destination agent killed",
    "reconnect: destination link cut",
    "verify: restored stage hangs",
    "verify: restored stage hangs (post-copy)",
]


@pytest.mark.parametrize("kind", FAULTS)
def test_a_fault_in_each_phase_rolls_back_and_the_pipeline_runs_on(
    cluster_state_dir: Path, tmp_path: Path, kind: str
) -> None:
    app = App.load(paced_flows(tmp_path, TOTAL, rate=8000))
    expected = reference_checker(app)
    phase = kind.split(":")[0]
    with LocalCluster(4) as cluster:
        faults = Faults(cluster, cluster_state_dir)
        run = MultiNodeRun(app, cluster)
        run.start()
        try:
            wait_for_input(run, 3000)
            on_phase, on_step = _inject(kind, faults, run)
            strategy = "post-copy" if "post-copy" in kind else "stop-and-copy"
            migration = Migration(cluster, "table", "node4", strategy, on_phase=on_phase,
                                  on_step=on_step, flow_timeout=3.0)  # fmt: skip
            faults.migration = migration
            report: MigrationReport = migration.run()
            assert faults.happened, f"the fault {kind!r} was never injected"
            faults.run_heal()
            assert report.rolled_back, report
            assert report.error.startswith(f"{phase}: "), report.error
            assert "\n" not in report.error
            assert report.rollback_steps or phase == "preflight", report
            if "agent killed" in kind:  # the rollback started the agent again
                node = "node4" if "destination" in kind else "node2"
                assert f"ok: restarted the agent of {node}" in report.rollback_steps, report
            assert report.rollback_failures == [], report.rollback_failures
            if kind == "quiesce: stage killed":  # noticed at once, not after the phase timeout
                # (killed as the phase starts: dead before the request, or while it waits)
                noticed = ("exited before it was quiesced", "is not running on node")
                assert any(x in report.error for x in noticed), report.error
            if phase == "verify":
                handed = [x for x in report.rollback_steps if "committed point back" in x]
                assert handed and handed[0].startswith("ok: "), report.rollback_steps
            table = stage_status(run)
            assert table["node"] == "node2" and table["phase"] == "running", (report, table)
            assert cluster.store().placement("flows", "table").node == "node2"
            wait_for_input(run, table["msgs_in"] + 2000)  # it works again, there
            assert run.wait(duration=120), run.status()
        finally:
            faults.run_heal()
            run.stop()
        assert report.lost == 0 and report.duplicated == 0, report
        stages = {s["name"]: s for s in run.status()}
        assert stages["check"]["node"] == "node3"  # the checker's node was never touched
        assert checker_of(list(stages.values())) == {
            "received": TOTAL, "lost": 0, "duplicated": 0, "digest": expected["digest"],
        }  # fmt: skip
        run.cleanup()


def test_sigint_during_a_migration_rolls_back_and_exits_1(
    cluster_state_dir: Path, tmp_path: Path
) -> None:
    """Ctrl-C while `dpmigrate migrate` runs: before the point of no return it rolls back,
    prints the report and exits 1; the stage runs on its source."""
    app = App.load(paced_flows(tmp_path, TOTAL, rate=8000))
    expected = reference_checker(app)
    with LocalCluster(4) as cluster:
        run = MultiNodeRun(app, cluster)
        run.start()
        try:
            wait_for_input(run, 3000)
            env = {**os.environ, "DPMIGRATE_STATE_DIR": str(cluster_state_dir)}
            cli = subprocess.Popen(
                [str(Path(sys.executable).with_name("dpmigrate")), "migrate", "flows/table",
                 "--to", "node4", "--json"],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            # the fault: SIGINT once the stage sleeps (quiesced, so mid-migration)
            wait_until(lambda: stage_status(run).get("phase") == "quiesced" or cli.poll() is not None,
                       "the stage to be quiesced", 30)  # fmt: skip
            assert cli.poll() is None, "the migration ended before it could be interrupted"
            cli.send_signal(signal.SIGINT)
            out, err = cli.communicate(timeout=120)
            assert cli.returncode == 1, (cli.returncode, err, out)
            report = json.loads(out)
            assert report["rolled_back"] and "interrupted by SIGINT" in report["error"], report
            assert report["rollback_failures"] == []
            wait_until(lambda: stage_status(run).get("phase") == "running", "table running", 10)
            table = stage_status(run)
            assert table["node"] == "node2", table
            assert run.wait(duration=120), run.status()
        finally:
            run.stop()
        assert checker_of(run.status()) == {
            "received": TOTAL, "lost": 0, "duplicated": 0, "digest": expected["digest"],
        }  # fmt: skip
        run.cleanup()


def test_exit_status_2_when_the_rollback_cannot_undo_everything(
    cluster_state_dir: Path, tmp_path: Path
) -> None:
    """etcd stops answering, then the migration fails in verify: the placement cannot be put
    back, so the woken source finds itself placed elsewhere and stops. The report says exactly
    that, and `dpmigrate migrate` would exit 2."""
    app = App.load(paced_flows(tmp_path, TOTAL, rate=8000))
    with LocalCluster(4) as cluster:
        run = MultiNodeRun(app, cluster)
        run.start()
        etcd = cluster.status()["store"]["pid"]
        try:
            wait_for_input(run, 3000)
            happened = []

            def fault(phase: str) -> None:
                if phase == "verify":
                    os.kill(etcd, signal.SIGSTOP)
                    with cluster.client("node4") as agent:
                        copy = next(s for s in agent.call("status")["stages"]
                                    if s["name"] == "table")  # fmt: skip
                    os.kill(copy["pid"], signal.SIGSTOP)
                    happened.append(copy["pid"])

            report = Migration(cluster, "table", "node4", on_phase=fault, flow_timeout=2.0).run()
            assert happened, "the fault was never injected"
            assert report.rolled_back and report.rollback_failures, report
            assert any("place flows/table back on node2" in f for f in report.rollback_failures)
            assert any("etcd is unreachable" in f for f in report.rollback_failures)
            assert exit_status(report) == 2  # what `dpmigrate migrate` exits with then
        finally:
            os.kill(etcd, signal.SIGCONT)
            run.stop()
