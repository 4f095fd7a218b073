"""The cluster file: which nodes a cluster has, how to reach them, and where its store is.

``dpmigrate cluster up --file cluster.toml`` and :meth:`LocalCluster.from_file
<dpmigrate.runtime.cluster.LocalCluster.from_file>` read the same file, so the shell and the
Python API build the same cluster::

    [cluster]
    state_dir = "/var/lib/dpmigrate"   # optional: DPMIGRATE_STATE_DIR; the same path on every node
    known_hosts = "known_hosts"        # needed with SSH nodes; relative to this file

    [local]
    nodes = 2                          # node1, node2: network namespaces here, as `--nodes 2`

    [etcd]
    member = "hub"                     # the default: one embedded member (mutual TLS)
    # endpoints = ["https://10.0.0.5:2379"], ca = "...", cert = "...", key = "..."

    [nodes.node3]                      # a node reached over SSH
    ssh = "ssh://root@10.213.0.3:22"
    identity = "id_ed25519"            # private key file, relative to this file
    python = "/opt/dpm/.venv/bin/python"   # or: dpmigrate = "/usr/local/bin/dpmigrate"
    address = "10.213.0.3"             # optional: where the other nodes reach it (the ssh host)
    host_key = "SHA256:..."            # optional: accept this key if known_hosts lacks the host
    netns = "lab-host3"                # optional, a lab: the host is this network namespace here

Parsing is strict because a cluster file is written by hand and a typo must not become a
half-built cluster: every field is checked before anything is created, and a mistake is one
:class:`~dpmigrate.errors.ConfigError` line naming the file, the field and what is wrong.
Unknown fields are refused too (a misspelt ``identiy`` would otherwise be silently ignored).
Only parsing lives here; building the cluster is :mod:`dpmigrate.runtime.cluster`'s job.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any

from dpmigrate.errors import ConfigError

#: Node names, as the app manifest spells them (``node = "..."``).
NODE_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")
#: The names of the local network-namespace nodes: node1 .. nodeN.
LOCAL_NAME_RE = re.compile(r"^node[0-9]+$")
#: An OpenSSH SHA256 fingerprint: ``SHA256:`` and 43 unpadded base64 characters.
FINGERPRINT_RE = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}$")
_NETNS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_LOCAL_NODES = 16

_SECTIONS = {"cluster", "local", "etcd", "nodes"}
_CLUSTER_KEYS = {"state_dir", "known_hosts"}
_LOCAL_KEYS = {"nodes"}
_ETCD_KEYS = {"member", "endpoints", "ca", "cert", "key"}
_NODE_KEYS = {"ssh", "identity", "python", "dpmigrate", "address", "host_key", "netns"}


@dataclasses.dataclass(frozen=True)
class EtcdSpec:
    """The store: the embedded member (``endpoints`` empty) or an existing etcd."""

    endpoints: tuple[str, ...] = ()
    ca: str = ""
    cert: str = ""
    key: str = ""

    @property
    def embedded(self) -> bool:
        return not self.endpoints


@dataclasses.dataclass(frozen=True)
class SshNodeSpec:
    """One node reached over SSH, as the file describes it (paths made absolute)."""

    name: str
    user: str
    host: str
    port: int
    identity: str
    #: the remote command that runs dpmigrate: [python, "-m", "dpmigrate.cli"] or [dpmigrate]
    launcher: tuple[str, ...]
    address: str
    host_key: str = ""
    netns: str = ""

    @property
    def url(self) -> str:
        return f"ssh://{self.user}@{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class ClusterFile:
    path: str
    state_dir: str | None
    known_hosts: str
    local_nodes: int
    etcd: EtcdSpec
    ssh_nodes: tuple[SshNodeSpec, ...]

    @property
    def node_names(self) -> list[str]:
        return [f"node{i}" for i in range(1, self.local_nodes + 1)] + [
            n.name for n in self.ssh_nodes
        ]


class _Reader:
    """Typed access to one table of the file; every complaint names file and field."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, field: str, what: str) -> ConfigError:
        return ConfigError(f"{self.path}: {field}: {what}")

    def table(self, data: dict[str, Any], field: str, allowed: set[str]) -> dict[str, Any]:
        value = data.get(field.rpartition(".")[2], {})
        if not isinstance(value, dict):
            raise self.fail(field, f"must be a table ([{field}]), not {type(value).__name__}")
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise self.fail(
                f"{field}.{unknown[0]}", f"unknown field; known: {', '.join(sorted(allowed))}"
            )
        return value

    def string(
        self, table: dict[str, Any], field: str, key: str, default: str | None = None
    ) -> str:
        value = table.get(key, default)
        if value is None:
            raise self.fail(f"{field}.{key}", "is required")
        if not isinstance(value, str) or not value:
            raise self.fail(f"{field}.{key}", f"must be a non-empty string, not {value!r}")
        if any(c in value for c in "\0\n\r"):
            raise self.fail(f"{field}.{key}", "must not contain NUL or line breaks")
        return value

    def local_file(self, table: dict[str, Any], field: str, key: str, must_exist: bool) -> str:
        """A path on this machine, relative to the cluster file's folder."""
        path = Path(self.string(table, field, key)).expanduser()
        if not path.is_absolute():
            path = self.path.parent / path
        path = path.absolute()
        if must_exist and not path.is_file():
            raise self.fail(f"{field}.{key}", f"{path} does not exist or is not a file")
        return str(path)


