"""The SSH nodes of one cluster, as one process reaches them.

The cluster record (``cluster.json``, see :mod:`dpmigrate.runtime.cluster`) lists each SSH node
under ``"ssh"``: how to reach it (user, host, port, identity, known_hosts, the remote
dpmigrate), where the other nodes reach its agent, and — written before each is made — the
folders created on its host and its keeper's PID and start time. Every process that uses the
cluster (``cluster status``, ``migrate``, ``logs``, a Python script) opens its own SSH
connection to each node it needs, verified against the same known_hosts, and keeps it for its
lifetime; nothing about a connection is stored. :func:`teardown` works from the record alone,
like the local teardown, so ``cluster down`` and ``clean`` remove an SSH node's agent and
files too.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any

from dpmigrate.cluster import ssh
from dpmigrate.cluster.clusterfile import SshNodeSpec
from dpmigrate.cluster.netns import NetnsExecutor
from dpmigrate.cluster.pki import TlsFiles
from dpmigrate.errors import DpmigrateError, SshError
from dpmigrate.runtime.control import AgentClient
from dpmigrate.runtime.ssh_node import SshNode, target


def entry_of(spec: SshNodeSpec, known_hosts: str, hub: str) -> dict[str, Any]:
    """The record entry of an SSH node, before anything about it exists."""
    return {
        "name": spec.name,
        "url": spec.url,
        "user": spec.user,
        "host": spec.host,
        "port": spec.port,
        "identity": spec.identity,
        "known_hosts": known_hosts,
        "launcher": list(spec.launcher),
        "address": spec.address,
        "host_key": spec.host_key,
        "netns": spec.netns,
        "via": hub if spec.netns else "",
        "created_dirs": [],
        "keeper_pid": None,
        "keeper_start_time": None,
        "agent_pid": None,
        "log": "",
    }


class SshNodes:
    """Connections to the SSH nodes of ``record``, made on first use and kept."""

    def __init__(
        self,
        record: dict[str, Any],
        state_dir: str,
        save: Callable[[], None] = lambda: None,
        accept: frozenset[str] = frozenset(),
    ) -> None:
        self.record = record
        self.state_dir = state_dir
        self.save = save
        self.accept = accept
        self._nodes: dict[str, SshNode] = {}
        self._netns: dict[str, NetnsExecutor] = {}
        self._lock = threading.Lock()

    @property
    def entries(self) -> list[dict[str, Any]]:
        return list(self.record.get("ssh", []))

    def names(self) -> list[str]:
        return [e["name"] for e in self.entries]

    def entry(self, name: str) -> dict[str, Any] | None:
        return next((e for e in self.entries if e["name"] == name), None)

    def _connector(
        self, entry: dict[str, Any]
    ) -> Callable[[tuple[str, int], float], socket.socket] | None:
        """A lab host is on the cluster's bridge only: connect from inside the hub."""
        via = entry.get("via")
        if not via:
            return None
        if via not in self._netns:
            self._netns[via] = NetnsExecutor(via)
        executor = self._netns[via]
        return lambda address, timeout: executor.run(socket.create_connection, address, timeout)

    def node(self, name: str) -> SshNode:
        """The node, connected (host key verified, authenticated); one connection per node
        however many threads ask (the engine's do)."""
        with self._lock:
            node = self._nodes.get(name)
            if node is not None and node.conn.active:
                return node
            entry = self.entry(name)
            if entry is None:
                raise DpmigrateError(f"no SSH node {name!r} in the cluster")
            conn = ssh.Connection(target(entry, self.accept, self._connector(entry))).open()
            node = SshNode(entry, self.state_dir, conn, self.save)
            self._nodes[name] = node
            return node

    def client(self, name: str, timeout: float = 30.0) -> AgentClient:
        return self.node(name).client(self.record["token"], timeout)

    # -- up -------------------------------------------------------------------------------
    def start(
        self, name: str, endpoints: str, tls: TlsFiles | None, env: dict[str, str]
    ) -> dict[str, Any]:
        """Bring one recorded SSH node in: connect, check, make its folder, start its agent,
        wait until it answers through the tunnel. The remote doctor's findings."""
        node = self.node(name)
        node.entry["host_key"] = node.conn.host_key  # the key it proved: pinned from now on
        self.save()
        report = node.doctor()
        node.make_folder(tls)
        node.start_agent(self.record["token"], endpoints, tls, env)
        node.wait_agent(self.record["token"])
        return report

    def restart(self, name: str, endpoints: str, tls: TlsFiles | None, env: dict[str, str]) -> bool:
        """Start the node's agent again if it is not running (True), else nothing (False)."""
        node = self.node(name)
        if node.keeper() is not None:
            try:
                with node.client(self.record["token"], timeout=5) as agent:
                    agent.call("ping")
                return False
            except DpmigrateError:
                pass  # its keeper restarts it: wait for that below
            node.wait_agent(self.record["token"])
            return True
        node.start_agent(self.record["token"], endpoints, tls, env)
        node.wait_agent(self.record["token"])
        return True

    # -- status, logs ---------------------------------------------------------------------
    def status_row(self, name: str, timeout: float) -> dict[str, Any]:
        entry = self.entry(name) or {}
        row: dict[str, Any] = {
            "name": name,
            "kind": "ssh",
            "ssh": entry.get("url"),
            "netns": entry.get("netns", ""),
            "netns_present": None,
            "address": entry.get("address"),
            "agent_socket": "",
            "agent_pid": entry.get("agent_pid"),
            "agent_running": False,
            "alive": False,
            "keeper_pid": entry.get("keeper_pid"),
            "keeper_running": False,
            "agent_restarts": 0,
            "agent_last_exit": "",
            "error": "",
            "log": f"{entry.get('host')}:{entry.get('log')}",
            "host_key": entry.get("host_key"),
        }
        try:
            node = self.node(name)
            row["keeper_running"] = node.keeper() is not None
            state = node.keeper_state()
            pid, start = state.get("agent_pid"), state.get("agent_start_time")
            row["agent_pid"] = pid
            row["agent_running"] = (
                isinstance(pid, int) and isinstance(start, int) and bool(node.alive([(pid, start)]))
            )
            row["agent_restarts"] = state.get("restarts", 0)
            row["agent_last_exit"] = state.get("last_exit", "")
            if row["agent_running"]:
                with node.client(self.record["token"], timeout) as agent:
                    pong = agent.call("ping")
                row["alive"] = isinstance(pong, dict) and pong.get("node") == name
        except DpmigrateError as err:
            row["error"] = str(err)
        return row

    def close(self) -> None:
        for node in self._nodes.values():
            node.conn.close()
        self._nodes.clear()
        for executor in self._netns.values():
            executor.close()
        self._netns.clear()


def teardown(record: dict[str, Any], state_dir: str) -> tuple[list[str], list[str]]:
    """Stop every recorded SSH node's agent and remove its folder: (removed, problems).

    A node of which nothing was made (it failed at connect, host key, auth or the remote
    doctor) is not connected to again: there is nothing to remove there."""
    removed: list[str] = []
    problems: list[str] = []
    nodes = SshNodes(record, state_dir)
    try:
        for entry in nodes.entries:
            if not entry.get("created_dirs") and not entry.get("keeper_pid"):
                continue
            try:
                removed += nodes.node(entry["name"]).stop(record["token"])
            except SshError as err:
                problems.append(
                    f"{err} (left there: {entry.get('created_dirs') or 'nothing'}, "
                    f"keeper pid {entry.get('keeper_pid')})"
                )
    finally:
        nodes.close()
    return removed, problems
