"""The local cluster: N nodes as network namespaces joined by veth pairs, one agent in each.

``dpmigrate cluster up --nodes N`` builds, all inside namespaces it creates::

    dpm<id>-hub        bridge br0 = 10.213.0.254/24, one port veth<i> per node; the
                       cluster store: one etcd member listening only on 10.213.0.254:2379
    dpm<id>-node<i>    lo up, eth0 = 10.213.0.<i>/24 (the peer of the hub's veth<i>),
                       agent `dpmigrate.agentd --node node<i>` listening on :7070, in a
                       mount namespace that shows it only its own folder of the state dir,
                       <state_dir>/nodes/node<i> (see dpmigrate.cluster.nodefs)

Nothing is created in the host's own namespace except the ``/run/netns`` files that
``ip netns add`` makes. Test-host addresses therefore exist only on interfaces the project
created (DESIGN.md §7).

Everything is written to a record, ``<state_dir>/cluster/cluster.json`` (mode 0600, replaced
atomically), *before* it is created. :func:`clean` (and :meth:`LocalCluster.down`) remove
exactly what that record lists and nothing found by a name pattern, so a cluster whose CLI or
machine crashed half-way through ``up`` can still be removed completely. An agent's PID is
recorded with its start time and the boot id, so a PID the kernel has since given to another
process is never signalled.

Each agent runs under a keeper (``dpmigrate.agentd --keep``, see
:mod:`dpmigrate.runtime.agent_keeper`), which also holds the node's mount namespace: killed or
crashed, the agent is started again within about a second, in the same view, and re-adopts the
stages it left running, without the user. The record holds the keeper's PID; the keeper writes
the current agent's PID (it changes with each restart) to ``keeper.json`` in the node's folder.

Built from a cluster file (:meth:`LocalCluster.from_file`, :mod:`dpmigrate.cluster.clusterfile`)
the cluster may also have nodes reached over SSH. They are the same kind of node to the rest of
the code (:class:`Node` with ``kind = "ssh"``; :meth:`LocalCluster.client` carries the control
traffic through the SSH connection); the record lists them under ``"ssh"``, and how they are
started, reached and removed is :mod:`dpmigrate.runtime.ssh_cluster`'s job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from dpmigrate import atomic, config
from dpmigrate.cluster import clusterfile, etcd, nodefs, pki
from dpmigrate.cluster import hugepages as hugepages_mod
from dpmigrate.cluster.clusterfile import ClusterFile
from dpmigrate.cluster.netns import NetnsExecutor
from dpmigrate.cluster.store import EtcdSettings, Store, StoreUnavailable
from dpmigrate.errors import ConfigError, DpmigrateError, EnvironmentProblem
from dpmigrate.runtime import agent_keeper, cgroups
from dpmigrate.runtime.control import AgentClient
from dpmigrate.runtime.supervisor import process_start_time

if TYPE_CHECKING:
    from dpmigrate.runtime.ssh_cluster import SshNodes

MAX_NODES = 16
SUBNET = "10.213.0"
STORE_ADDRESS = f"{SUBNET}.254"  # the hub's bridge: where the embedded etcd listens
AGENT_PORT = 7070
AGENT_SOCKET = "agent.sock"  # in the node's own folder
KEEPER_FILE = "keeper.json"  # in the node's own folder: the keeper's state (agent PID, restarts)
RECORD_VERSION = 1
NO_CLUSTER = "no cluster is up; run `dpmigrate cluster up`"

_AGENT_START_TIMEOUT_S = 30.0
_KEEPER_START_TIMEOUT_S = 10.0  # until a new keeper has started its agent (it imports little)
_ETCD_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 15.0
_KILL_TIMEOUT_S = 5.0
_CHECK_TIMEOUT_S = 15.0
_IP_TIMEOUT_S = 10.0
_MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the terminating NUL


@dataclasses.dataclass(frozen=True)
class Node:
    """One node of the local cluster, as the CLI and the Python API reach it."""

    name: str
    netns: str
    address: str
    agent_socket: str
    agent_pid: int | None
    log: str = ""
    keeper_pid: int | None = None  # restarts the agent when it dies: kill it too to kill a node
    kind: str = "local"  # "local" (a network namespace here) or "ssh" (reached over SSH)
    ssh: str = ""  # ssh://user@host:port of an SSH node

    @property
    def agent_address(self) -> str:
        """HOST:PORT on which the node's agent listens for the other nodes' agents."""
        return f"{self.address}:{AGENT_PORT}"


# -- the record ---------------------------------------------------------------------------


def _cluster_dir(state_dir: str) -> Path:
    return Path(state_dir) / "cluster"


def _record_path(state_dir: str) -> Path:
    return _cluster_dir(state_dir) / "cluster.json"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _write_file(path: Path, data: dict[str, Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _save(record_path: Path, record: dict[str, Any]) -> None:
    """Replace the record atomically: a crash leaves the old or the new one, never half."""
    tmp = record_path.with_name(record_path.name + ".tmp")
    _write_file(tmp, record)
    os.replace(tmp, record_path)
    atomic.fsync_dir(record_path.parent)


def _claim(record_path: Path, record: dict[str, Any]) -> None:
    """Create the record only if none exists (link() is atomic and exclusive).

    Two `cluster up` started at once cannot both win: exactly one link succeeds.
    """
    tmp = record_path.with_name(f"{record_path.name}.{secrets.token_hex(4)}.claim")
    _write_file(tmp, record)
    try:
        os.link(tmp, record_path)
    except FileExistsError:
        raise DpmigrateError(
            f"a local cluster is already recorded in {record_path}; remove it with "
            "`dpmigrate cluster down` (or `dpmigrate clean` if it crashed) before "
            "`dpmigrate cluster up`"
        ) from None
    finally:
        tmp.unlink()
    atomic.fsync_dir(record_path.parent)


def _load(record_path: Path) -> dict[str, Any] | None:
    try:
        text = record_path.read_text()
    except FileNotFoundError:
        return None
    except PermissionError as err:
        raise EnvironmentProblem(
            f"cannot read the cluster record {record_path}: permission denied; run as root"
        ) from err
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise DpmigrateError(
            f"the cluster record {record_path} is not valid JSON ({err}); it was edited or "
            "damaged — remove what it names by hand (`ip netns list`), then delete the file"
        ) from err
    if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
        raise DpmigrateError(
            f"the cluster record {record_path} is not a version {RECORD_VERSION} record; "
            "it was written by another dpmigrate version — remove its resources by hand"
        )
    return record


# -- processes ----------------------------------------------------------------------------


def _reap(pid: int) -> None:
    """Collect our own exited child so it stops looking alive (no-op for anyone else's)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _same_process(pid: int, start_time: int | None, boot_id: str | None) -> bool:
    """True only if ``pid`` is still the very process that was recorded."""
    if start_time is None or (boot_id and boot_id != _boot_id()):
        return False
    _reap(pid)
    return process_start_time(pid) == start_time


def _current_agent(entry: dict[str, Any]) -> tuple[int | None, int | None]:
    """(PID, start time) of a node's agent now: the one its keeper says it started last (each
    restart makes a new PID), else the one the record names."""
    state = agent_keeper.read_state(entry["keeper_file"]) if entry.get("keeper_file") else None
    if state is not None and isinstance(state.get("agent_pid"), int):
        start = state.get("agent_start_time")
        return state["agent_pid"], start if isinstance(start, int) else None
    return entry.get("pid"), entry.get("start_time")


def _keeper_alive(entry: dict[str, Any], boot_id: str | None = None) -> bool:
    pid = entry.get("keeper_pid")
    return isinstance(pid, int) and _same_process(pid, entry.get("keeper_start_time"), boot_id)


def _stop_processes(procs: list[tuple[int, int]], label: dict[int, str]) -> list[str]:
    """SIGTERM each recorded (pid, start time), wait, SIGKILL what is left; say what went.

    The start time is checked before every signal, so a PID reused meanwhile is left alone.
    """
    alive = [(pid, st) for pid, st in procs if _same_process(pid, st, None)]
    gone = [pid for pid, st in procs if (pid, st) not in alive]
    for sig, wait_s in ((signal.SIGTERM, _STOP_TIMEOUT_S), (signal.SIGKILL, _KILL_TIMEOUT_S)):
        for pid, st in alive:
            if _same_process(pid, st, None):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while alive and time.monotonic() < deadline:
            time.sleep(0.02)
            still = [(pid, st) for pid, st in alive if _same_process(pid, st, None)]
            gone += [pid for pid, st in alive if (pid, st) not in still]
            alive = still
    if alive:
        raise DpmigrateError(
            "process(es) " + ", ".join(str(p) for p, _ in alive) + " survived SIGKILL for "
            f"{_KILL_TIMEOUT_S:.0f} s (stuck in the kernel?); run `dpmigrate clean` again"
        )
    return [label.get(pid, f"process {pid}") for pid in gone]


# -- ip(8) --------------------------------------------------------------------------------


def _tool(name: str, package: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        raise EnvironmentProblem(f"`{name}` is missing; apt-get install {package}")
    return path


def _ip(*args: str) -> str:
    cmd = [_tool("ip", "iproute2"), *args]
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=_IP_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as err:
        raise EnvironmentProblem(f"`{' '.join(cmd)}` hung for {_IP_TIMEOUT_S:.0f} s") from err
    if done.returncode != 0:
        raise EnvironmentProblem(f"`{' '.join(cmd)}` failed: {done.stderr.strip()}")
    return done.stdout


def _netns_exists(name: str) -> bool:
    return os.path.exists(f"/run/netns/{name}")


def _netns_pids(name: str) -> list[int]:
    """PIDs whose network namespace is ``name`` (``ip netns pids`` compares the inode)."""
    if not _netns_exists(name):
        return []
    try:
        out = _ip("netns", "pids", name)
    except EnvironmentProblem:
        return []
    return [int(p) for p in out.split() if p.isdigit()]


# -- teardown -----------------------------------------------------------------------------


def _teardown(record_path: Path, record: dict[str, Any]) -> list[str]:
    """Remove exactly what ``record`` lists; safe to repeat, safe after a half-done up()."""
    removed: list[str] = []
    ssh_problems: list[str] = []
    if record.get("ssh"):  # first: a lab host is reached through the hub, which goes below
        from dpmigrate.runtime import ssh_cluster

        removed, ssh_problems = ssh_cluster.teardown(record, str(record.get("state_dir")))
        for entry in record["ssh"]:  # the lab hosts' ends of their links, before the hub's go
            lab, link = entry.get("netns"), entry.get("lab_link")
            if lab and link and _netns_exists(lab):
                try:
                    _ip("-n", lab, "link", "del", link)
                    removed.append(f"link {link} in {lab}")
                except EnvironmentProblem as err:
                    if "Cannot find device" not in str(err):
                        ssh_problems.append(str(err))
    boot_id = record.get("boot_id", "")
    entries = record.get("agents", [])
    # Every agent that still runs: the recorded one and the keeper's latest (the same, unless
    # the keeper restarted it since the record was written). Listed before the keepers stop.
    procs: list[tuple[int, int]] = []
    labels: dict[int, str] = {}
    for a in entries:
        for pid, start in {_current_agent(a), (a.get("pid"), a.get("start_time"))}:
            if isinstance(pid, int) and isinstance(start, int):
                labels[pid] = f"agent {a['node']} (pid {pid})"
                if _same_process(pid, start, boot_id):
                    procs.append((pid, start))
    # The keepers first, or they would start the agents again: each forwards its SIGTERM to
    # its agent and exits once the agent has (then the agent, too, is gone). An agent left
    # behind (its keeper killed, or stuck) is stopped on its own after.
    keepers = [
        (a["keeper_pid"], a["keeper_start_time"]) for a in entries if _keeper_alive(a, boot_id)
    ]
    labels.update({a["keeper_pid"]: f"agent keeper {a['node']} (pid {a['keeper_pid']})"
                   for a in entries if isinstance(a.get("keeper_pid"), int)})  # fmt: skip
    removed += _stop_processes(keepers, labels)
    removed += _stop_processes(procs, labels)
    store = record.get("etcd") or {}
    if isinstance(store.get("pid"), int) and _same_process(
        store["pid"], store.get("start_time"), boot_id
    ):  # after the agents: they revoke their leases on the way out
        removed += _stop_processes(
            [(store["pid"], store["start_time"])], {store["pid"]: f"etcd (pid {store['pid']})"}
        )

    namespaces = [str(n) for n in record.get("namespaces", [])]
    # Anything still inside a namespace this cluster created was started in it by this
    # cluster (a stage of a killed agent, an agent whose PID was not recorded yet because
    # up() crashed right after spawning it). ip netns pids identifies them by namespace
    # inode, not by name, so they go too: otherwise they would keep the namespace alive.
    strays: list[tuple[int, int]] = []
    for ns in namespaces:
        for pid in _netns_pids(ns):
            st = process_start_time(pid)
            if st is not None and pid != os.getpid():
                strays.append((pid, st))
                labels[pid] = f"process {pid} in {ns}"
    removed += _stop_processes(strays, labels)
    # The stages' control groups, as each node's agent recorded them (empty by now: their
    # processes are gone); a group that will not go is reported like a recorded path.
    cgroup_problems: list[str] = []
    for node in record.get("nodes", []):
        try:
            removed += cgroups.remove_recorded(Path(str(node.get("dir"))) / cgroups.RECORD)
        except DpmigrateError as err:
            cgroup_problems.append(str(err))

    # The hugepages this cluster added, after every process that could hold a ring is gone.
    if isinstance(record.get("hugepages"), dict):
        try:
            removed += hugepages_mod.release(record["hugepages"])
        except DpmigrateError as err:
            cgroup_problems.append(str(err))

    for ns in reversed(namespaces):
        if _netns_exists(ns):
            try:
                _ip("netns", "del", ns)
            except EnvironmentProblem:
                if _netns_exists(ns):
                    raise
            removed.append(f"netns {ns}")

    kept: list[str] = []
    for name in record.get("files", []):
        try:
            os.unlink(name)
            removed.append(f"file {name}")
        except FileNotFoundError:
            pass
        except OSError as err:  # e.g. a directory put there by someone else: not ours
            kept.append(f"{name} ({err.strerror})")
    for name in reversed(record.get("trees", [])):  # directories this cluster created
        if os.path.isdir(name):
            shutil.rmtree(name, ignore_errors=True)
            removed.append(f"directory {name}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(record_path.with_name(record_path.name + ".tmp"))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(record_path)
        removed.append(f"record {record_path}")
    for name in reversed(record.get("dirs", [])):  # created by us, removed only if empty
        with contextlib.suppress(OSError):
            os.rmdir(name)
    kept += cgroup_problems + ssh_problems
    if kept:
        raise DpmigrateError(
            "the cluster is removed but these recorded paths could not be: "
            + "; ".join(kept)
            + "; remove them by hand"
        )
    return removed


@contextlib.contextmanager
def private_state_dir(prefix: str, name: str) -> Iterator[Path]:
    """A fresh folder for a cluster of this process's own (the demo's, the drills'):
    DPMIGRATE_STATE_DIR names ``FOLDER/name`` while it lasts (the rest of the folder is the
    caller's, out of the nodes' sight); afterwards the variable is as it was and the folder
    is gone."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    previous = os.environ.get("DPMIGRATE_STATE_DIR")
    os.environ["DPMIGRATE_STATE_DIR"] = str(folder / name)
    try:
        yield folder
    finally:
        if previous is None:
            os.environ.pop("DPMIGRATE_STATE_DIR", None)
        else:
            os.environ["DPMIGRATE_STATE_DIR"] = previous
        shutil.rmtree(folder, ignore_errors=True)


def clean(state_dir: str | None = None) -> list[str]:
    """Remove everything the cluster record lists (after a crash of the CLI or the machine).

    Needs no running agent and no live object: the record alone says what exists. Returns a
    line per removed thing; an absent record means there is nothing to remove.
    """
    state_dir = state_dir or config.load().state_dir
    path = _record_path(state_dir)
    record = _load(path)
    orphans = _orphaned_run_groups(state_dir)
    if record is None:
        return orphans
    _require_root("remove the local cluster")
    return orphans + _teardown(path, record)


def _orphaned_run_groups(state_dir: str) -> list[str]:
    """The control groups of multi-process runs (in this state dir) whose process was
    killed before it could stop them: exactly what their records list."""
    if not (Path(state_dir) / cgroups.INDEX).exists():
        return []
    _require_root("remove control groups")
    return cgroups.remove_orphaned(
        state_dir, lambda pid, start: start is not None and process_start_time(pid) == start
    )


def _require_root(action: str) -> None:
    if os.geteuid() != 0:
        raise EnvironmentProblem(
            f"must run as root to {action} (network namespaces need CAP_SYS_ADMIN); use sudo"
        )


# -- the cluster --------------------------------------------------------------------------


class LocalCluster:
    """N nodes on this host; a context manager (up on enter, down on exit, whatever happens)."""

    def __init__(
        self,
        nodes: int = 3,
        state_dir: str | None = None,
        spec: ClusterFile | None = None,
        accept_host_keys: Iterable[str] = (),
        hugepages: int | None = None,
    ) -> None:
        """``hugepages``: 2 MB pages to reserve for the shm rings while the cluster is up
        (default: DPMIGRATE_HUGEPAGES), given back by ``down``."""
        cfg = config.load()
        self.state_dir = state_dir or (spec and spec.state_dir) or cfg.state_dir
        self.hugepages = hugepages_mod.check_count(
            cfg.hugepages if hugepages is None else hugepages, "hugepages"
        )
        self.size = nodes
        self.spec = spec  # a cluster file: also SSH nodes, and where the store is
        self.accept_host_keys = frozenset(accept_host_keys)
        self.record_path = _record_path(self.state_dir)
        self._record: dict[str, Any] | None = None
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._store: Store | None = None
        self._ssh: SshNodes | None = None

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], accept_host_keys: Iterable[str] = ()
    ) -> LocalCluster:
        """The cluster a cluster file describes (:mod:`dpmigrate.cluster.clusterfile`): its
        local nodes, its SSH nodes and its store; not up yet (``up()`` or ``with``).
        ``accept_host_keys``: SHA256 fingerprints the user accepts for SSH hosts that
        known_hosts does not know yet."""
        spec = clusterfile.load(path)
        return cls(spec.local_nodes, spec.state_dir, spec=spec, accept_host_keys=accept_host_keys)

    def _ssh_nodes(self) -> SshNodes:
        """This process's connections to the cluster's SSH nodes (made on first use)."""
        from dpmigrate.runtime.ssh_cluster import SshNodes

        record = self._require_record()
        if self._ssh is None or self._ssh.record is not record:
            self._ssh = SshNodes(record, self.state_dir, self._save, self.accept_host_keys)
        return self._ssh

    def close(self) -> None:
        """Close this process's SSH connections to the cluster's nodes (``down`` does it too;
        the next use opens them again). The cluster itself is untouched."""
        if self._ssh is not None:
            self._ssh.close()
            self._ssh = None

    def _is_ssh(self, name: str) -> bool:
        return any(e["name"] == name for e in self._require_record().get("ssh", []))

    @classmethod
    def current(cls, state_dir: str | None = None) -> LocalCluster:
        """The cluster recorded in ``state_dir``; DpmigrateError when none is up."""
        state_dir = state_dir or config.load().state_dir
        path = _record_path(state_dir)
        record = _load(path)
        if record is None:
            raise DpmigrateError(NO_CLUSTER)
        cluster = cls(int(record.get("size", 0)) or 1, state_dir)
        cluster._record = record
        return cluster

    # -- context manager ------------------------------------------------------------------
    def __enter__(self) -> LocalCluster:
        self.up()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    # -- facts ----------------------------------------------------------------------------
    @property
    def id(self) -> str:
        return str(self._require_record()["id"])

    @property
    def token(self) -> str:
        return str(self._require_record()["token"])

    @property
    def nodes(self) -> list[Node]:
        record = self._require_record()
        agents = {a["node"]: a for a in record.get("agents", [])}
        local = [
            Node(
                name=n["name"],
                netns=n["netns"],
                address=n["address"],
                agent_socket=n["agent_socket"],
                agent_pid=_current_agent(agents.get(n["name"], {}))[0],
                log=n.get("log", ""),
                keeper_pid=agents.get(n["name"], {}).get("keeper_pid"),
            )
            for n in record.get("nodes", [])
        ]
        remote = [
            Node(name=e["name"], netns=e.get("netns", ""), address=e["address"], agent_socket="",
                 agent_pid=e.get("agent_pid"), log=e.get("log", ""), keeper_pid=e.get("keeper_pid"),
                 kind="ssh", ssh=e.get("url", ""))
            for e in record.get("ssh", [])
        ]  # fmt: skip
        return local + remote

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        known = ", ".join(n.name for n in self.nodes)
        raise ConfigError(f"no node {name!r} in the local cluster (nodes: {known})")

    def client(self, node_name: str, timeout: float = 30.0) -> AgentClient:
        """An authenticated connection to ``node_name``'s agent (through its socket file, or
        for an SSH node through the SSH connection's tunnel)."""
        node = self.node(node_name)
        if node.kind == "ssh":
            return self._ssh_nodes().client(node_name, timeout)
        return AgentClient(node.agent_socket, self.token, timeout=timeout)

    # -- stages -----------------------------------------------------------------------------
    def find_stage(self, stage: str) -> tuple[str, str, str]:
        """Where a running stage is: (node, app, stage). ``stage`` is ``STAGE`` or
        ``APP/STAGE``; an ambiguous or unknown name is an error listing what runs."""
        app, _, name = stage.rpartition("/")
        found, running, unreachable = [], [], []
        for node in self.nodes:
            try:
                with self.client(node.name) as agent:
                    stages = agent.call("status")["stages"]
            except DpmigrateError:  # a dead node: what runs on the others still counts
                unreachable.append(node.name)
                continue
            for info in stages:
                if info.get("finished") or not info.get("pid"):
                    continue
                if info.get("role", "primary") != "primary":
                    continue  # a replica of a stage (standby, statesync target)
                running.append(f"{info['app']}/{info['name']}@{node.name}")
                if info["name"] == name and (not app or info["app"] == app):
                    found.append((node.name, info["app"], info["name"]))
        if len(found) == 1:
            return found[0]
        what = ", ".join(running) or "nothing"
        if unreachable:
            what += f"; nodes not answering: {', '.join(unreachable)}"
        if not found:
            raise DpmigrateError(f"no running stage {stage!r} in the cluster (running: {what})")
        raise DpmigrateError(f"stage name {stage!r} is ambiguous; use APP/STAGE (running: {what})")

    def checkpoint(
        self, stage: str, out: str | os.PathLike[str], leave_running: bool = False
    ) -> dict[str, Any]:
        """Checkpoint a running stage into the bundle ``out`` (its node's agent runs CRIU)."""
        node, app, name = self.find_stage(stage)
        with self.client(node, timeout=300) as agent:
            return agent.call(
                "checkpoint_stage", app=app, stage=name, out=str(Path(out).absolute()),
                leave_running=leave_running,
            )  # fmt: skip

    def restore(
        self,
        bundle: str | os.PathLike[str],
        node: str | None = None,
        cold: bool = False,
        trust_owner: bool = False,
    ) -> dict[str, Any]:
        """Restore a stage bundle on ``node`` (default: the node it was checkpointed on).

        A restore is a placement change: refused while the stage runs anywhere (one live copy
        only), and the stage is placed on ``node`` with a new epoch before it wakes there.

        ``cold``: no CRIU — a fresh instance of the stage starts from the bundle's state
        snapshot and ring positions (:mod:`dpmigrate.migrate.cold_restore`), for a node whose
        kernel, CPU or CRIU cannot restore the images; the images are neither read nor needed.
        It is always placed with a new epoch, and it starts from the stage's latest committed
        point: a bundle taken with ``--leave-running`` is older than the journal of the node
        the stage ran on afterwards, which is read (:meth:`_later_point`).

        ``trust_owner``: accept a bundle of another user, or one group or others may write
        (refused otherwise, here and again by the node's agent, which is told the same)."""
        from dpmigrate.checkpoint import bundle as bundles
        from dpmigrate.checkpoint import cold as colds

        t0 = time.monotonic()
        # refuse a bad bundle before asking any agent
        loaded = (
            colds.read(bundle, trust_owner=trust_owner)
            if cold
            else bundles.load(bundle, trust_owner=trust_owner)
        )
        target = node or loaded.node
        if target is None:
            raise DpmigrateError(f"bundle {bundle} names no node; pass --node")
        self.node(target)  # a clear error for an unknown node
        context = (loaded.context if isinstance(loaded, colds.ColdBundle) else loaded.rings) or {}
        app, stage = str(context.get("app", "")), str(context.get("stage", ""))
        for other in self.nodes:
            with self.client(other.name) as agent:
                for info in agent.call("status")["stages"]:
                    live = not info.get("finished") and not info.get("moved")
                    if live and (info.get("app"), info.get("name")) == (app, stage):
                        raise DpmigrateError(
                            f"stage {app}/{stage} is running on node {other.name}; stop it "
                            "(or checkpoint it without --leave-running) before restoring a copy"
                        )
        keep_newer = False
        point = None
        if app and stage:
            store = self.store()
            placed = store.placement(app, stage)
            keep_newer = placed is not None and placed.node == target
            if isinstance(loaded, colds.ColdBundle) and placed is not None and not keep_newer:
                point = self._later_point(loaded, placed.node)
            if not keep_newer or cold:
                before = {name: p.node for name, p in store.placements(app).items()}
                store.place(app, stage, target, placed)
                self._restart_changed_peers(str(context["manifest"]), stage, before, target)
        with self.client(target, timeout=300) as agent:
            if not cold:
                return agent.call("restore_stage", bundle=str(Path(bundle).absolute()),
                                  wake=True, keep_newer_journal=keep_newer,
                                  trust_owner=trust_owner)  # fmt: skip
            result = agent.call("cold_restore_stage", bundle=str(Path(bundle).absolute()),
                                keep_newer_journal=keep_newer, point=point,
                                trust_owner=trust_owner)  # fmt: skip
        return {**result, "total_s": round(time.monotonic() - t0, 4)}

    def _later_point(self, loaded: Any, last_node: str) -> dict[str, Any] | None:
        """The committed point of ``loaded``'s stage in the journal of ``last_node`` (where it
        is placed, so where it last ran), for a cold restore elsewhere: the stage may have run
        on after its checkpoint. None when that node cannot say and the bundle's point is
        where the stage ended (taken without ``--leave-running``); refused when it cannot say
        and the stage went on, since the producers no longer retain what it consumed since."""
        app, _, stage = loaded.key.partition("/")
        try:
            with self.client(last_node, timeout=60) as agent:
                return dict(agent.call("journal_point", app=app, stage=stage))
        except DpmigrateError as err:
            if not loaded.leave_running:
                return None
            raise DpmigrateError(
                f"bundle {loaded.path} was taken with --leave-running: stage {loaded.key} ran "
                f"on after it, and its later committed point, in the journal on node "
                f"{last_node}, cannot be read ({err}); nothing was changed. Restore it on "
                f"{last_node} (--node {last_node}), or from a checkpoint taken without "
                "--leave-running"
            ) from err

    def _restart_changed_peers(
        self, manifest: str, stage: str, before: dict[str, str], target: str
    ) -> None:
        """Peers whose ring to ``stage`` changes transport with its new node (shm between
        stages of one node, tcp between nodes) restart from their journals, so that they
        reopen that ring the new way before the restored stage looks for it."""
        from dpmigrate.runtime.manifest import App
        from dpmigrate.runtime.stagehost import peers_changing_transport

        app = App.load(manifest)
        changed = peers_changing_transport(app, stage, before, {**before, stage: target})
        for peer in sorted(changed & set(before)):
            with self.client(before[peer], timeout=60) as agent:
                agent.call("restart_stage", app=app.name, stage=peer)

    def _require_record(self) -> dict[str, Any]:
        if self._record is None:
            raise DpmigrateError(NO_CLUSTER)
        return self._record

    # -- up -------------------------------------------------------------------------------
    def up(self) -> None:
        """Build the namespaces, links and agents; on any failure remove what was made."""
        _require_root("build a local cluster")
        if not (self.spec is not None and self.spec.ssh_nodes and self.size == 0) and not (
            1 <= self.size <= MAX_NODES
        ):
            raise ConfigError(
                f"--nodes {self.size} is out of range: a local cluster has 1 to {MAX_NODES} nodes"
            )
        _tool("ip", "iproute2")
        longest = nodefs.host_dir(self.state_dir, f"node{self.size}") / AGENT_SOCKET
        if len(str(longest).encode()) > _MAX_SOCKET_PATH:
            raise ConfigError(
                f"DPMIGRATE_STATE_DIR={self.state_dir!r} is too long for the agents' unix "
                f"sockets ({longest} exceeds {_MAX_SOCKET_PATH} bytes); use a shorter path"
            )
        nsenter = _tool("nsenter", "util-linux")
        token = config.load().token or secrets.token_hex(16)
        cid = secrets.token_hex(3)
        cdir = _cluster_dir(self.state_dir)
        # Every directory made here is recorded, so down() can remove it again if empty.
        missing = [p for p in reversed(Path(self.state_dir).parents) if not p.exists()]
        dirs = [d for d in (*missing, Path(self.state_dir), cdir, cdir / "logs") if not d.exists()]
        for d in dirs:
            d.mkdir(mode=0o700, exist_ok=True)
        hub = f"dpm{cid}-hub"
        nodes = [
            {
                "name": f"node{i}",
                "netns": f"dpm{cid}-node{i}",
                "address": f"{SUBNET}.{i}",
                "agent_socket": str(nodefs.host_dir(self.state_dir, f"node{i}") / AGENT_SOCKET),
                "dir": str(nodefs.host_dir(self.state_dir, f"node{i}")),
                "log": str(cdir / "logs" / f"node{i}.log"),
            }
            for i in range(1, self.size + 1)
        ]
        record: dict[str, Any] = {
            "version": RECORD_VERSION,
            "id": cid,
            "size": self.size,
            "status": "creating",
            "created": time.time(),
            "creator_pid": os.getpid(),
            "boot_id": _boot_id(),
            "state_dir": self.state_dir,
            "token": token,
            "hub": hub,
            "nodes": nodes,
            "namespaces": [],
            "agents": [],
            "files": [],
            "trees": [],
            "etcd": {},
            "dirs": [str(d) for d in dirs],
        }
        if self.spec is not None:
            from dpmigrate.runtime.ssh_cluster import entry_of

            record["file"] = self.spec.path
            record["ssh"] = [entry_of(n, self.spec.known_hosts, hub) for n in self.spec.ssh_nodes]
            self._check_labs(record)
        _claim(self.record_path, record)  # refuses when a cluster is already recorded
        self._record = record
        try:
            self._build(record, hub, nodes, nsenter)
        except BaseException:
            with contextlib.suppress(DpmigrateError):
                self.down()
            raise

    def _reserve_hugepages(self, record: dict[str, Any]) -> None:
        """Reserve the cluster's 2 MB pages before any stage can run; the record has the
        entry before the pool is touched (down gives back exactly the delta)."""
        if not self.hugepages:
            return

        def save(entry: dict[str, Any]) -> None:
            record["hugepages"] = entry
            self._save()

        hugepages_mod.reserve(self.hugepages, save)  # a short one: its note is in status

    def _save(self) -> None:
        assert self._record is not None
        _save(self.record_path, self._record)

    def _add_netns(self, name: str) -> None:
        if _netns_exists(name):  # not ours: never record (and so never delete) it
            raise EnvironmentProblem(f"network namespace {name} already exists; try again")
        assert self._record is not None
        self._record["namespaces"].append(name)
        self._save()
        try:
            _ip("netns", "add", name)
        except EnvironmentProblem as err:
            if os.strerror(errno.EEXIST) in str(err):  # someone else's after all
                self._record["namespaces"].remove(name)
                self._save()
            raise

    def _build(
        self, record: dict[str, Any], hub: str, nodes: list[dict[str, Any]], nsenter: str
    ) -> None:
        self._add_netns(hub)
        _ip("-n", hub, "link", "set", "lo", "up")
        _ip("-n", hub, "link", "add", "br0", "type", "bridge", "forward_delay", "0")
        _ip("-n", hub, "addr", "add", f"{STORE_ADDRESS}/24", "dev", "br0")
        _ip("-n", hub, "link", "set", "br0", "up")
        self._reserve_hugepages(record)
        self._start_etcd(hub, nsenter)
        for i, node in enumerate(nodes, start=1):
            ns = node["netns"]
            self._add_netns(ns)
            _ip("-n", ns, "link", "set", "lo", "up")  # CRIU needs loopback up
            # Created inside the hub with its peer directly in the node: never in the host.
            _ip("-n", hub, "link", "add", f"veth{i}", "type", "veth", "peer", "name", "eth0",
                "netns", ns)  # fmt: skip
            _ip("-n", hub, "link", "set", f"veth{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{node['address']}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

        for node in nodes:
            self._start_agent(node, nodes, nsenter)
        for node in nodes:
            self._wait_agent(node)
        self._check_links(nodes)
        for i, entry in enumerate(record.get("ssh", []), start=1):
            if entry.get("netns"):
                self._attach_lab(hub, entry, i)
        for entry in record.get("ssh", []):
            report = self._ssh_nodes().start(entry["name"], *self._ssh_agent_settings())
            entry["doctor_warnings"] = report["warnings"]
        record["status"] = "up"
        self._save()

    def _ssh_agent_settings(self) -> tuple[str, pki.TlsFiles | None, dict[str, str]]:
        """What an SSH node's agent is started with: the store's endpoints, its client TLS
        files (copied to the host), and this process's settings (the host-specific ones and
        the secrets are left out by :mod:`dpmigrate.runtime.ssh_node`)."""
        store = self._require_record()["etcd"]
        tls = store.get("tls")
        return store["endpoints"], pki.TlsFiles(**tls) if tls else None, dict(os.environ)

    def _check_labs(self, record: dict[str, Any]) -> None:
        """A lab host (``netns`` in the cluster file) must exist, and its address must be on
        the cluster's bridge and free."""
        assert self.spec is not None
        for entry in record["ssh"]:
            if not entry.get("netns"):
                continue
            field = f"{self.spec.path}: nodes.{entry['name']}"
            if not _netns_exists(entry["netns"]):
                raise ConfigError(
                    f"{field}.netns: network namespace {entry['netns']} does not exist (ip "
                    "netns list); create it, with the SSH server in it"
                )
            prefix, _, last = entry["address"].rpartition(".")
            if prefix != SUBNET or not last.isdigit() or not self.size < int(last) < 254:
                raise ConfigError(f"{field}.ssh: a lab host's address must be {SUBNET}.N with "
                                  f"{self.size} < N < 254 (the local nodes have .1-.{self.size}, "
                                  f"the hub .254), not {entry['address']}")  # fmt: skip

    def _attach_lab(self, hub: str, entry: dict[str, Any], index: int) -> None:
        """Link a lab host's namespace to the bridge at its address. Not recorded as ours: the
        namespace is the user's; its end of the link goes when the hub's does."""
        assert self._record is not None
        link = f"dpm{self._record['id']}"
        entry["lab_link"] = link
        self._save()  # before the link exists: down() removes it
        _ip("-n", hub, "link", "add", f"vssh{index}", "type", "veth", "peer", "name", link,
            "netns", entry["netns"])  # fmt: skip
        _ip("-n", hub, "link", "set", f"vssh{index}", "master", "br0", "up")
        _ip("-n", entry["netns"], "link", "set", "lo", "up")
        _ip("-n", entry["netns"], "addr", "add", f"{entry['address']}/24", "dev", link)
        _ip("-n", entry["netns"], "link", "set", link, "up")

    def _start_etcd(self, hub: str, nsenter: str) -> None:
        """The cluster store, unless DPMIGRATE_ETCD names an existing one: one etcd member in
        the hub's namespace, on the bridge's address only, its data in the cluster folder."""
        assert self._record is not None
        record, cfg = self._record, config.load()
        if self.spec is not None and not self.spec.etcd.embedded:
            e = self.spec.etcd
            record["etcd"] = {"endpoints": ",".join(e.endpoints), "embedded": False}
            if e.ca:
                record["etcd"]["tls"] = {"ca": e.ca, "cert": e.cert, "key": e.key}
            self._save()
            return
        if cfg.etcd and self.spec is None:
            record["etcd"] = {"endpoints": cfg.etcd, "embedded": False}
            self._save()
            return
        data = _cluster_dir(self.state_dir) / "etcd"
        log_path = _cluster_dir(self.state_dir) / "logs" / "etcd.log"
        tls_dir = _cluster_dir(self.state_dir) / "tls"
        record["trees"] += [str(data), str(tls_dir)]
        record["files"].append(str(log_path))
        self._save()  # before anything is made
        # Mutual TLS with a CA of this cluster only: no certificate, no store (pki.py).
        server, client = pki.make(tls_dir, (STORE_ADDRESS,))
        cmd = etcd.command(etcd.binary(cfg.prefix), str(data), STORE_ADDRESS, tls=server)
        entry: dict[str, Any] = {"endpoints": f"https://{STORE_ADDRESS}:{etcd.CLIENT_PORT}",
                                 "embedded": True, "netns": hub, "pid": None,
                                 "start_time": None, "log": str(log_path), "cmd": cmd,
                                 "tls": dataclasses.asdict(client)}  # fmt: skip
        record["etcd"] = entry
        self._save()  # before the spawn, as for the agents
        proc = etcd.spawn(cmd, str(log_path), prefix=[nsenter, f"--net=/run/netns/{hub}"])
        self._procs[proc.pid] = proc
        entry["pid"], entry["start_time"] = proc.pid, process_start_time(proc.pid)
        self._save()
        deadline = time.monotonic() + _ETCD_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise EnvironmentProblem(
                    f"etcd exited with status {proc.returncode} while starting: "
                    f"{_tail(str(log_path))}"
                )
            try:
                self.store().health()
                return
            except StoreUnavailable:
                if time.monotonic() >= deadline:
                    raise EnvironmentProblem(
                        f"etcd did not answer within {_ETCD_START_TIMEOUT_S:.0f} s: "
                        f"{_tail(str(log_path))}"
                    ) from None
                time.sleep(0.05)

    def store(self) -> Store:
        """The cluster store, as this process reaches it (through the hub's namespace when
        it is the embedded member)."""
        record = self._require_record()
        entry = record.get("etcd") or {}
        if not entry.get("endpoints"):
            raise DpmigrateError(
                "this cluster was recorded without a store (made by an older dpmigrate); "
                "`dpmigrate cluster down` and up again"
            )
        if self._store is None:
            cfg = config.load()
            netns = NetnsExecutor(entry["netns"]) if entry.get("netns") else None
            tls = entry.get("tls") or {"ca": cfg.etcd_ca, "cert": cfg.etcd_cert,
                                       "key": cfg.etcd_key}  # fmt: skip
            settings = EtcdSettings.parse(entry["endpoints"], tls["ca"], tls["cert"],
                                          tls["key"])  # fmt: skip
            self._store = Store(settings, netns=netns)
        return self._store

    def _start_agent(self, node: dict[str, Any], nodes: list[dict[str, Any]], nsenter: str) -> None:
        assert self._record is not None
        record = self._record
        # The node's own folder: only it is visible to the node's agent and stages.
        nodes_dir = Path(node["dir"]).parent
        if not nodes_dir.exists():
            nodes_dir.mkdir(mode=0o700)
            record["dirs"].append(str(nodes_dir))
        record["trees"].append(node["dir"])
        self._save()
        Path(node["dir"]).mkdir(mode=0o700)
        record["files"] += [node["log"]]
        entry: dict[str, Any] = {"node": node["name"], "pid": None, "start_time": None}
        record["agents"].append(entry)
        self._save()  # before the spawn: a crash now still names the files and netns
        self._spawn_agent(node, entry, nsenter)

    def _agent_etcd_tls(self, node: dict[str, Any]) -> dict[str, str]:
        """The embedded store's client files, copied into ``node``'s own folder (the only one
        its agent sees), as the agent's settings name them inside its mount namespace."""
        assert self._record is not None
        tls = self._record["etcd"].get("tls")
        if not tls:
            return {}
        pki.copy(pki.TlsFiles(**tls), Path(node["dir"]) / "etcd-tls")
        seen = pki.TlsFiles(**tls).inside(nodefs.node_dir(self.state_dir) / "etcd-tls")
        return {"DPMIGRATE_ETCD_CA": seen.ca, "DPMIGRATE_ETCD_CERT": seen.cert,
                "DPMIGRATE_ETCD_KEY": seen.key}  # fmt: skip

    def _spawn_agent(self, node: dict[str, Any], entry: dict[str, Any], nsenter: str) -> None:
        """Start ``node``'s agent under its keeper (which restarts it when it dies); record the
        keeper's PID and start time in ``entry``, and the agent's once the keeper names it
        (bounded; :meth:`_wait_agent` records it from the agent's own answer otherwise)."""
        assert self._record is not None
        record = self._record
        env = {
            **os.environ,
            "DPMIGRATE_TOKEN": record["token"],
            "DPMIGRATE_STATE_DIR": self.state_dir,
            **self._agent_etcd_tls(node),
        }
        keeper_file = Path(node["dir"]) / KEEPER_FILE
        keeper_file.unlink(missing_ok=True)  # a keeper that gave up left it: it names no agent
        cmd = [
            nsenter, f"--net=/run/netns/{node['netns']}", sys.executable, "-m",
            "dpmigrate.agentd", "--keep", "--keep-file", KEEPER_FILE,
            "--node", node["name"], "--isolate", "--socket", AGENT_SOCKET,
            "--listen", f"{node['address']}:{AGENT_PORT}", "--etcd", record["etcd"]["endpoints"],
        ]  # fmt: skip
        fd = os.open(node["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, env=env,
                close_fds=True, start_new_session=True,
            )  # fmt: skip
        finally:
            os.close(fd)
        self._procs[proc.pid] = proc
        # nsenter execs the keeper: same PID, same start time
        entry.update(keeper_pid=proc.pid, keeper_start_time=process_start_time(proc.pid),
                     keeper_file=str(keeper_file), pid=None, start_time=None)  # fmt: skip
        self._save()
        deadline = time.monotonic() + _KEEPER_START_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            pid, start = _current_agent(entry)
            if pid is not None:
                entry["pid"], entry["start_time"] = pid, start
                self._save()
                return
            time.sleep(0.01)

    def restart_agent(self, name: str) -> bool:
        """Make sure ``name``'s agent runs again after it died (killed, crashed): True once a
        new agent answers, False (nothing done) if the recorded one still runs.

        Its keeper normally restarts it by itself within about a second: then this only waits
        (bounded) until the new agent answers. Without a live keeper (it gave up, or was
        killed) a new keeper is started. Either way the new agent takes over the stages the old
        one left running (their table is in the node's own folder) and rejoins the store."""
        _require_root("restart an agent")
        record = self._require_record()
        if self._is_ssh(name):
            return self._ssh_nodes().restart(name, *self._ssh_agent_settings())
        node = next((n for n in record["nodes"] if n["name"] == name), None)
        entry = next((a for a in record["agents"] if a["node"] == name), None)
        if node is None or entry is None:
            raise ConfigError(f"no node {name!r} in the local cluster")
        pid = entry.get("pid")
        if isinstance(pid, int) and _same_process(pid, entry.get("start_time"), None):
            return False
        if not _keeper_alive(entry):
            self._spawn_agent(node, entry, _tool("nsenter", "util-linux"))
        self._wait_agent(node, first_start=False)
        return entry.get("pid") != pid

    def _wait_agent(self, node: dict[str, Any], first_start: bool = True) -> None:
        """Bounded wait until the agent answers a ping on its socket file; records the PID
        that answered (the agent's own, whichever restart it is).

        ``first_start``: an agent that dies while starting is an error at once (its keeper
        would retry, but a first start that fails, fails again: a bad port, no store). Else
        (after a crash) the keeper's restarts are waited through, until it gives up."""
        assert self._record is not None
        entry = next(a for a in self._record["agents"] if a["node"] == node["name"])
        keeper = self._procs.get(entry.get("keeper_pid") or entry["pid"])
        deadline = time.monotonic() + _AGENT_START_TIMEOUT_S
        last: Exception | None = None
        while time.monotonic() < deadline:
            state = agent_keeper.read_state(entry.get("keeper_file") or "") or {}
            gone = keeper.poll() is not None if keeper is not None else not _keeper_alive(entry)
            if gone or (first_start and state.get("last_exit")):
                how = state.get("last_exit") or (
                    f"status {keeper.returncode}" if keeper is not None else "keeper gone"
                )
                raise EnvironmentProblem(
                    f"the agent of {node['name']} exited ({how}) while starting: "
                    f"{_tail(node['log'])}"
                )
            if os.path.exists(node["agent_socket"]):
                try:
                    with AgentClient(node["agent_socket"], self._record["token"], 2) as c:
                        pong = c.call("ping")
                    pid = pong.get("pid") if isinstance(pong, dict) else None
                    if isinstance(pid, int) and pid != entry.get("pid"):
                        entry["pid"], entry["start_time"] = pid, process_start_time(pid)
                        self._save()
                    return
                except DpmigrateError as err:
                    last = err
            time.sleep(0.05)
        raise EnvironmentProblem(
            f"the agent of {node['name']} did not answer within {_AGENT_START_TIMEOUT_S:.0f} s "
            f"({last or 'no socket'}): {_tail(node['log'])}"
        )

    def _check_links(self, nodes: list[dict[str, Any]]) -> None:
        """Prove the veths carry traffic: a registration on node1 must reach every node.

        Registrations are pushed from agent to agent over TCP on 10.213.0.0/24, so a lookup
        answered by node<N>'s own registry means node1 reached it through the bridge. A push
        that raced a peer's TCP listener is retried by registering again (same generation:
        the registry accepts it), all within a bounded time.
        """
        if len(nodes) < 2:
            return
        assert self._record is not None
        token = self._record["token"]
        ring = f"dpmigrate.cluster-check.{self._record['id']}"
        endpoint = {"transport": "tcp", "address": f"{nodes[0]['address']}:1", "generation": 0}
        deadline = time.monotonic() + _CHECK_TIMEOUT_S
        missing = list(nodes[1:])
        try:
            with AgentClient(nodes[0]["agent_socket"], token, 10) as first:
                while missing and time.monotonic() < deadline:
                    first.call("register", ring=ring, endpoint=endpoint)
                    still = []
                    for node in missing:
                        with AgentClient(node["agent_socket"], token, 10) as other:
                            if other.call("lookup", ring=ring, timeout=1.0) is None:
                                still.append(node)
                    missing = still
        finally:
            for node in nodes:
                with (
                    contextlib.suppress(DpmigrateError),
                    AgentClient(node["agent_socket"], token, 5) as c,
                ):
                    c.call("unregister", ring=ring)
        if missing:
            names = ", ".join(n["name"] for n in missing)
            raise EnvironmentProblem(
                f"{nodes[0]['name']}'s agent could not reach {names} over the veth links within "
                f"{_CHECK_TIMEOUT_S:.0f} s; see {_cluster_dir(self.state_dir) / 'logs'}"
            )

    # -- down / status --------------------------------------------------------------------
    def down(self) -> list[str]:
        """Stop the agents and remove every recorded namespace, file and the record.

        Idempotent, and complete after a half-finished up(): it works from the record alone.
        """
        record = self._record if self._record is not None else _load(self.record_path)
        orphans = _orphaned_run_groups(self.state_dir)  # killed multi-process runs' groups
        if record is None:
            return orphans
        _require_root("remove the local cluster")
        self.close()  # teardown connects afresh, from the record alone
        removed = orphans + _teardown(self.record_path, record)
        for proc in self._procs.values():  # reap our own children (no zombies, no warnings)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0)
        self._procs.clear()
        self._record = None
        return removed

    def status(self, timeout: float = 2.0) -> dict[str, Any]:
        """What the record says, checked against reality (process alive, agent answers)."""
        record = self._require_record()
        boot_id = record.get("boot_id", "")
        agents = {a["node"]: a for a in record.get("agents", [])}
        rows = []
        for node in self.nodes:
            if node.kind == "ssh":
                rows.append(self._ssh_nodes().status_row(node.name, timeout))
                continue
            entry = agents.get(node.name, {})
            pid, start = _current_agent(entry)
            running = isinstance(pid, int) and _same_process(pid, start, boot_id)
            keeper = agent_keeper.read_state(entry.get("keeper_file") or "") or {}
            answers = False
            error = ""
            if running:
                try:
                    with AgentClient(node.agent_socket, record["token"], timeout) as c:
                        pong = c.call("ping")
                    answers = isinstance(pong, dict) and pong.get("node") == node.name
                except DpmigrateError as err:
                    error = str(err)
            rows.append(
                {
                    "name": node.name,
                    "kind": "local",
                    "netns": node.netns,
                    "netns_present": _netns_exists(node.netns),
                    "address": node.address,
                    "agent_socket": node.agent_socket,
                    "agent_pid": pid,
                    "agent_running": running,
                    "alive": answers,
                    "keeper_pid": entry.get("keeper_pid"),
                    "keeper_running": _keeper_alive(entry, boot_id),
                    "agent_restarts": keeper.get("restarts", 0),
                    "agent_last_exit": keeper.get("last_exit", ""),
                    "error": error,
                    "log": node.log,
                }
            )
        store: dict[str, Any]
        try:
            store = {"reachable": True, **self.store().health()}
        except DpmigrateError as err:
            store = {"reachable": False, "error": str(err)}
        members: dict[str, Any] = {}
        if store["reachable"]:
            with contextlib.suppress(DpmigrateError):
                members = self.store().get_prefix("nodes/")[0]
        for row in rows:  # a node is a member while its agent's lease in etcd lives
            row["member"] = f"nodes/{row['name']}" in members
        store["embedded"] = bool((record.get("etcd") or {}).get("embedded"))
        store["pid"] = (record.get("etcd") or {}).get("pid")
        healthy = (
            record.get("status") == "up" and all(r["alive"] for r in rows) and store["reachable"]
        )
        return {
            "id": record["id"],
            "state_dir": self.state_dir,
            "record": str(self.record_path),
            "status": record.get("status"),
            "healthy": healthy,
            "created": record.get("created"),
            "hub": record.get("hub"),
            "namespaces": [
                {"name": ns, "present": _netns_exists(ns)} for ns in record.get("namespaces", [])
            ],
            "nodes": rows,
            "store": store,
            "hugepages": self._hugepages_status(record),
        }

    @staticmethod
    def _hugepages_status(record: dict[str, Any]) -> dict[str, Any] | None:
        """What this cluster reserved (its record entry) beside the pool as it is now."""
        entry = record.get("hugepages")
        if not isinstance(entry, dict):
            return None
        try:
            now = dataclasses.asdict(hugepages_mod.counts())
        except DpmigrateError as err:
            now = {"error": str(err)}
        return {**entry, "pool_now": now}

    def agent_log(self, name: str, lines: int | None = None) -> str:
        """A node's agent log (its last ``lines``): read here for a local node, over SFTP
        from its host for an SSH node, where it is kept."""
        node = self.node(name)
        if node.kind == "ssh":
            return self._ssh_nodes().node(name).log_text(lines)
        try:
            text = Path(node.log).read_text(errors="replace")
        except OSError as err:
            raise DpmigrateError(f"node {name}: no log at {node.log} ({err.strerror})") from err
        return text if lines is None else "\n".join(text.splitlines()[-lines:])

    def host_path(self, node: str, path: str) -> Path:
        """Where a path that ``node``'s agent reports (in its own view) lies on this host."""
        inner = nodefs.node_dir(self.state_dir)
        try:
            relative = Path(path).relative_to(inner)
        except ValueError:
            return Path(path)  # not in the node's folder: the same on the host
        return nodefs.host_dir(self.state_dir, node) / relative


def _tail(path: str, lines: int = 5) -> str:
    """The last lines of an agent log, for an error message that explains itself."""
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return f"(no log at {path})"
    return " | ".join(text) if text else f"(log {path} is empty)"
