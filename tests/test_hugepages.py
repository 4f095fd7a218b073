"""Hugepages on demand (issue 15): a cluster reserves 2 MB pages for its shm rings and gives
back exactly what it added — only its delta when someone else changed the pool meanwhile,
never below what is in use — and a shm ring uses 2 MB pages when one is free, else 4 KB
pages, saying why in its statistics.

The pool is the host's one ``nr_hugepages``: every test leaves it as it found it (the
``pool`` fixture puts back what it saw, in a ``finally``, and checks it), whatever it did or
failed to do. Other engineers' runs may map pages meanwhile; the checks allow for that only
where said.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import require, run_cli

from dpmigrate.cluster import hugepages
from dpmigrate.errors import ConfigError
from dpmigrate.transports import shm
from dpmigrate.transports.resolver import MemoryResolver

HUGE = 2 << 20


class Pool:
    """The host's 2 MB pool as a test found it; :meth:`restore` puts that count back."""

    def __init__(self) -> None:
        self.start = hugepages.counts()

    def total(self) -> int:
        return hugepages.counts().total

    def set(self, value: int) -> None:
        (hugepages.POOL / "nr_hugepages").write_text(f"{value}\n")

    def restore(self) -> None:
        now = hugepages.counts()
        self.set(max(self.start.total, now.in_use - (now.total - self.start.total)))


@pytest.fixture
def pool() -> Iterator[Pool]:
    require("root")
    if not hugepages.POOL.exists():
        pytest.skip(f"no 2 MB hugepage pool ({hugepages.POOL})")
    p = Pool()
    try:
        yield p
    finally:
        p.restore()
    assert p.total() == p.start.total, "the test left the hugepage pool changed"


def _reserved(pool: Pool, pages: int) -> dict:
    entries: list[dict] = []
    entry = hugepages.reserve(pages, lambda e: entries.append(dict(e)))
    assert entries[0]["added"] is None, "the record is written before the pool is touched"
    if entry["added"] < pages:
        pytest.skip(f"the kernel gave {entry['added']} of {pages} hugepages (memory short)")
    assert pool.total() == pool.start.total + pages
    return entry


# -- the pool --------------------------------------------------------------------------------
def test_reserve_then_release_gives_back_exactly_the_delta(pool: Pool) -> None:
    entry = _reserved(pool, 4)
    assert entry["before"] == pool.start.total and entry["asked"] == 4
    lines = hugepages.release(entry)
    assert pool.total() == pool.start.total
    assert lines == [f"hugepages: 4 2 MB pages given back ({pool.start.total} in the pool)"]
    assert hugepages.release({**entry, "added": 0}) == []


def test_release_leaves_someone_elses_change(pool: Pool) -> None:
    entry = _reserved(pool, 3)
    pool.set(pool.start.total + 5)  # someone else adds 2 meanwhile
    lines = hugepages.release(entry)
    assert pool.total() == pool.start.total + 2, "only this reservation's 3 given back"
    assert "changed by someone else meanwhile" in lines[0], lines


def test_release_never_goes_below_what_is_in_use(pool: Pool) -> None:
    """A ring holding 3 pages when the cluster gives back: the pool stays at what is in use,
    and the line says how many of ours are still held."""
    entry = _reserved(pool, 3)
    tx = shm.open_sender("huge-held", resolver=MemoryResolver(), hugepages=True)
    try:
        assert tx.statistics().extra["page_size"] == HUGE
        held = hugepages.counts().in_use
        lines = hugepages.release(entry)
        assert pool.total() == max(held, pool.start.total), lines
        assert any("in use" in line for line in lines) or held <= pool.start.total, lines
    finally:
        tx.close()


def test_an_interrupted_reservation_is_bounded_by_what_it_asked(pool: Pool) -> None:
    """A crash between the write and the record's update leaves ``added`` None: release then
    gives back at most what was asked, and only what the pool grew by."""
    entry = _reserved(pool, 2)
    assert hugepages.release({**entry, "added": None})
    assert pool.total() == pool.start.total


@pytest.mark.parametrize("bad", [-1, 1 << 20, "3", True, 2.5])
def test_a_bad_count_is_one_config_error(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"--hugepages: the number of 2 MB hugepages must be"):
        hugepages.check_count(bad, "--hugepages")


# -- the ring -------------------------------------------------------------------------------
def _pair(name: str) -> tuple[shm.ShmSender, shm.ShmReceiver]:
    resolver = MemoryResolver()
    tx = shm.open_sender(name, resolver=resolver)
    rx = shm.open_receiver(name, resolver=resolver, connect_timeout=5)
    return tx, rx


def _exchange(tx: shm.ShmSender, rx: shm.ShmReceiver) -> dict:
    tx.send(b"x" * 100)
    got: list[bytes] = []
    while not got:
        got = rx.recv_burst(1, timeout=5)
    assert got == [b"x" * 100]
    return rx.statistics().extra


