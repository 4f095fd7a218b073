"""A node reached over SSH: a real OpenSSH server in a network namespace of this machine (a
"lab host" that the cluster file links to the cluster's bridge), real paramiko, real etcd.

The server gets its own host key and accepts one user key, both generated here; it is started
and killed by PID by the fixture, which also removes its namespace and files, whatever the
test did. Each test checks that its fault really happened (the server logged the refused key,
known_hosts lacks the host, ...), not only the message.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko
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

from dpmigrate.cluster.ssh import fingerprint
from dpmigrate.migrate import LocalCluster
from dpmigrate.runtime.manifest import App
from dpmigrate.runtime.multinode import MultiNodeRun


def live(fn: Any) -> Any:
    """The markers of a test on a live cluster with an SSH server."""
    for mark in (pytest.mark.root, pytest.mark.netns, pytest.mark.criu, pytest.mark.nftables):
        fn = mark(fn)
    return fn


SSHD = "/usr/sbin/sshd"
ADDRESS = "10.213.0.3"  # the lab host's address on the cluster's bridge (local nodes: .1, .2)
TOTAL = 200_000  # packets of the flows run, at 10,000/s: room for six migrations
CLOSED_PORT = 2200  # nothing listens there
NO_FORWARDING_PORT = 2222  # a second server there, with AllowTcpForwarding no
PYTHON = str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "python")


@dataclasses.dataclass
class LabHost:
    netns: str
    folder: Path
    sshd_pid: int  # the server on port 22
    listeners: list[int]  # it and the one on NO_FORWARDING_PORT
    sshd_log: Path
    user_key: Path  # authorized
    wrong_key: Path  # not authorized
    host_key_fp: str

    def log(self) -> str:
        return self.sshd_log.read_text(errors="replace")

    def processes(self) -> list[int]:
        """PIDs in the lab host's namespace other than the SSH server's listener."""
        out = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True,
                             text=True, timeout=10, check=True).stdout  # fmt: skip
        return [int(p) for p in out.split() if int(p) not in self.listeners]

    def links(self) -> list[str]:
        out = subprocess.run(["ip", "-n", self.netns, "-o", "link", "show"], capture_output=True,
                             text=True, timeout=10, check=True).stdout  # fmt: skip
        return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dpmigrate-test",
                    "-f", str(path)], check=True, timeout=30)  # fmt: skip


def _kill(pid: int) -> None:
    """SIGTERM, then SIGKILL, one PID we started; reaped if it is our child."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    return
            except ChildProcessError:
                if not alive(pid):
                    return
            time.sleep(0.02)


def _start_sshd(
    netns: str, folder: Path, port: int, forwarding: str, log: Path
) -> subprocess.Popen[bytes]:
    """sshd -D in ``netns`` on ADDRESS:``port``, its events appended to ``log``; returned
    once it listens."""
    config = folder / f"sshd_config.{port}"
    config.write_text(
        f"ListenAddress {ADDRESS}:{port}\nHostKey {folder}/host_key\n"
        f"PidFile {folder}/sshd.{port}.pid\nAuthorizedKeysFile {folder}/authorized_keys\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        f"Subsystem sftp internal-sftp\nAllowTcpForwarding {forwarding}\nLogLevel VERBOSE\n"
    )
    before = log.read_text().count("Server listening") if log.exists() else 0
    with open(log, "ab") as out:  # nsenter execs sshd: the same PID
        proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{netns}", SSHD, "-D", "-e",
                                 "-f", str(config)], stdout=out, stderr=out)  # fmt: skip
    wait_until(lambda: log.read_text().count("Server listening") > before
               or proc.poll() is not None, f"sshd to listen on {port}", timeout=15)  # fmt: skip
    assert proc.poll() is None, log.read_text()
    return proc


