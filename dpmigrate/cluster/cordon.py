"""Cordon: a node marked unschedulable in the cluster store.

A cordoned node keeps running what it runs; no placement decision may choose it — a drain's
destination, a standby's takeover, an explicit ``dpmigrate migrate ... --to NODE`` (refused,
naming ``dpmigrate uncordon NODE``). Kubernetes' cordon is the model: the mark is what an
operator sets before maintenance, and only an operator clears it.

The mark is its own key, ``cordon/<node>`` = ``{"node", "since", "reason"}``, *not* a field
of ``nodes/<node>``: that key lives on the agent's lease and vanishes when the agent dies or
restarts, while a cordon must outlast both (a node cordoned for maintenance is often rebooted).
The key is written by whoever cordons (the CLI, a drain) straight to etcd, as placement changes
are; every decision reads it fresh from etcd, never from a cached copy, since a stale "not
cordoned" would place a stage on a node being emptied.
"""

from __future__ import annotations

import time
from typing import Any

from dpmigrate.cluster.store import Store
from dpmigrate.errors import PlacementRefused

PREFIX = "cordon/"


def key(node: str) -> str:
    return f"{PREFIX}{node}"


def cordon(store: Store, node: str, reason: str = "") -> dict[str, Any]:
    """Mark ``node`` unschedulable (idempotent: a node already cordoned keeps its first mark).
    Returns ``{"node", "cordoned": True, "changed", "since", "reason"}``."""
    found = store.get(key(node))
    if found is not None and isinstance(found[0], dict):
        return {"node": node, "cordoned": True, "changed": False, **_mark(found[0])}
    mark = {"node": node, "since": time.time(), "reason": reason}
    # Only if nobody cordoned it meanwhile (then theirs stands, and it is cordoned either way).
    changed = store.swap(key(node), 0, mark)
    now = store.get(key(node))
    value = now[0] if now is not None and isinstance(now[0], dict) else mark
    return {"node": node, "cordoned": True, "changed": changed, **_mark(value)}


def uncordon(store: Store, node: str) -> dict[str, Any]:
    """Make ``node`` schedulable again (idempotent). ``changed``: it was cordoned."""
    was = store.get(key(node)) is not None
    store.delete(key(node))
    return {"node": node, "cordoned": False, "changed": was}


def cordoned(store: Store) -> dict[str, dict[str, Any]]:
    """Every cordoned node and its mark (``since``, ``reason``), read fresh from etcd."""
    found, _ = store.get_prefix(PREFIX)
    return {k[len(PREFIX) :]: _mark(v) for k, v in found.items() if isinstance(v, dict)}


def is_cordoned(store: Store, node: str) -> bool:
    return store.get(key(node)) is not None


def refuse_if_cordoned(store: Store, node: str, what: str) -> None:
    """PlacementRefused when ``node`` is cordoned: ``what`` is the decision refused (one
    line, with the way out)."""
    if is_cordoned(store, node):
        raise PlacementRefused(
            f"node {node} is cordoned (unschedulable): {what} refused; "
            f"`dpmigrate uncordon {node}` first, or choose another node"
        )


def _mark(value: dict[str, Any]) -> dict[str, Any]:
    return {"since": value.get("since"), "reason": str(value.get("reason", ""))}