def test_a_ring_uses_2mb_pages_when_reserved_and_both_ends_say_so(pool: Pool) -> None:
    _reserved(pool, 3 + pool.start.free)  # the default ring maps 6 MiB: 3 pages
    tx, rx = _pair("huge-yes")
    try:
        extra = tx.statistics().extra
        assert extra["page_size"] == HUGE and extra["hugepages"] is True, extra
        assert extra["page_fallback"] is None
        seen = _exchange(tx, rx)
        assert seen["page_size"] == HUGE and seen["hugepages"] is True, seen
    finally:
        rx.close()
        tx.close()


def test_a_short_reservation_falls_back_to_4kb_and_says_why(pool: Pool) -> None:
    """One free page where a ring needs three: the ring runs on 4 KB pages, and its
    statistics name the pool's counts and the fix."""
    free = hugepages.counts().free
    if free > 1:
        pytest.skip(f"{free} hugepages free on this host: cannot make the pool short")
    _reserved(pool, 1 - free)
    tx, rx = _pair("huge-short")
    try:
        extra = tx.statistics().extra
        assert extra["page_size"] == 4096 and extra["hugepages"] is False, extra
        assert "hugepage reservation short: 3 2 MB pages needed, 1 of" in extra["page_fallback"]
        assert "--hugepages" in extra["page_fallback"]
        assert _exchange(tx, rx)["page_size"] == 4096
    finally:
        rx.close()
        tx.close()


# -- the cluster ----------------------------------------------------------------------------
def test_cluster_up_reserves_and_down_gives_back(
    cluster_state_dir: Path, pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DPMIGRATE_HUGEPAGES for the Python API, --hugepages for the CLI: each reserves, says it
    in the record and in status, and down gives back exactly that."""
    from dpmigrate.runtime.cluster import LocalCluster

    monkeypatch.setenv("DPMIGRATE_HUGEPAGES", "4")
    with LocalCluster(1) as cluster:
        record = json.loads(cluster.record_path.read_text())
        assert record["hugepages"]["asked"] == 4, record["hugepages"]
        added = record["hugepages"]["added"]
        assert pool.total() == pool.start.total + added
        status = cluster.status()["hugepages"]
        assert status["added"] == added and status["pool_now"]["total"] == pool.total()
    assert pool.total() == pool.start.total
    monkeypatch.delenv("DPMIGRATE_HUGEPAGES")

    up = run_cli("cluster", "up", "--nodes", "1", "--hugepages", "3", timeout=120)
    try:
        assert up.returncode == 0, up.stderr
        assert "hugepages: 3 of 3 2 MB pages reserved by this cluster" in up.stdout, up.stdout
        assert pool.total() == pool.start.total + 3
    finally:
        down = run_cli("cluster", "down", "--json", timeout=120)
    assert down.returncode == 0, down.stderr
    assert "hugepages: 3 2 MB pages given back" in down.stdout
    assert pool.total() == pool.start.total
    bad = run_cli("cluster", "up", "--nodes", "1", "--hugepages", "-2")
    assert bad.returncode != 0 and "--hugepages: the number of 2 MB hugepages" in bad.stderr


def test_a_multi_process_runs_rings_take_the_pages_there_are(pool: Pool, tmp_path: Path) -> None:
    """Three free pages, two rings of three pages each: one ring gets 2 MB pages, the other
    4 KB ones — its status says why and its stage logs a warning; the app still ends with
    lost = dup = 0."""
    from support import checker_of, paced_flows

    from dpmigrate.runtime.manifest import App
    from dpmigrate.runtime.multiprocess import MultiProcessRun

    free = hugepages.counts().free
    if free > 3:
        pytest.skip(f"{free} hugepages free on this host: cannot make the pool short")
    _reserved(pool, 3 - free)
    run = MultiProcessRun(App.load(paced_flows(tmp_path, 20000)), run_dir=tmp_path / "run")
    with run:
        assert run.wait(duration=60), run.status()
        stages = run.status()
    rings = {r["name"]: r for s in stages for r in s.get("rings", []) if r["role"] == "producer"}
    assert len(rings) == 2, rings
    pages = sorted(r["extra"]["page_size"] for r in rings.values())
    assert pages == [4096, HUGE], rings
    short = next(r for r in rings.values() if r["extra"]["page_size"] == 4096)
    assert "hugepage reservation short: 3 2 MB pages needed" in short["extra"]["page_fallback"]
    producer = next(s for s in stages if short in [r for r in s.get("rings", [])])
    events = [json.loads(line) for line in Path(producer["log"]).read_text().splitlines()
              if line.startswith("{")]  # fmt: skip
    warned = [e for e in events if e.get("event") == "ring on 4 KB pages"]
    assert warned and warned[0]["level"] == "warning" and warned[0]["ring"] == short["name"]
    assert {k: checker_of(stages)[k] for k in ("lost", "duplicated")} == {
        "lost": 0,
        "duplicated": 0,
    }