@pytest.fixture(scope="module")
def lab() -> Iterator[LabHost]:
    """An OpenSSH server in a network namespace of its own, listening on ADDRESS:22 (which
    exists once a cluster links the namespace to its bridge: ip_nonlocal_bind lets it bind
    first), with a generated host key and one authorized user key."""
    require("root", "netns")
    if not os.access(SSHD, os.X_OK):
        pytest.fail(f"{SSHD} is missing; scripts/setup installs openssh-server")
    folder = Path(tempfile.mkdtemp(prefix="dpm-sshd-"))
    netns = f"dpmt{secrets.token_hex(3)}-ssh"
    made_run_dir = not os.path.isdir("/run/sshd")  # sshd's privilege separation folder
    procs: list[subprocess.Popen[bytes]] = []
    try:
        _keygen(folder / "host_key")
        _keygen(folder / "user_key")
        _keygen(folder / "wrong_key")
        shutil.copyfile(folder / "user_key.pub", folder / "authorized_keys")
        subprocess.run(["ip", "netns", "add", netns], check=True, timeout=10)
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True, timeout=10)
        subprocess.run(["nsenter", f"--net=/run/netns/{netns}", "sysctl", "-q", "-w",
                        "net.ipv4.ip_nonlocal_bind=1"], check=True, timeout=10)  # fmt: skip
        if made_run_dir:
            os.mkdir("/run/sshd", 0o755)
        log = folder / "sshd.log"
        for port, forwarding in ((22, "yes"), (NO_FORWARDING_PORT, "no")):
            procs.append(_start_sshd(netns, folder, port, forwarding, log))
        host_key = paramiko.PKey.from_path(folder / "host_key")
        yield LabHost(netns, folder, procs[0].pid, [p.pid for p in procs], log,
                      folder / "user_key", folder / "wrong_key", fingerprint(host_key))  # fmt: skip
    finally:
        for proc in procs:
            _kill(proc.pid)
        if os.path.exists(f"/run/netns/{netns}"):
            out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True,
                                 timeout=10, check=False).stdout  # fmt: skip
            for pid in (int(p) for p in out.split()):  # sshd's sessions: our server's children
                _kill(pid)
            subprocess.run(["ip", "netns", "del", netns], timeout=10, check=False)
        if made_run_dir:
            shutil.rmtree("/run/sshd", ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)


def cluster_file(folder: Path, lab: LabHost, *, local: int = 1, identity: Path | None = None,
                 python: str = PYTHON, host_key: str = "", port: int = 22,
                 dpmigrate: str = "") -> Path:  # fmt: skip
    """A cluster file: ``local`` netns nodes and node``local+1``, the lab host over SSH."""
    name = f"node{local + 1}"
    text = (
        f'[cluster]\nknown_hosts = "known_hosts"\n\n[local]\nnodes = {local}\n\n'
        f'[nodes.{name}]\nssh = "ssh://root@{ADDRESS}:{port}"\n'
        f'identity = "{identity or lab.user_key}"\nnetns = "{lab.netns}"\n'
        + (f'dpmigrate = "{dpmigrate}"\n' if dpmigrate else f'python = "{python}"\n')
    )
    if host_key:
        text += f'host_key = "{host_key}"\n'
    path = folder / "cluster.toml"
    path.write_text(text)
    return path


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dpmigrate: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def wait_for_no_processes(lab: LabHost) -> None:
    """Until nothing but the SSH server's listener runs in the lab host (its sessions end a
    moment after their client closed them); the survivors' command lines if not."""
    deadline = time.monotonic() + 15
    while (left := lab.processes()) and time.monotonic() < deadline:
        time.sleep(0.05)
    if left:
        ps = subprocess.run(["ps", "-o", "pid,ppid,args", "-p", ",".join(map(str, left))],
                            capture_output=True, text=True, timeout=10, check=False).stdout  # fmt: skip
        ss = subprocess.run(["nsenter", f"--net=/run/netns/{lab.netns}", "ss", "-tnpa"],
                            capture_output=True, text=True, timeout=10, check=False).stdout  # fmt: skip
        raise AssertionError(f"left in the lab host: {ps} {ss}")