def load(path: str | Path) -> ClusterFile:
    """Read and check the cluster file at ``path``; ConfigError (one line) on any mistake."""
    path = Path(path).absolute()
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the cluster file: {err.strerror or err}") from err
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err
    return parse(data, path)


def parse(data: dict[str, Any], path: Path) -> ClusterFile:
    """Check an already-parsed cluster file (``path`` only names it in errors and anchors
    relative paths)."""
    r = _Reader(path)
    unknown = sorted(set(data) - _SECTIONS)
    if unknown:
        raise r.fail(unknown[0], f"unknown section; known: {', '.join(sorted(_SECTIONS))}")
    cluster = r.table(data, "cluster", _CLUSTER_KEYS)
    state_dir = None
    if "state_dir" in cluster:
        state_dir = r.string(cluster, "cluster", "state_dir")
        if not state_dir.startswith("/"):
            raise r.fail("cluster.state_dir", f"must be an absolute path, not {state_dir!r}")
    local = r.table(data, "local", _LOCAL_KEYS)
    count = local.get("nodes", 0)
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_LOCAL_NODES:
        raise r.fail(
            "local.nodes", f"must be a whole number from 0 to {MAX_LOCAL_NODES}, not {count!r}"
        )
    etcd = _etcd(r, r.table(data, "etcd", _ETCD_KEYS))
    nodes_table = data.get("nodes", {})
    if not isinstance(nodes_table, dict):
        raise r.fail("nodes", "must be a table of nodes ([nodes.NAME])")
    ssh_nodes = tuple(_ssh_node(r, name, value, count) for name, value in nodes_table.items())
    known_hosts = ""
    if ssh_nodes:
        known_hosts = r.local_file(cluster, "cluster", "known_hosts", must_exist=False)
        if not Path(known_hosts).parent.is_dir():
            raise r.fail(
                "cluster.known_hosts", f"its folder {Path(known_hosts).parent} does not exist"
            )
    if count + len(ssh_nodes) == 0:
        raise r.fail(
            "local.nodes", "the cluster has no node: give local.nodes or [nodes.NAME] tables"
        )
    seen: dict[str, str] = {}
    for node in ssh_nodes:
        if not node.netns and etcd.embedded:
            raise r.fail(
                f"nodes.{node.name}",
                "a host reached over the network cannot reach the embedded etcd member (it "
                "listens only on this machine's cluster bridge): give [etcd] endpoints that "
                "every node reaches (or netns, for a lab host on this machine)",
            )
        if node.netns and etcd.endpoints:
            raise r.fail(
                f"nodes.{node.name}.netns",
                "a lab namespace joins the cluster's own "
                "bridge: use it with the embedded etcd member, not etcd.endpoints",
            )
        if node.address in seen:
            raise r.fail(
                f"nodes.{node.name}.address", f"{node.address} is node {seen[node.address]}'s too"
            )
        seen[node.address] = node.name
    return ClusterFile(str(path), state_dir, known_hosts, count, etcd, ssh_nodes)


