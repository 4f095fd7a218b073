"""The local cluster: real namespaces, veths and agents; and nothing left behind, ever.

Each test compares what the host has before and after (namespaces, interfaces in the host's
namespace, processes, files), because leaking a namespace or an agent is the failure that
matters most here: it breaks the next run and the developer's machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import require, run_cli

from dpmigrate.errors import ConfigError, DpmigrateError, EnvironmentProblem
from dpmigrate.runtime import cluster as cluster_mod
from dpmigrate.runtime.cluster import LocalCluster, clean

# Until dpmigrate.cli registers the group, run it through the real main group this way.
_WRAPPER = (
    "from dpmigrate.cli import main; from dpmigrate.cli_cluster import cluster, clean; "
    "main.add_command(cluster); main.add_command(clean); main()"
)


def _registered() -> bool:
    from dpmigrate.cli import main

    return "cluster" in main.commands and "clean" in main.commands


def cli(
    *args: str, as_nobody: bool = False, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `dpmigrate ARGS` as a user would (optionally as the unprivileged user nobody)."""
    if not as_nobody and _registered():
        return run_cli(*args, timeout=timeout)
    exe = os.path.join(os.path.dirname(sys.executable), "dpmigrate")
    cmd = [exe, *args] if _registered() else [sys.executable, "-c", _WRAPPER, *args]
    if as_nobody:
        if shutil.which("setpriv"):
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        else:
            cmd = ["runuser", "-u", "nobody", "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def _host_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    return {line.split(":")[1].strip().split("@")[0] for line in out.stdout.splitlines()}


def _host_addrs() -> str:
    return subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it was our child
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def _snapshot(state_dir: Path) -> dict[str, object]:
    cdir = state_dir / "cluster"
    files = sorted(str(p) for p in cdir.rglob("*")) if cdir.exists() else []
    return {"netns": _netns(), "links": _host_links(), "files": files}


def _assert_gone(before: dict[str, object], state_dir: Path, pids: list[int]) -> None:
    after = _snapshot(state_dir)
    assert after["netns"] == before["netns"], "namespaces left behind"
    assert after["links"] == before["links"], "interfaces left in the host namespace"
    assert after["files"] == [], f"files left behind: {after['files']}"
    assert not (state_dir / "logs").exists() or not any((state_dir / "logs").iterdir())
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not [p for p in pids if _alive(p)], "agent processes left behind"


@pytest.fixture
def state_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A short private DPMIGRATE_STATE_DIR (unix socket paths are limited to 107 bytes)."""
    require("root", "netns")
    path = Path(tempfile.mkdtemp(prefix="dpm-cl-"))
    monkeypatch.setenv("DPMIGRATE_STATE_DIR", str(path))
    monkeypatch.delenv("DPMIGRATE_TOKEN", raising=False)
    try:
        yield path
    finally:
        clean(str(path))  # whatever the test did or failed to do
        shutil.rmtree(path, ignore_errors=True)


def test_up_then_down_leaves_nothing(state_dir: Path) -> None:
    before = _snapshot(state_dir)
    lc = LocalCluster(3)
    lc.up()
    try:
        assert len(_netns() - before["netns"]) == 4  # hub + 3 nodes
        assert _host_links() == before["links"], "up() created an interface in the host"
        assert "10.213.0." not in _host_addrs()
        pids = [n.agent_pid for n in lc.nodes]
        assert all(isinstance(p, int) and _alive(p) for p in pids)
        assert (state_dir / "cluster" / "cluster.json").stat().st_mode & 0o777 == 0o600
    finally:
        removed = lc.down()
    assert any(r.startswith("agent node1") for r in removed)
    _assert_gone(before, state_dir, pids)
    assert lc.down() == []  # idempotent
    assert clean(str(state_dir)) == []


def test_cli_up_status_down(state_dir: Path) -> None:
    before = _snapshot(state_dir)
    up = cli("cluster", "up", "--nodes", "2", "--json")
    assert up.returncode == 0, up.stderr
    pids = [n["agent_pid"] for n in json.loads(up.stdout)["nodes"]]
    # `cluster up` returned; the agents must outlive it.
    status = cli("cluster", "status", "--json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["healthy"] and [n["name"] for n in data["nodes"]] == ["node1", "node2"]
    assert all(n["alive"] and n["agent_pid"] in pids for n in data["nodes"])
    down = cli("cluster", "down", "--json")
    assert down.returncode == 0, down.stderr
    assert any(r.startswith("netns ") for r in json.loads(down.stdout)["removed"])
    _assert_gone(before, state_dir, pids)
    gone = cli("cluster", "status")
    assert gone.returncode == 1
    assert "no cluster is up; run `dpmigrate cluster up`" in gone.stderr


def test_nodes_reach_each_other_over_the_veths(state_dir: Path) -> None:
    with LocalCluster(3) as lc:
        for node in lc.nodes:
            with lc.client(node.name) as c:
                assert c.call("ping")["node"] == node.name
        # A registration on node1 is pushed over TCP 10.213.0.1 -> 10.213.0.3 through the
        # bridge; node3 answers the lookup from its own registry.
        endpoint = {"transport": "tcp", "address": "10.213.0.1:4000", "generation": 1}
        with lc.client("node1") as one:
            one.call("register", ring="flows.push-test", endpoint=endpoint)
        with lc.client("node3") as three:
            assert three.call("lookup", ring="flows.push-test", timeout=5.0) == endpoint
        for node in lc.nodes:
            with lc.client(node.name) as c:
                c.call("unregister", ring="flows.push-test")
        # The up() connectivity check left no registration behind.
        with lc.client("node2") as two:
            assert two.call("status")["registry"] == {}
        status = lc.status()
        assert status["healthy"] and all(n["alive"] for n in status["nodes"])
        assert [n["address"] for n in status["nodes"]] == [f"10.213.0.{i}" for i in (1, 2, 3)]
        assert LocalCluster.current().id == lc.id


def test_second_up_is_refused(state_dir: Path) -> None:
    with LocalCluster(2) as lc:
        with pytest.raises(DpmigrateError, match=r"already recorded.*cluster down.*clean"):
            LocalCluster(2).up()
        again = cli("cluster", "up", "--nodes", "2")
        assert again.returncode == 1
        assert again.stderr.count("\n") == 1 and "`dpmigrate cluster down`" in again.stderr
        assert lc.status()["healthy"], "the refused up() must not touch the running cluster"


def test_bad_node_counts_are_refused(state_dir: Path) -> None:
    for n in (0, 17):
        with pytest.raises(ConfigError, match="1 to 16"):
            LocalCluster(n).up()
    assert not (state_dir / "cluster" / "cluster.json").exists()


def test_context_manager_removes_the_cluster_on_exceptions(state_dir: Path) -> None:
    before = _snapshot(state_dir)
    with pytest.raises(KeyboardInterrupt), LocalCluster(2) as lc:
        pids = [n.agent_pid for n in lc.nodes]
        raise KeyboardInterrupt
    _assert_gone(before, state_dir, pids)


def test_failed_up_removes_what_it_made(state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _snapshot(state_dir)
    monkeypatch.setattr(cluster_mod, "AGENT_PORT", 70000)  # every agent fails to listen
    # whichever node's agent is seen failing first (each runs under its own keeper)
    with pytest.raises(EnvironmentProblem, match=r"agent of node[12] exited"):
        LocalCluster(2).up()
    _assert_gone(before, state_dir, [])


@pytest.mark.filterwarnings("ignore:subprocess .* is still running:ResourceWarning")
def test_clean_after_a_crash(state_dir: Path) -> None:
    before = _snapshot(state_dir)
    lc = LocalCluster(3)
    lc.up()
    pids = [n.agent_pid for n in lc.nodes]
    ns = lc.nodes[1].netns
    # A process the crash orphaned inside a node (as a stage of a killed agent would be).
    stray = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{ns}", "sleep", "60"], start_new_session=True
    )
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    del lc  # the CLI died: no down()
    removed = clean()
    stray.wait(timeout=10)
    assert f"process {stray.pid} in {ns}" in removed
    assert f"netns {ns}" in removed
    _assert_gone(before, state_dir, [*pids, stray.pid])
    assert clean() == []


@pytest.mark.parametrize("stage", ["namespaces", "agents"])
def test_cli_clean_after_the_cli_was_killed_mid_up(state_dir: Path, stage: str) -> None:
    before = _snapshot(state_dir)
    record = state_dir / "cluster" / "cluster.json"
    exe = [sys.executable, "-c", _WRAPPER, "cluster", "up", "--nodes", "16"]
    proc = subprocess.Popen(exe, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def made_enough() -> bool:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            data = json.loads(record.read_text())
            if stage == "namespaces":
                return len(data["namespaces"]) >= 6
            return sum(1 for a in data["agents"] if a["pid"]) >= 3
        return False

    # Kill it as soon as it has made part of the cluster (namespaces only, or some agents).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None and not made_enough():
        time.sleep(0.002)
    proc.kill()
    proc.wait(timeout=10)
    assert record.exists(), "the record must survive the crash"
    left = json.loads(record.read_text())
    assert left["status"] == "creating", "up() finished before it could be interrupted"
    pids = [a["pid"] for a in left["agents"] if a["pid"]]
    out = cli("clean", "--json")
    assert out.returncode == 0, out.stderr
    assert any(r.startswith("netns ") for r in json.loads(out.stdout)["removed"])
    _assert_gone(before, state_dir, pids)


def test_non_root_gets_one_clear_line(state_dir: Path) -> None:
    """`dpmigrate cluster up` as the unprivileged user nobody: one line, nothing created.

    The command must not depend on where the clone lies. Exec'ing the venv's `dpmigrate` as
    nobody (setpriv/runuser) fails when the clone is under a folder nobody cannot enter (a
    `mktemp -d` folder is 0700): nobody cannot open the entry script, the venv or the
    editable package. So the test starts the venv's interpreter as root, imports the CLI
    (every module it needs is loaded then, while the files are readable) and only then
    drops to nobody inside that process — groups, gid, then uid, which clears every
    capability — checks that no capability is left, and calls the real `main()` with the
    command line. The root check thus runs in a truly unprivileged process, whatever the
    clone's location. A module imported lazily after the drop would fail to load and show
    as a traceback, which the assertions below would catch (none is today); the working
    directory is / so nothing is looked up in the clone.
    """
    code = (
        "import os, sys\n"
        "from dpmigrate.cli import main\n"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        "caps = [ln for ln in open('/proc/self/status') if ln.startswith('CapEff:')]\n"
        "if os.geteuid() == 0 or int(caps[0].split()[1], 16) != 0:\n"
        "    print('still privileged', file=sys.stderr); sys.exit(99)\n"
        "sys.argv = ['dpmigrate', 'cluster', 'up', '--nodes', '2']\n"
        "main(prog_name='dpmigrate')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
    )
    assert out.returncode not in (0, 99), out.stderr
    assert out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("dpmigrate: error: must run as root"), out.stderr
    assert "Traceback" not in out.stderr
    assert not (state_dir / "cluster").exists()