def assert_nothing_left(lab: LabHost, state_dir: Path, pids: list[int]) -> None:
    """No process of the SSH node (by PID, and none in its namespace but sshd's listener and
    its sessions ending), no folder of it, no link into the cluster."""
    for pid in pids:
        assert not alive(pid), f"process {pid} of the SSH node still runs"
    wait_for_no_processes(lab)
    assert not (state_dir / "nodes").exists() or not list((state_dir / "nodes").iterdir())
    assert not (state_dir / "cluster" / "cluster.json").exists()
    assert lab.links() == ["lo"], lab.links()


@live
def test_flows_on_an_ssh_node_migrate_to_it_and_back_then_down_leaves_nothing(
    lab: LabHost, cluster_state_dir: Path, tmp_path: Path
) -> None:
    """Python API, from the cluster file (host key pinned in it): gen and table on node1,
    check on node2 over SSH; with each strategy, table moves to node2 (its ring to check turns
    shm there) and back under traffic; lost = dup = 0 in every report, and the checker ends
    with the digest of an uninterrupted run."""
    text = paced_flows(tmp_path, TOTAL, rate=10000).read_text()
    text = text.replace('node = "node2"', 'node = "node1"').replace(
        'node = "node3"', 'node = "node2"'
    )
    (tmp_path / "app.toml").write_text(text)
    app = App.load(tmp_path / "app.toml")
    expected = reference_checker(app)
    path = cluster_file(tmp_path, lab, host_key=lab.host_key_fp)
    remote_pids: list[int] = []
    reports = []
    with LocalCluster.from_file(path) as cluster:
        node2 = cluster.node("node2")
        assert node2.kind == "ssh" and node2.address == ADDRESS
        # the token reached the agent through stdin: in its environment, on no command line
        # and in no command run over SSH, nor in any file of the node's folder
        keeper, agent = node2.keeper_pid, node2.agent_pid
        assert keeper and agent and alive(keeper) and alive(agent)
        remote_pids += [keeper, agent]
        token = cluster.token.encode()
        for pid in (keeper, agent):
            assert token not in Path(f"/proc/{pid}/cmdline").read_bytes()
            assert b"DPMIGRATE_TOKEN=" + token in Path(f"/proc/{pid}/environ").read_bytes()
        commands = cluster._ssh_nodes().node("node2").conn.commands
        assert any("agent --keep" in c for c in commands) and all(
            cluster.token not in c for c in commands
        )
        folder = cluster_state_dir / "nodes" / "node2"
        for file in (f for f in folder.rglob("*") if f.is_file()):
            assert token not in file.read_bytes(), file
        assert (folder.stat().st_mode & 0o777) == 0o700
        # its agent runs in the lab host's namespace, reached only through the tunnel
        assert os.readlink(f"/proc/{agent}/ns/net") == os.readlink(f"/proc/{lab.sshd_pid}/ns/net")
        run = MultiNodeRun(app, cluster)
        run.start()
        try:
            wait_for_input(run, 5000)
            check_pid = stage_status(run, "check")["pid"]
            assert stage_status(run, "check")["node"] == "node2" and check_pid
            remote_pids.append(check_pid)
            strategies = ("stop-and-copy", "post-copy", "statesync")
            for strategy, to in itertools.product(strategies, ("node2", "node1")):
                report = cluster.migrate("table", to=to, strategy=strategy)
                assert not report.rolled_back, report.error
                assert stage_status(run)["node"] == to
                if to == "node2":
                    remote_pids.append(stage_status(run)["pid"])
                reports.append(report.as_dict())
                wait_for_input(run, stage_status(run)["msgs_in"] + 3000)
            assert run.wait(duration=120), run.status()
            final = run.status()
        finally:
            run.stop()
        logs = cluster.agent_log("node2")
        assert '"event": "agent started"' in logs and '"node": "node2"' in logs
        run.cleanup()
        # an SSH node's agent that is not running is started again, one that runs is kept
        assert cluster.restart_agent("node2") is False
        for pid in (keeper, agent):  # the keeper first, or it would start the agent again
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda pid=pid: not alive(pid), f"process {pid} to die")  # type: ignore[misc]
        assert cluster.restart_agent("node2") is True
        again = cluster.node("node2")
        assert again.keeper_pid not in (None, keeper) and again.agent_pid not in (None, agent)
        remote_pids += [again.keeper_pid, again.agent_pid]  # type: ignore[list-item]
        with cluster.client("node2") as client:
            assert client.call("ping")["pid"] == again.agent_pid
    for report in reports:
        assert report["lost"] == 0 and report["duplicated"] == 0, report
        assert report["state_digest_before"] == report["state_digest_after"], report
    assert checker_of(final) == {"received": TOTAL, "lost": 0, "duplicated": 0,
                                 "digest": expected["digest"]}  # fmt: skip
    assert "Accepted publickey for root" in lab.log()
    assert_nothing_left(lab, cluster_state_dir, remote_pids)


