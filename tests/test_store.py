"""The cluster store against a real etcd member (127.0.0.1, ports of its own, data in tmp)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import require

from dpmigrate import config
from dpmigrate.cluster import etcd
from dpmigrate.cluster.store import (
    EtcdSettings,
    Lease,
    PlacementConflict,
    Store,
    StoreUnavailable,
    Watch,
    wait_healthy,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Member:
    """A throw-away etcd member; restartable on the same ports and data."""

    def __init__(self, tmp: Path) -> None:
        self.data = tmp / "etcd"
        self.log = tmp / "etcd.log"
        self.client_port, self.peer_port = _free_port(), _free_port()
        self.proc = None
        self.url = f"http://127.0.0.1:{self.client_port}"

    def start(self) -> None:
        cmd = etcd.command(
            etcd.binary(config.load().prefix),
            str(self.data),
            "127.0.0.1",
            self.client_port,
            self.peer_port,
        )
        self.proc = etcd.spawn(cmd, str(self.log))
        wait_healthy(Store(EtcdSettings.parse(self.url)), 20)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def member(tmp_path: Path) -> Iterator[Member]:
    require("etcd")
    m = Member(tmp_path)
    m.start()
    try:
        yield m
    finally:
        m.stop()


def test_put_get_prefix_delete(member: Member) -> None:
    store = Store(EtcdSettings.parse(member.url))
    assert store.health()["version"].startswith("3.4")
    store.put("rings/a.b", {"address": "x"})
    store.put("rings/a.c", {"address": "y"})
    value, revision = store.get("rings/a.b")
    assert value == {"address": "x"} and revision > 0
    found, _ = store.get_prefix("rings/")
    assert found == {"rings/a.b": {"address": "x"}, "rings/a.c": {"address": "y"}}
    store.delete_prefix("rings/")
    assert store.get("rings/a.b") is None


def test_placement_compare_and_swap_lets_exactly_one_change_win(member: Member) -> None:
    store = Store(EtcdSettings.parse(member.url))
    first = store.place("flows", "table", "node1", None)
    assert (first.node, first.epoch) == ("node1", 1)
    with pytest.raises(PlacementConflict):  # a second "create" loses
        store.place("flows", "table", "node2", None)
    results: list[str] = []

    def move(node: str) -> None:
        try:
            store.place("flows", "table", node, first)
            results.append(node)
        except PlacementConflict:
            results.append("conflict")

    threads = [threading.Thread(target=move, args=(f"node{i}",)) for i in (2, 3, 4, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results).count("conflict") == 3
    now = store.placement("flows", "table")
    assert now.epoch == 2 and now.node in {"node2", "node3", "node4", "node5"}
    assert results.count(now.node) == 1


def test_watch_sees_every_change_and_resumes_after_etcd_restarts(member: Member) -> None:
    store = Store(EtcdSettings.parse(member.url))
    _, revision = store.get_prefix("placement/")
    seen: list[tuple[str, object]] = []
    got = threading.Condition()

    def on_event(event) -> None:
        with got:
            seen.append((event.key, event.value))
            got.notify_all()

    watch = Watch(store, "placement/", revision, on_event).start()
    try:
        assert watch.connected.wait(10)
        store.put("placement/flows/a", {"node": "node1", "epoch": 1})
        with got:
            assert got.wait_for(lambda: len(seen) == 1, 10)
        member.stop()  # the fault: etcd killed; the watch's stream breaks
        assert member.proc.poll() is not None
        with pytest.raises(StoreUnavailable, match="unreachable"):
            store.put("placement/flows/b", {"node": "node2", "epoch": 1})
        member.start()
        store.put("placement/flows/b", {"node": "node2", "epoch": 1})
        store.delete("placement/flows/a")
        with got:
            assert got.wait_for(lambda: len(seen) == 3, 15), seen
        assert seen == [
            ("placement/flows/a", {"node": "node1", "epoch": 1}),
            ("placement/flows/b", {"node": "node2", "epoch": 1}),
            ("placement/flows/a", None),
        ]
    finally:
        watch.stop()


def test_a_lease_keeps_its_key_while_refreshed_and_drops_it_after(member: Member) -> None:
    store = Store(EtcdSettings.parse(member.url))
    lease = Lease(store, ttl=1).start()
    store.put("nodes/n1", {"node": "n1"}, lease=lease.id)
    time.sleep(2.5)  # longer than the TTL: only the keepalives keep the key
    assert store.get("nodes/n1") is not None
    lease.stop(revoke=False)
    deadline = time.monotonic() + 10
    while store.get("nodes/n1") is not None:
        assert time.monotonic() < deadline, "the key outlived its lease"
        time.sleep(0.1)


def test_unreachable_etcd_is_one_clear_error() -> None:
    store = Store(EtcdSettings.parse(f"http://127.0.0.1:{_free_port()}"), timeout=0.5)
    with pytest.raises(StoreUnavailable, match="placement changes and migrations wait"):
        store.placement("flows", "table")
    with pytest.raises(Exception, match="must be http"):
        EtcdSettings.parse("127.0.0.1:2379")
