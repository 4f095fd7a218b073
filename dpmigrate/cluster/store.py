"""The cluster store: etcd, the one authority for membership, apps, placement and rings.

Everything the nodes must agree on lives here (DESIGN.md §7); nothing else is shared between
nodes. Keys, all under ``/dpmigrate/``::

    nodes/<node>                 {"node", "address", "agent", "pid", "since"}  on the node's lease
    apps/<app>                   {"manifest", "started"}
    placement/<app>/<stage>      {"node", "epoch"}     changed only by compare-and-swap
    rings/<ring>                 {"transport", "address", "generation", "epoch", "stage"}
    cordon/<node>                {"node", "since", "reason"}  unschedulable (cluster/cordon.py)

The client speaks etcd's v3 JSON gateway (built into etcd 3.4) through ``requests``. Why not a
client library: python-etcd3 is unmaintained and ships generated gRPC/protobuf code that breaks
with the protobuf pycriu needs; etcd3gw (the maintained gateway client) was tried, but its
watch iterator never ends when the stream breaks (an etcd restart) and it has no failover
between endpoints — the two things this store needs most. What is used of the gateway is
small: range, put, delete, txn, lease grant/keepalive/revoke, maintenance status, watch.

A placement change is a transaction that compares the key's ``mod_revision`` with the one
read: of two concurrent changes exactly one wins, and every change increments the epoch, which
fences a stale copy of the stage (DESIGN.md §3).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import requests

from dpmigrate.cluster.netns import NetnsExecutor
from dpmigrate.errors import DpmigrateError

log = logging.getLogger("dpmigrate.store")

PREFIX = "/dpmigrate/"
#: Seconds a unary request to etcd may take before the store counts as unreachable.
REQUEST_TIMEOUT_S = 3.0
#: Bound on a watch's reconnection pause after its stream broke.
_WATCH_RETRY_MAX_S = 1.0


class StoreUnavailable(DpmigrateError):
    """etcd cannot be reached; running stages go on, placement changes must wait."""


class PlacementConflict(DpmigrateError):
    """Another placement change of the same stage won the compare-and-swap."""


def _b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _range_end(prefix: str) -> str:
    """The first key after every key that starts with ``prefix`` (etcd's prefix range)."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return _b64(bytes(raw))


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one stage runs, and the epoch that says which copy of it is the real one."""

    node: str
    epoch: int
    revision: int = 0  # the key's mod_revision, for the next compare-and-swap

    def as_dict(self) -> dict[str, Any]:
        return {"node": self.node, "epoch": self.epoch}


@dataclasses.dataclass(frozen=True)
class Event:
    """One change seen by a watch: ``value`` is None for a deletion."""

    key: str
    value: Any
    revision: int


@dataclasses.dataclass(frozen=True)
class EtcdSettings:
    """How to reach etcd: endpoints (``http://host:port``) and optional TLS files."""

    endpoints: tuple[str, ...]
    ca: str = ""
    cert: str = ""
    key: str = ""

    @classmethod
    def parse(cls, endpoints: str, ca: str = "", cert: str = "", key: str = "") -> EtcdSettings:
        urls = tuple(e.strip().rstrip("/") for e in endpoints.split(",") if e.strip())
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise DpmigrateError(
                    f"etcd endpoint {url!r} must be http://HOST:PORT or https://HOST:PORT"
                )
        if not urls:
            raise DpmigrateError("no etcd endpoint given; set DPMIGRATE_ETCD")
        return cls(urls, ca, cert, key)

    def as_text(self) -> str:
        return ",".join(self.endpoints)


def new_session(settings: EtcdSettings) -> requests.Session:
    """An HTTP session for etcd: its TLS files, and never a proxy for cluster traffic."""
    session = requests.Session()
    session.trust_env = False
    if settings.ca:
        session.verify = settings.ca
    if settings.cert and settings.key:
        session.cert = (settings.cert, settings.key)
    return session


class Store:
    """A connection to etcd (thread-safe: one HTTP session per thread)."""

    def __init__(
        self,
        settings: EtcdSettings,
        timeout: float = REQUEST_TIMEOUT_S,
        netns: NetnsExecutor | None = None,
    ) -> None:
        self.settings = settings
        self.timeout = timeout
        #: requests go through this thread when etcd is reachable only inside a namespace
        self.netns = netns
        self._local = threading.local()
        self._preferred = 0  # index of the endpoint that answered last

    # -- transport ------------------------------------------------------------------------
    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = new_session(self.settings)
        return session

    def _post(self, path: str, body: dict[str, Any], timeout: float | None = None) -> Any:
        """POST to the v3 gateway, trying each endpoint once, the last good one first."""
        if self.netns is not None:
            return self.netns.run(self._post_here, path, body, timeout)
        return self._post_here(path, body, timeout)

    def _post_here(self, path: str, body: dict[str, Any], timeout: float | None) -> Any:
        urls = self.settings.endpoints
        order = [(self._preferred + i) % len(urls) for i in range(len(urls))]
        errors = []
        for index in order:
            try:
                resp = self._session().post(
                    f"{urls[index]}/v3/{path}", json=body, timeout=timeout or self.timeout
                )
            except requests.RequestException as err:
                errors.append(f"{urls[index]}: {type(err).__name__}")
                continue
            if resp.status_code != 200:
                raise DpmigrateError(
                    f"etcd at {urls[index]} refused {path}: HTTP {resp.status_code} "
                    f"{resp.text[:200]}"
                )
            self._preferred = index
            return resp.json()
        raise StoreUnavailable(
            f"etcd is unreachable ({'; '.join(errors)}); running stages keep running, but "
            "placement changes and migrations wait until it is back (`dpmigrate cluster status`)"
        )

    # -- key-value ------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """The member's version, leader and revision; StoreUnavailable when it is down."""
        status = self._post("maintenance/status", {})
        return {
            "endpoint": self.settings.endpoints[self._preferred],
            "version": status.get("version"),
            "leader": status.get("leader"),
            "revision": int(status.get("header", {}).get("revision", 0)),
            "db_size": int(status.get("dbSize", 0)),
        }

    def put(self, key: str, value: Any, lease: int | None = None) -> int:
        """Write ``value`` as JSON; returns the new revision."""
        body: dict[str, Any] = {"key": _b64(PREFIX + key), "value": _b64(json.dumps(value))}
        if lease:
            body["lease"] = str(lease)
        reply = self._post("kv/put", body)
        return int(reply.get("header", {}).get("revision", 0))

    def get(self, key: str) -> tuple[Any, int] | None:
        """``(value, mod_revision)`` of one key, or None."""
        reply = self._post("kv/range", {"key": _b64(PREFIX + key)})
        kvs = reply.get("kvs") or []
        if not kvs:
            return None
        return _decode_value(kvs[0]), int(kvs[0].get("mod_revision", 0))

    def get_prefix(self, prefix: str) -> tuple[dict[str, Any], int]:
        """Every key under ``prefix`` (relative names) and the store's revision then."""
        full = PREFIX + prefix
        reply = self._post("kv/range", {"key": _b64(full), "range_end": _range_end(full)})
        found = {}
        for kv in reply.get("kvs") or []:
            found[_unb64(kv["key"]).decode()[len(PREFIX) :]] = _decode_value(kv)
        return found, int(reply.get("header", {}).get("revision", 0))

    def delete(self, key: str) -> None:
        self._post("kv/deleterange", {"key": _b64(PREFIX + key)})

    def delete_prefix(self, prefix: str) -> None:
        full = PREFIX + prefix
        self._post("kv/deleterange", {"key": _b64(full), "range_end": _range_end(full)})

    def swap(
        self, key: str, revision: int, value: Any, unchanged: dict[str, int] | None = None
    ) -> bool:
        """Write ``value`` only if the key's mod_revision is still ``revision`` (0: absent) —
        and each key of ``unchanged`` still has the mod_revision given there."""
        guards = {key: revision, **(unchanged or {})}
        compare = [{"key": _b64(PREFIX + k), "target": "MOD", "result": "EQUAL",
                    "mod_revision": str(r)} for k, r in guards.items()]  # fmt: skip
        put = {"request_put": {"key": _b64(PREFIX + key), "value": _b64(json.dumps(value))}}
        reply = self._post("kv/txn", {"compare": compare, "success": [put]})
        return bool(reply.get("succeeded"))

    def delete_if(self, key: str, value: Any) -> bool:
        """Delete the key only while it still holds exactly ``value``."""
        compare = {"key": _b64(PREFIX + key), "target": "VALUE", "result": "EQUAL",
                   "value": _b64(json.dumps(value))}  # fmt: skip
        delete = {"request_delete_range": {"key": _b64(PREFIX + key)}}
        reply = self._post("kv/txn", {"compare": [compare], "success": [delete]})
        return bool(reply.get("succeeded"))

    # -- leases ---------------------------------------------------------------------------
    def grant(self, ttl: int) -> int:
        reply = self._post("lease/grant", {"TTL": str(ttl)})
        if reply.get("error"):
            raise DpmigrateError(f"etcd refused a lease of {ttl} s: {reply['error']}")
        return int(reply["ID"])

    def keepalive(self, lease: int) -> int:
        """Refresh a lease once; returns its remaining TTL (0: it had already expired)."""
        reply = self._post("lease/keepalive", {"ID": str(lease)})
        return int(reply.get("result", {}).get("TTL", 0))

    def revoke(self, lease: int) -> None:
        self._post("lease/revoke", {"ID": str(lease)})

    # -- placement ------------------------------------------------------------------------
    def placement(self, app: str, stage: str) -> Placement | None:
        found = self.get(f"placement/{app}/{stage}")
        if found is None:
            return None
        value, revision = found
        return Placement(str(value["node"]), int(value["epoch"]), revision)

    def placements(self, app: str) -> dict[str, Placement]:
        found, _ = self.get_prefix(f"placement/{app}/")
        return {
            key.rsplit("/", 1)[1]: Placement(str(v["node"]), int(v["epoch"]))
            for key, v in found.items()
        }

    def place(
        self,
        app: str,
        stage: str,
        node: str,
        expect: Placement | None,
        unchanged: dict[str, int] | None = None,
    ) -> Placement:
        """Move ``stage`` to ``node``: epoch + 1, by compare-and-swap against ``expect``
        (None: the stage must have no placement yet), and only while each key of
        ``unchanged`` keeps its mod_revision. PlacementConflict if anything changed."""
        epoch = (expect.epoch if expect else 0) + 1
        revision = expect.revision if expect else 0
        value = {"node": node, "epoch": epoch}
        if not self.swap(f"placement/{app}/{stage}", revision, value, unchanged):
            now = self.placement(app, stage)
            raise PlacementConflict(
                f"stage {app}/{stage} was placed meanwhile (now {now.node if now else 'nowhere'}, "
                f"epoch {now.epoch if now else 0}); nothing was changed — look again and retry"
            )
        placed = self.placement(app, stage)
        assert placed is not None
        return placed


def _decode_value(kv: dict[str, Any]) -> Any:
    raw = _unb64(kv.get("value", ""))
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("etcd key %s holds a value that is not JSON; ignored", kv.get("key"))
        return None


class Watch:
    """Calls ``on_event`` for every change under ``prefix``, from ``revision`` + 1 on, in its
    own thread, until :meth:`stop`. A broken stream (etcd restarted, a network fault) is
    resumed from the last revision seen, so no change is missed; if etcd compacted that
    revision away, ``on_reset`` gets a fresh read of the whole prefix instead."""

    def __init__(
        self,
        store: Store,
        prefix: str,
        revision: int,
        on_event: Callable[[Event], None],
        on_reset: Callable[[dict[str, Any], int], None] | None = None,
    ) -> None:
        self.store = store
        self.prefix = prefix
        self.revision = revision
        self.on_event = on_event
        self.on_reset = on_reset
        self.connected = threading.Event()
        self._stopping = threading.Event()
        self._response: requests.Response | None = None
        self._thread = threading.Thread(target=self._run, name=f"watch {prefix}", daemon=True)

    def start(self) -> Watch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        response = self._response
        if response is not None:
            # Closing a response that another thread is reading blocks; shutting its socket
            # down ends that read at once.
            with contextlib.suppress(OSError, AttributeError, ValueError):
                sock = socket.socket(fileno=os.dup(response.raw._fp.fileno()))
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        self._thread.join(timeout=2.0)

    def _run(self) -> None:
        pause = 0.05
        while not self._stopping.is_set():
            try:
                for event in self._stream():
                    self.on_event(event)
                    pause = 0.05
            except (requests.RequestException, StoreUnavailable, ValueError, KeyError) as err:
                if self._stopping.is_set():
                    return
                log.info("watch of %s broke (%s); resuming from revision %d",
                         self.prefix, type(err).__name__, self.revision)  # fmt: skip
            self.connected.clear()
            self._stopping.wait(pause)
            pause = min(_WATCH_RETRY_MAX_S, pause * 2)

    def _stream(self) -> Iterator[Event]:
        full = PREFIX + self.prefix
        create = {"key": _b64(full), "range_end": _range_end(full),
                  "start_revision": str(self.revision + 1)}  # fmt: skip
        url = self.store.settings.endpoints[self.store._preferred]
        # A stream per watch, on its own session: it stays open for as long as we watch.
        with new_session(self.store.settings) as session:
            response = session.post(f"{url}/v3/watch", json={"create_request": create},
                                    stream=True, timeout=(self.store.timeout, None))  # fmt: skip
            self._response = response
            if self._stopping.is_set():
                return
            for line in response.iter_lines(chunk_size=None):
                if not line.strip():
                    continue
                message = json.loads(line)
                result = message.get("result") or {}
                if "error" in message:
                    raise ValueError(str(message["error"]))
                if result.get("created"):
                    self.connected.set()
                    continue
                if int(result.get("compact_revision", 0) or 0) > self.revision:
                    self._reset()
                    continue
                for raw in result.get("events") or []:
                    kv = raw["kv"]
                    revision = int(kv.get("mod_revision", 0))
                    key = _unb64(kv["key"]).decode()[len(PREFIX) :]
                    value = None if raw.get("type") == "DELETE" else _decode_value(kv)
                    self.revision = max(self.revision, revision)
                    yield Event(key, value, revision)

    def _reset(self) -> None:
        found, revision = self.store.get_prefix(self.prefix)
        self.revision = revision
        if self.on_reset is not None:
            self.on_reset(found, revision)
        raise ValueError("watch compacted; read afresh")


class Lease:
    """A node's membership: a lease kept alive in a thread; its keys vanish when it lapses
    (the agent died, or was cut off for longer than the TTL)."""

    def __init__(self, store: Store, ttl: int, on_lost: Callable[[], None] | None = None) -> None:
        self.store = store
        self.ttl = ttl
        self.on_lost = on_lost or (lambda: None)
        self.id = store.grant(ttl)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease", daemon=True)

    def start(self) -> Lease:
        self._thread.start()
        return self

    def _run(self) -> None:
        interval = max(0.2, self.ttl / 3)
        while not self._stopping.wait(interval):
            try:
                if self.store.keepalive(self.id) <= 0:
                    log.warning("lease %x expired; the node is no longer a member", self.id)
                    self.on_lost()
                    return
            except StoreUnavailable as err:
                log.warning("lease %x not refreshed: %s", self.id, err)

    def stop(self, revoke: bool = True) -> None:
        self._stopping.set()
        self._thread.join(timeout=2.0)
        if revoke:
            with contextlib.suppress(StoreUnavailable):
                self.store.revoke(self.id)


def wait_healthy(store: Store, timeout: float) -> dict[str, Any]:
    """Until etcd answers (bounded); the last StoreUnavailable if it never does."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return store.health()
        except StoreUnavailable:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)