@live
def test_cli_up_accepts_the_fingerprint_then_status_logs_and_down(
    lab: LabHost, cluster_state_dir: Path, tmp_path: Path
) -> None:
    """`cluster up --file F --accept-host-key FP` (the node names its remote `dpmigrate`
    command, not python) adds the key to known_hosts; `cluster
    status` shows the SSH node answering through its tunnel; `dpmigrate logs NODE` reads its
    log from the host; `cluster down` removes its agent, the stages of an app it runs and its
    folder."""
    env = {"DPMIGRATE_STATE_DIR": str(cluster_state_dir)}
    path = cluster_file(tmp_path, lab, local=0, dpmigrate=str(Path(PYTHON).parent / "dpmigrate"))
    up = run_cli("cluster", "up", "--file", str(path), "--accept-host-key", lab.host_key_fp,
                 "--json", env=env, timeout=120)  # fmt: skip
    assert up.returncode == 0, up.stderr
    known = (tmp_path / "known_hosts").read_text()
    assert known.startswith(f"{ADDRESS} ssh-ed25519 ")
    status = run_cli("cluster", "status", "--json", env=env, timeout=60)
    assert status.returncode == 0, status.stderr
    row = json.loads(status.stdout)["nodes"][0]
    assert row["kind"] == "ssh" and row["alive"] and row["member"], row
    assert row["host_key"] == lab.host_key_fp
    pids = [row["keeper_pid"], row["agent_pid"]]
    assert all(alive(p) for p in pids)
    keeper = Path(f"/proc/{row['keeper_pid']}/cmdline").read_bytes().split(b"\0")
    assert keeper[1].endswith(b"/bin/dpmigrate") and keeper[2:4] == [b"agent", b"--keep"], keeper
    logs = run_cli("logs", "node1", "--lines", "50", env=env, timeout=60)
    assert logs.returncode == 0 and '"event": "agent started"' in logs.stdout, logs.stderr
    # an app left running on the SSH node: down stops its stages too
    text = paced_flows(tmp_path, 10**6, rate=2000).read_text()
    (tmp_path / "app.toml").write_text(text.replace('node = "node2"', 'node = "node1"')
                                       .replace('node = "node3"', 'node = "node1"'))  # fmt: skip
    started = run_cli("run", str(tmp_path / "app.toml"), "--model", "multi-node", "--detach",
                      env=env, timeout=120)  # fmt: skip
    assert started.returncode == 0, started.stderr
    here = LocalCluster.current(str(cluster_state_dir))
    try:
        with here.client("node1") as agent:
            stages = [s for s in agent.call("status")["stages"] if s.get("pid")]
    finally:
        here.close()  # this process's SSH connection, before down removes the link
    assert {s["name"] for s in stages} == {"gen", "table", "check"}, stages
    pids += [s["pid"] for s in stages]
    assert all(alive(p) for p in pids)
    down = run_cli("cluster", "down", "--json", env=env, timeout=120)
    assert down.returncode == 0, down.stderr
    removed = json.loads(down.stdout)["removed"]
    assert f"directory {ADDRESS}:{cluster_state_dir}/nodes/node1" in removed, removed
    assert any(line.startswith("stage flows/table on ") for line in removed), removed
    assert_nothing_left(lab, cluster_state_dir, pids)


@live
@pytest.mark.parametrize("fault", ["wrong user key", "unknown host key", "changed host key",
                                   "no dpmigrate on the host", "no forwarding",
                                   "no server on the port"])  # fmt: skip