def _etcd(r: _Reader, table: dict[str, Any]) -> EtcdSpec:
    member = table.get("member")
    endpoints = table.get("endpoints")
    if member is not None and endpoints is not None:
        raise r.fail("etcd", "give either member or endpoints, not both")
    if endpoints is None:
        if member not in (None, "hub"):
            raise r.fail(
                "etcd.member",
                f'{member!r}: only "hub" (the embedded member in the '
                "cluster's hub namespace) is supported; for an etcd elsewhere give etcd.endpoints",
            )
        extra = sorted({"ca", "cert", "key"} & set(table))
        if extra:
            raise r.fail(
                f"etcd.{extra[0]}",
                "TLS files go with etcd.endpoints; the embedded member makes its own",
            )
        return EtcdSpec()
    if isinstance(endpoints, str):
        endpoints = [endpoints]
    if not isinstance(endpoints, list) or not endpoints:
        raise r.fail("etcd.endpoints", 'must be a non-empty list of URLs like "https://host:2379"')
    for url in endpoints:
        parsed = urllib.parse.urlsplit(url) if isinstance(url, str) else None
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise r.fail("etcd.endpoints", f"{url!r} is not an http(s)://HOST:PORT URL")
    tls = {
        k: r.local_file(table, "etcd", k, must_exist=True)
        for k in ("ca", "cert", "key")
        if k in table
    }
    if tls and set(tls) != {"ca", "cert", "key"}:
        missing = sorted({"ca", "cert", "key"} - set(tls))
        raise r.fail(f"etcd.{missing[0]}", "TLS needs all three of ca, cert and key")
    return EtcdSpec(tuple(endpoints), tls.get("ca", ""), tls.get("cert", ""), tls.get("key", ""))


def _ssh_node(r: _Reader, name: str, value: object, local_count: int) -> SshNodeSpec:
    field = f"nodes.{name}"
    if not NODE_NAME_RE.fullmatch(name):
        raise r.fail(field, "a node name is a letter, then letters, digits, _ or - (at most 63)")
    if LOCAL_NAME_RE.fullmatch(name) and int(name[4:]) <= local_count and int(name[4:]) > 0:
        raise r.fail(field, f"{name} is one of the local nodes (local.nodes = {local_count})")
    if not isinstance(value, dict):
        raise r.fail(field, "must be a table ([nodes.NAME])")
    unknown = sorted(set(value) - _NODE_KEYS)
    if unknown:
        raise r.fail(
            f"{field}.{unknown[0]}", f"unknown field; known: {', '.join(sorted(_NODE_KEYS))}"
        )
    url = r.string(value, field, "ssh")
    user, host, port = _ssh_url(r, f"{field}.ssh", url)
    identity = r.local_file(value, field, "identity", must_exist=True)
    if ("python" in value) == ("dpmigrate" in value):
        raise r.fail(
            field,
            "give exactly one of python (the remote interpreter with dpmigrate "
            "installed) or dpmigrate (the remote dpmigrate command)",
        )
    key = "python" if "python" in value else "dpmigrate"
    remote = r.string(value, field, key)
    if not remote.startswith("/"):
        raise r.fail(f"{field}.{key}", f"must be an absolute path on {host}, not {remote!r}")
    launcher = (remote, "-m", "dpmigrate.cli") if key == "python" else (remote,)
    address = r.string(value, field, "address", host)
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise r.fail(
            f"{field}.address",
            f"{address!r} is not an IP address (the other nodes "
            'reach its agent there; give address = "A.B.C.D")',
        ) from None
    host_key = value.get("host_key", "")
    if host_key and (not isinstance(host_key, str) or not FINGERPRINT_RE.fullmatch(host_key)):
        raise r.fail(
            f"{field}.host_key",
            f"{host_key!r} is not an SSH fingerprint like SHA256:<43 base64 characters> "
            "(ssh-keygen -lf KEY)",
        )
    netns = value.get("netns", "")
    if netns and (not isinstance(netns, str) or not _NETNS_RE.fullmatch(netns)):
        raise r.fail(f"{field}.netns", f"{netns!r} is not a network namespace name")
    if netns and address != host:
        raise r.fail(
            f"{field}.address",
            "a lab namespace is reached at its ssh host's address; leave address out",
        )
    return SshNodeSpec(name, user, host, port, identity, launcher, address, host_key, netns)


def _ssh_url(r: _Reader, field: str, url: str) -> tuple[str, str, int]:
    """(user, host, port) of ``ssh://user@host[:port]``."""
    shape = "the form ssh://USER@HOST[:PORT]"
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "ssh":
        raise r.fail(field, f"{url!r} is not an ssh:// URL; use {shape}")
    if parsed.password is not None:
        raise r.fail(
            field, f"{url!r} holds a password; dpmigrate authenticates with identity (a key) only"
        )
    if parsed.path not in ("", "/") or parsed.query or parsed.fragment:
        raise r.fail(field, f"{url!r} has a path or query; use {shape}")
    if not parsed.username:
        raise r.fail(field, f"{url!r} names no user; use {shape}")
    if not parsed.hostname:
        raise r.fail(field, f"{url!r} names no host; use {shape}")
    try:
        port = parsed.port or 22
    except ValueError:
        raise r.fail(field, f"{url!r} has a bad port (1-65535)") from None
    return parsed.username, parsed.hostname, port
