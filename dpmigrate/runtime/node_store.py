"""An agent's view of the cluster store: its node's lease, and the ring registry and
placements as local copies that etcd's watches keep current.

Ring ends ask their local agent, so a lookup is answered from memory, the moment the watch
delivered a change (push, not poll), and also while etcd is unreachable: running stages keep
finding each other then. What must be decided by the store — a registration, a placement
read at a stage's start or wake — goes to etcd; a registration made while etcd is down is kept
and written when it is back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from dpmigrate.cluster.store import Event, Lease, Placement, Store, StoreUnavailable, Watch
from dpmigrate.errors import EnvironmentProblem

#: How often writes that failed while etcd was down are tried again.
_RETRY_S = 0.5


class NodeStore:
    """Membership, ring registry and placements for one agent. Without a ``store`` (an agent
    run on its own, for tests and single-host use) the registry is this agent's memory only."""

    def __init__(
        self,
        store: Store | None,
        node: str,
        member: dict[str, Any],
        ttl: int,
        log: Callable[..., None],
    ) -> None:
        self.store = store
        self.node = node
        self.member = member
        self.ttl = ttl
        self.log = log
        self.changed = threading.Condition()
        self.rings: dict[str, dict[str, Any]] = {}
        self.placements: dict[str, dict[str, Any]] = {}  # "app/stage" -> {"node", "epoch"}
        self.standbys: dict[str, dict[str, Any]] = {}  # "app/stage" -> {"nodes", "in_sync"}
        self._overrides: dict[tuple[str, str], dict[str, Any]] = {}  # (app, run) -> resources
        self._pending: dict[str, dict[str, Any] | None] = {}  # ring -> endpoint (None: delete)
        self._lease: Lease | None = None
        self._watches: list[Watch] = []
        self._stopping = threading.Event()
        self._retry = threading.Thread(target=self._retry_loop, name="store-retry", daemon=True)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, timeout: float) -> None:
        """Join: a lease with this node's key on it, then the two watches (bounded wait)."""
        if self.store is None:
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._join()
                break
            except StoreUnavailable:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)
        self._retry.start()

    def _join(self) -> None:
        assert self.store is not None
        self._lease = Lease(self.store, self.ttl, on_lost=self._rejoin).start()
        self.store.put(f"nodes/{self.node}", self.member, lease=self._lease.id)
        self._watches = []
        for prefix in ("rings/", "placement/", "standby/"):
            found, revision = self.store.get_prefix(prefix)
            on_event, on_reset = self._watcher(prefix)
            on_reset(found, revision)
            self._watches.append(Watch(self.store, prefix, revision, on_event, on_reset).start())
        self.log("store joined", node=self.node, lease=f"{self._lease.id:x}", ttl=self.ttl)

    def _rejoin(self) -> None:
        """The lease lapsed (etcd was away longer than the TTL): take a new one."""
        self.log("store lease lost", level="warning", node=self.node)
        assert self.store is not None
        while not self._stopping.is_set():
            try:
                self._lease = Lease(self.store, self.ttl, on_lost=self._rejoin).start()
                self.store.put(f"nodes/{self.node}", self.member, lease=self._lease.id)
                self.log("store lease renewed", node=self.node, lease=f"{self._lease.id:x}")
                return
            except StoreUnavailable:
                self._stopping.wait(_RETRY_S)

    def stop(self) -> None:
        """Leave: the node's key goes with the revoked lease; watches end."""
        self._stopping.set()
        for watch in self._watches:
            watch.stop()
        if self._lease is not None:
            self._lease.stop(revoke=True)

    # -- the watches ----------------------------------------------------------------------
    def _mirror(self, prefix: str) -> dict[str, dict[str, Any]]:
        return {"rings/": self.rings, "placement/": self.placements}.get(prefix, self.standbys)

    def _watcher(self, prefix: str) -> tuple[Callable[[Event], None], Callable[..., None]]:
        """The two callbacks that keep the copy of ``prefix`` current: one change, or (after
        etcd compacted the revision a watch needed) a fresh read of the whole prefix."""

        def on_event(event: Event) -> None:
            key = event.key[len(prefix) :]
            with self.changed:
                if isinstance(event.value, dict):
                    self._mirror(prefix)[key] = event.value
                else:
                    self._mirror(prefix).pop(key, None)
                self.changed.notify_all()

        def on_reset(found: dict[str, Any], _revision: int) -> None:
            fresh = {k[len(prefix) :]: v for k, v in found.items() if isinstance(v, dict)}
            with self.changed:
                mirror = self._mirror(prefix)
                mirror.clear()
                mirror.update(fresh)
                self.changed.notify_all()

        return on_event, on_reset

    # -- the ring registry ----------------------------------------------------------------
    def register(self, ring: str, endpoint: dict[str, Any]) -> None:
        """Publish a producer end: here at once, in etcd now or as soon as it is back.

        A registration older than the one known (lower generation, not a newer epoch) is a
        late echo of a replaced end and is ignored."""
        with self.changed:
            old = self.rings.get(ring)
            if (
                old is not None
                and int(old.get("generation", 0)) > int(endpoint.get("generation", 0))
                and int(old.get("epoch", 0)) >= int(endpoint.get("epoch", 0))
            ):
                return
            self.rings[ring] = endpoint
            self._pending.pop(ring, None)
            self.changed.notify_all()
        if self.store is None:
            return
        try:
            self.store.put(f"rings/{ring}", endpoint)
        except StoreUnavailable as err:
            self.log("store write deferred", level="warning", ring=ring, error=str(err))
            with self.changed:
                self._pending[ring] = endpoint

    def unregister(self, ring: str, endpoint: dict[str, Any] | None = None) -> None:
        """Withdraw a producer end — only ``endpoint`` if given, so that a late withdrawal
        never removes the registration of the copy that replaced it."""
        with self.changed:
            current = self.rings.get(ring)
            if endpoint is not None and current is not None and current != endpoint:
                return
            self.rings.pop(ring, None)
            self.changed.notify_all()
        if self.store is None:
            return
        try:
            if endpoint is None:
                self.store.delete(f"rings/{ring}")
            else:
                self.store.delete_if(f"rings/{ring}", endpoint)
        except StoreUnavailable:
            with self.changed:
                self._pending[ring] = None

    def lookup(self, ring: str, timeout: float, newer_than: int = -1) -> dict[str, Any] | None:
        """The ring's endpoint (with a generation above ``newer_than``), waiting up to
        ``timeout`` for the watch to bring one."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                found = self.rings.get(ring)
                if found is not None and int(found.get("generation", 0)) > newer_than:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.changed.wait(remaining)

    def _retry_loop(self) -> None:
        assert self.store is not None
        while not self._stopping.wait(_RETRY_S):
            with self.changed:
                pending = dict(self._pending)
            for ring, endpoint in pending.items():
                try:
                    if endpoint is None:
                        self.store.delete(f"rings/{ring}")
                    elif self._still_current(endpoint):
                        self.store.put(f"rings/{ring}", endpoint)
                    else:  # its stage moved on meanwhile (a rollback, a failover): never write
                        self.log(
                            "store write dropped", level="warning", ring=ring, endpoint=endpoint
                        )
                except StoreUnavailable:
                    break
                with self.changed:
                    if self._pending.get(ring, "gone") == endpoint:
                        del self._pending[ring]
                self.log("store write done", ring=ring)

    def _still_current(self, endpoint: dict[str, Any]) -> bool:
        """A deferred registration is written only while its stage is still placed here
        with that epoch (read fresh: etcd has just answered)."""
        owner = str(endpoint.get("owner", ""))
        if not owner:
            return True
        assert self.store is not None
        app, _, stage = owner.partition("/")
        placed = self.store.placement(app, stage)
        return placed is None or (
            placed.node == self.node and placed.epoch == int(endpoint.get("epoch", 0))
        )

    # -- placement ------------------------------------------------------------------------
    def placement(self, app: str) -> tuple[dict[str, Placement], bool]:
        """The app's placements, read from etcd (so a stage woken right after a change sees
        it); from the watched copy when etcd is down — then the second value is False."""
        try:
            if self.store is None:
                raise StoreUnavailable("no cluster store")
            return self.store.placements(app), True
        except StoreUnavailable:
            with self.changed:
                cached = {
                    key.split("/", 1)[1]: Placement(str(v["node"]), int(v["epoch"]))
                    for key, v in self.placements.items()
                    if key.startswith(app + "/")
                }
            return cached, False

    def resource_overrides(self, app: str, run: str) -> dict[str, Any]:
        """The per-run ``resources`` overrides of ``app`` (stage -> limits), as ``run``'s
        start recorded them in ``apps/<app>``; {} for another run or none. Read once per run
        and kept: a stage restarted or adopted while etcd is away gets the same limits."""
        if (app, run) in self._overrides:
            return self._overrides[(app, run)]
        if self.store is None:
            return {}
        try:
            found = self.store.get(f"apps/{app}")
        except StoreUnavailable as err:
            raise EnvironmentProblem(
                f"cannot read app {app!r}'s resource overrides from the cluster store ({err}); "
                "the stage starts once etcd answers again"
            ) from err
        record = found[0] if found else None
        out: dict[str, Any] = {}
        if isinstance(record, dict) and record.get("run") == run:
            raw = record.get("resources")
            out = raw if isinstance(raw, dict) else {}
            self._overrides[(app, run)] = out
        return out

    def health(self) -> dict[str, Any]:
        """What this agent knows of the store without asking it (status must stay quick
        while etcd is away): its watches' streams, its lease, writes still waiting."""
        if self.store is None:
            return {"reachable": False, "error": "this agent runs without a cluster store"}
        connected = bool(self._watches) and all(w.connected.is_set() for w in self._watches)
        with self.changed:
            pending = len(self._pending)
        return {"reachable": connected, "lease": f"{self._lease.id:x}" if self._lease else None,
                "pending_writes": pending}  # fmt: skip