def test_an_ssh_node_that_cannot_join_is_one_line_naming_host_and_step(
    lab: LabHost, cluster_state_dir: Path, tmp_path: Path, fault: str
) -> None:
    env = {"DPMIGRATE_STATE_DIR": str(cluster_state_dir)}
    known = tmp_path / "known_hosts"
    before = lab.log()
    accept = ["--accept-host-key", lab.host_key_fp]
    if fault == "wrong user key":
        path = cluster_file(tmp_path, lab, local=0, identity=lab.wrong_key)
        assert (
            lab.wrong_key.with_suffix(".pub").read_text().split()[1]
            not in (lab.folder / "authorized_keys").read_text()
        )
    elif fault == "unknown host key":
        path, accept = cluster_file(tmp_path, lab, local=0), []
    elif fault == "changed host key":
        other = paramiko.PKey.from_path(lab.wrong_key)  # a key the host does not have
        known.write_text(f"{ADDRESS} {other.get_name()} {other.get_base64()}\n")
        path = cluster_file(tmp_path, lab, local=0)  # the real key accepted: still refused
    elif fault == "no forwarding":  # the agent starts; its tunnel cannot be opened
        path = cluster_file(tmp_path, lab, local=0, port=NO_FORWARDING_PORT)
    elif fault == "no server on the port":
        path = cluster_file(tmp_path, lab, local=0, port=CLOSED_PORT)
    else:
        path = cluster_file(tmp_path, lab, local=0, python="/nonexistent/bin/python3")
    result = run_cli("cluster", "up", "--file", str(path), *accept, env=env, timeout=120)
    line = one_line_error(result)
    port = {"no forwarding": NO_FORWARDING_PORT, "no server on the port": CLOSED_PORT}.get(
        fault, 22
    )
    assert f"node node1 (root@{ADDRESS}:{port})" in line, line
    session = lab.log()[len(before) :]
    if fault == "wrong user key":
        assert ": auth: the server refused the key" in line and str(lab.wrong_key) in line, line
        assert "authorized_keys" in line
        assert (
            "Failed publickey for root" in session
            or "Connection closed by authenticating" in session
        ), session
        assert "Accepted publickey" not in session
    elif fault == "unknown host key":
        assert ": host key: " in line and lab.host_key_fp in line and "--accept-host-key" in line
        assert not known.exists() or ADDRESS not in known.read_text()
        assert "Accepted publickey" not in session and "Failed publickey" not in session, session
    elif fault == "changed host key":
        assert ": host key: the host key has CHANGED" in line, line
        assert lab.host_key_fp in line and fingerprint(other) in line
        assert known.read_text().count("\n") == 1  # nothing added
        assert "Accepted publickey" not in session and "Failed publickey" not in session, session
    elif fault == "no server on the port":
        assert f": connect: cannot reach {ADDRESS}:{CLOSED_PORT} (Connection refused)" in line
        assert "check that sshd runs there" in line
        assert session == "", session  # no server saw anything
    elif fault == "no forwarding":
        assert ": tunnel: " in line and "AllowTcpForwarding yes" in line, line
        assert "refused local port forward" in session, session
    else:
        assert ": remote doctor: " in line and "/nonexistent/bin/python3" in line, line
        assert "is dpmigrate 0.1.0 installed there" in line
        assert "Accepted publickey for root" in session  # it got in: the doctor found nothing
    # the cluster was removed again, and nothing was made on the host
    assert not (cluster_state_dir / "cluster" / "cluster.json").exists()
    assert not (cluster_state_dir / "nodes" / "node1").exists()
    wait_for_no_processes(lab)
    assert lab.links() == ["lo"], lab.links()


@pytest.mark.parametrize(
    ("text", "field", "what"),
    [
        ("[local]\nnodes = 17\n", "local.nodes", "from 0 to 16"),
        ("[local]\nnodez = 1\n", "local.nodez", "unknown field"),
        ("[nodes.n1]\nssh = 1\n", "nodes.n1.ssh", "non-empty string"),
        ('[nodes.n1]\nssh = "http://root@h"\n', "nodes.n1.ssh", "not an ssh:// URL"),
        ('[nodes.n1]\nssh = "ssh://h"\n', "nodes.n1.ssh", "names no user"),
        ('[nodes.n1]\nssh = "ssh://root:pw@h"\n', "nodes.n1.ssh", "holds a password"),
        ('[nodes.n1]\nssh = "ssh://root@h:99999"\n', "nodes.n1.ssh", "bad port"),
        (
            '[nodes.n1]\nssh = "ssh://root@h"\nidentity = "missing"\n',
            "nodes.n1.identity",
            "does not exist",
        ),
        (
            '[nodes.n1]\nssh = "ssh://root@h"\nidentity = "id"\n',
            "nodes.n1",
            "exactly one of python",
        ),
        (
            '[nodes.n1]\nssh = "ssh://root@h"\nidentity = "id"\npython = "py"\n',
            "nodes.n1.python",
            "absolute path",
        ),
        (
            '[nodes.n1]\nssh = "ssh://root@h"\nidentity = "id"\npython = "/py"\n',
            "nodes.n1.address",
            "not an IP address",
        ),
        (
            '[nodes.n1]\nssh = "ssh://root@10.0.0.1"\nidentity = "id"\npython = "/py"\n'
            'host_key = "MD5:ab"\n',
            "nodes.n1.host_key",
            "not an SSH fingerprint",
        ),
        (
            '[cluster]\nknown_hosts = "kh"\n[nodes.n1]\nssh = "ssh://root@10.0.0.1"\n'
            'identity = "id"\npython = "/py"\n',
            "nodes.n1",
            "cannot reach the embedded etcd member",
        ),
        (
            '[local]\nnodes = 2\n[nodes.node2]\nssh = "ssh://root@10.0.0.1"\n',
            "nodes.node2",
            "one of the local nodes",
        ),
        ('[etcd]\nmember = "node3"\n', "etcd.member", 'only "hub"'),
        ('[etcd]\nendpoints = ["ftp://x"]\n', "etcd.endpoints", "not an http(s)"),
        ("[local]\nnodes = 0\n", "local.nodes", "has no node"),
        ("[local\n", "not valid TOML", ""),
    ],
)
def test_a_cluster_file_mistake_is_one_line_naming_file_and_field(
    tmp_path: Path, text: str, field: str, what: str
) -> None:
    """No root needed: the file is checked before anything is made."""
    from dpmigrate.cluster import clusterfile
    from dpmigrate.errors import ConfigError

    (tmp_path / "id").write_text("not read here")
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        clusterfile.load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: {field}") and what in message, message
    assert "\n" not in message


def test_a_cluster_file_is_read_with_its_paths_made_absolute(tmp_path: Path) -> None:
    from dpmigrate.cluster import clusterfile

    (tmp_path / "id").write_text("key")
    path = tmp_path / "cluster.toml"
    path.write_text(
        '[cluster]\nknown_hosts = "kh"\nstate_dir = "/var/lib/dpm"\n[local]\nnodes = 2\n'
        '[etcd]\nendpoints = ["https://10.0.0.9:2379"]\n'
        '[nodes.edge]\nssh = "ssh://ops@10.0.0.5:2200"\nidentity = "id"\n'
        'dpmigrate = "/usr/local/bin/dpmigrate"\n'
    )
    spec = clusterfile.load(path)
    assert spec.local_nodes == 2 and spec.state_dir == "/var/lib/dpm"
    assert spec.known_hosts == str(tmp_path / "kh")
    assert spec.etcd.endpoints == ("https://10.0.0.9:2379",)
    (edge,) = spec.ssh_nodes
    assert (edge.name, edge.user, edge.host, edge.port) == ("edge", "ops", "10.0.0.5", 2200)
    assert edge.identity == str(tmp_path / "id") and edge.address == "10.0.0.5"
    assert edge.launcher == ("/usr/local/bin/dpmigrate",)
    assert spec.node_names == ["node1", "node2", "edge"]
