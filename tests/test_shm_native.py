"""Focused tests of the shm ring's C core (dpmigrate.native._ring) and its memory layout.

The cross-transport behaviour (order, backpressure, reconnection, ...) is the conformance
kit's job; here we pin what only the C layer knows: the ABI, record wraparound, burst
limits, futex wake-ups between processes, argument checking, and that no entry point leaks.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dpmigrate.errors import ConfigError
from dpmigrate.native import _ring
from dpmigrate.transports import shm
from dpmigrate.transports.resolver import MemoryResolver

HDR = _ring.HEADER_BYTES
REC = _ring.RECORD_HEADER_BYTES


class Pair:
    """A producer and a consumer mapping of one fresh memfd in this process."""

    def __init__(self, data_bytes: int = 4096, capacity: int = 64, max_message: int = 1000):
        self.map_bytes = HDR + data_bytes
        self.fd = _ring.memfd_create("test", self.map_bytes, False)
        self.tx = _ring.Ring(self.fd, self.map_bytes)
        self.tx.init_producer(data_bytes, capacity, max_message)
        self.rx = _ring.Ring(self.fd, self.map_bytes)
        assert self.rx.attach_consumer() is None
        assert self.rx.resync(0) == (_ring.OK, 0, 0)

    def close(self) -> None:
        self.tx.close()
        self.rx.close()
        os.close(self.fd)


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    yield p
    p.close()


# --- layout / ABI ------------------------------------------------------------------------


def test_layout_is_the_documented_abi() -> None:
    lay = _ring.layout()
    assert lay["magic"] == 0 and lay["abi_version"] == 8
    assert lay["data_bytes"] == 16 and lay["capacity"] == 24
    assert lay["max_message"] == 32 and lay["flags"] == 36
    # producer and consumer lines: each on its own 64-byte cache line, not line 0
    producer = {lay[k] // 64 for k in ("head", "head_seq", "data_ec", "producer_waiting")}
    consumer = {lay[k] // 64 for k in ("tail", "tail_seq", "space_ec", "consumer_waiting")}
    assert producer == {1} and consumer == {2}
    assert lay["sizeof_header"] == 192 and lay["sizeof_record"] == REC == 16
    assert HDR == 4096 and _ring.ABI_VERSION == 1
    assert [_ring.record_bytes(n) for n in (0, 1, 8, 9, 64)] == [16, 24, 24, 32, 80]


def test_header_bytes_in_the_memfd(pair: Pair) -> None:
    raw = os.pread(pair.fd, 192, 0)
    magic, abi, hdr_bytes, data_bytes, capacity, max_msg, flags = struct.unpack_from(
        "<QIIQQII", raw
    )
    assert magic == _ring.MAGIC and raw[:8] == b"DMDPRING"
    assert (abi, hdr_bytes, data_bytes, capacity, max_msg, flags) == (1, HDR, 4096, 64, 1000, 0)
    pair.tx.push(b"hello")
    head, head_seq = struct.unpack_from("<QQ", os.pread(pair.fd, 16, 64))
    assert (head, head_seq) == (_ring.record_bytes(5), 1)
    length, rflags, seq = struct.unpack("<IIQ", os.pread(pair.fd, 16, HDR))
    assert (length, rflags, seq) == (5, 0, 0)
    assert os.pread(pair.fd, 5, HDR + REC) == b"hello"
    pair.tx.set_flags(_ring.PRODUCER_CLOSED)
    assert struct.unpack_from("<I", os.pread(pair.fd, 4, 36))[0] == _ring.PRODUCER_CLOSED


def test_consumer_refuses_a_foreign_header() -> None:
    size = HDR + 4096
    fd = _ring.memfd_create("foreign", size, False)
    try:
        ring = _ring.Ring(fd, size)
        assert "magic" in ring.attach_consumer()
        ring.close()
        producer = _ring.Ring(fd, size)
        producer.init_producer(4096, 8, 100)
        os.pwrite(fd, struct.pack("<I", 99), 8)  # ABI version from the future
        ring = _ring.Ring(fd, size)
        assert "ABI" in ring.attach_consumer()
        ring.close()
        producer.close()
    finally:
        os.close(fd)


# --- records, wraparound, bursts ----------------------------------------------------------


def test_wraparound_keeps_every_byte_over_many_laps(pair: Pair) -> None:
    rng = random.Random(7)
    sent: list[bytes] = []
    got: list[bytes] = []
    for _ in range(3000):
        batch = [rng.randbytes(rng.choice((0, 1, 7, 8, 9, 100, 333, 1000))) for _ in range(3)]
        n = pair.tx.push_burst(batch)
        sent.extend(batch[:n])
        got.extend(pair.rx.pop_burst(rng.randint(1, 5), True))
    while True:
        more = pair.rx.pop_burst(64, True)
        if not more:
            break
        got.extend(more)
    assert got == sent
    head, head_seq, tail, tail_seq, read, read_seq, _flags = pair.rx.positions()
    assert head > 20 * 4096, "positions are free-running bytes, far beyond one lap"
    assert head == tail == read and head_seq == tail_seq == read_seq == len(sent)


def test_burst_fills_exactly_the_window(pair: Pair) -> None:
    assert pair.tx.push_burst([b"x"] * 100) == 64  # capacity 64 messages
    assert pair.tx.push_burst([b"x"]) == 0
    assert len(pair.rx.pop_burst(10, False)) == 10
    assert pair.tx.push_burst([b"x"]) == 0, "delivery alone must not free the window"
    pair.rx.commit()
    assert pair.tx.push_burst([b"y"] * 100) == 10


def test_burst_is_limited_by_bytes_too(pair: Pair) -> None:
    big = bytes(1000)  # record of 1016 bytes: four fit in 4096, a fifth does not
    assert pair.tx.push_burst([big] * 10) == 4
    assert pair.tx.push(big) == 0
    pair.rx.pop_burst(1, False)
    pair.rx.commit()
    # 1016 bytes are free again; the 32 bytes left at the end of the area become a pad
    # record and the new record starts at offset 0: 32 + 1016 fit exactly.
    assert pair.tx.push(b"w" * 1000) == 1
    assert pair.tx.positions()[0] == 4096 + 1016
    assert struct.unpack("<IIQ", os.pread(pair.fd, 16, HDR + 4064)) == (16, 1, 0)  # pad
    assert pair.tx.push(b"") == 0, "no byte is left, not even for an empty record"
    assert pair.rx.pop_burst(10, True) == [big] * 3 + [b"w" * 1000]


def test_partial_commit_and_resync_skip_delivered(pair: Pair) -> None:
    msgs = [b"m%d" % i for i in range(10)]
    assert pair.tx.push_burst(msgs) == 10
    assert pair.rx.pop_burst(10, False) == msgs
    pair.rx.commit_upto(4)
    assert pair.tx.positions()[3] == 4
    with pytest.raises(ValueError, match="delivered"):
        pair.rx.commit_upto(11)
    # A fresh mapping resumes at next_expected=7: records 4..6 are skipped as duplicates.
    again = _ring.Ring(pair.fd, pair.map_bytes)
    assert again.attach_consumer() is None
    assert again.resync(7) == (_ring.OK, 3, 4)
    assert again.pop_burst(10, False) == msgs[7:]
    assert again.resync(2)[0] == _ring.GAP
    assert again.resync(11)[0] == _ring.AHEAD
    again.close()


def test_corrupt_record_is_reported_not_crashed_on(pair: Pair) -> None:
    pair.tx.push(b"abc")
    os.pwrite(pair.fd, struct.pack("<I", 1 << 30), HDR)  # absurd length
    with pytest.raises(_ring.RingCorrupt, match="layout"):
        pair.rx.pop_burst(1, False)


def test_a_corrupt_record_inside_a_batch_is_named_in_every_receive(pair: Pair) -> None:
    assert pair.tx.push_burst([b"a" * 8, b"b" * 8, b"c" * 8]) == 3
    os.pwrite(pair.fd, struct.pack("<I", 1 << 30), HDR + 2 * 24)  # the third record's length
    for pop in (pair.rx.pop_views, pair.rx.pop_burst):
        again = _ring.Ring(pair.fd, pair.map_bytes)
        assert again.attach_consumer() is None and again.resync(0)[0] == _ring.OK
        with pytest.raises(_ring.RingCorrupt, match=r"byte 48 \(seq 2\)"):
            pop(32, False)
        again.close()


def test_a_hostile_consumer_position_frees_nothing(pair: Pair) -> None:
    for _ in range(3):  # a few laps, then a full window (capacity 64): the next push must
        assert pair.tx.push_burst([b"x" * 8] * 64) == 64  # re-read the consumer's position
        pair.rx.pop_burst(64, False)
        pair.rx.commit()
    assert pair.tx.push_burst([b"x" * 8] * 64) == 64
    head, head_seq, tail, tail_seq = pair.tx.positions()[:4]
    assert head > 4096 + 8 and tail_seq == head_seq - 64
    area = os.pread(pair.fd, 4096, HDR)
    for bad_tail, bad_seq in (
        (head + 4096, head_seq),  # freed bytes that were never published
        (head, head_seq + 5),  # freed records that were never published
        (head - 4096 - 8, head_seq),  # more than a lap behind
        (tail, (tail_seq - 5000) % (1 << 64)),  # more records held than the window has
    ):
        os.pwrite(pair.fd, struct.pack("<QQ", bad_tail, bad_seq), 128)  # the consumer line
        assert pair.tx.push_burst([b"y" * 8] * 10) == 0
        assert pair.tx.push(b"y") == 0
        assert pair.tx.positions()[:2] == (head, head_seq)
    assert os.pread(pair.fd, 4096, HDR) == area, "not one byte of the area was written"


# --- futex waits across processes -----------------------------------------------------------


def _in_child(fn) -> int:
    """Fork; run fn() in the child, exit 0 on True; return the child's PID."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            code = 0 if fn() else 3
        finally:
            os._exit(code)
    return pid


def _wait_child(pid: int, bound: float = 20.0) -> int:
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError("child did not finish in time")


def _child_popping(pops: Callable[[], bool]) -> int:
    """Fork a child that runs pops() (its exit code says whether it got what it expected);
    return once it has said it is about to start, and 50 ms more, so that what the caller
    pushes next lands while the child's pops are running."""
    parent, child_end = os.pipe()

    def child() -> bool:
        os.close(parent)
        os.write(child_end, b"go")
        return pops()

    pid = _in_child(child)
    os.close(child_end)
    try:
        assert os.read(parent, 2) == b"go"
    finally:
        os.close(parent)
    time.sleep(0.05)
    return pid


def test_consumer_futex_wait_is_woken_by_another_process(pair: Pair) -> None:
    def child() -> bool:
        start = time.monotonic()
        ready = pair.rx.wait_data(10_000)
        return ready and time.monotonic() - start < 5 and pair.rx.pop(False) == b"wake"

    pid = _in_child(child)
    time.sleep(0.3)  # let the child block in FUTEX_WAIT
    assert pair.tx.push(b"wake") == 1
    assert _wait_child(pid) == 0


def test_producer_futex_wait_is_woken_by_a_commit_in_another_process(pair: Pair) -> None:
    assert pair.tx.push_burst([b"z"] * 64) == 64

    def child() -> bool:
        time.sleep(0.3)
        pair.rx.pop_burst(64, False)
        pair.rx.commit()
        return True

    pid = _in_child(child)
    start = time.monotonic()
    assert pair.tx.wait_space(1, 10_000) is True
    assert time.monotonic() - start < 5
    assert _wait_child(pid) == 0
    assert pair.tx.push(b"room") == 1


def test_a_spinning_pop_takes_what_another_process_pushes_meanwhile(pair: Pair) -> None:
    """pop(commit, spin=True) watches an empty ring in C for the spin budget (1-50 us); the
    producer here pushes only once the consumer has announced it is in its pops, so a
    message caught by a pop that was already spinning is what the spin is for."""
    assert pair.rx.pop(False, True) is None, "an empty ring: None after the spin, no sleep"

    def pops() -> bool:
        for _ in range(200_000):  # each pop spins <= 50 us: bounded to about 10 s
            msg = pair.rx.pop(True, True)
            if msg is not None:
                return msg == b"spun"
        return False

    pid = _child_popping(pops)
    assert pair.tx.push(b"spun") == 1
    assert _wait_child(pid) == 0
    assert pair.rx.pop(True, True) == b"spun"  # this process's cursor had not moved
    pair.tx.set_flags(_ring.PRODUCER_CLOSED)
    assert pair.rx.pop(False, True) is None, "a flag ends the spin; no record, None"
    with pytest.raises(TypeError, match="commit"):
        pair.rx.pop()
    with pytest.raises(TypeError, match="commit"):
        pair.rx.pop(True, True, True)


def test_a_wait_right_after_a_failed_spinning_pop_does_not_spin_again(pair: Pair) -> None:
    """A receive spins in its pop, then (still empty) goes to wait_data: that wait sleeps at
    once instead of spinning a second budget. One that comes later spins as before."""
    skipped = False
    for _ in range(5):  # a preemption of over 1 ms between the two calls would spin again
        before = pair.rx.spins
        assert pair.rx.pop(False, True) is None
        assert pair.rx.spins == before + 1, "the spinning pop spun once"
        assert pair.rx.wait_data(1) is False
        if pair.rx.spins == before + 1:
            skipped = True
            break
    assert skipped, "wait_data spun again right after a failed spinning pop"
    assert pair.rx.pop(False, True) is None
    time.sleep(0.01)  # the failed spin is no longer fresh (DPM_SPUN_FRESH_NS is 1 ms)
    before = pair.rx.spins
    assert pair.rx.wait_data(1) is False
    assert pair.rx.spins == before + 1, "a later wait spins first"
    assert pair.tx.push(b"late") == 1
    assert pair.rx.pop(False, True) == b"late"


def test_burst_pops_spin_on_an_empty_ring_too(pair: Pair) -> None:
    assert pair.rx.pop_burst(8, True, True) == []
    assert len(pair.rx.pop_views(8, True, True)) == 0

    def pops() -> bool:
        got: list[bytes] = []
        for _ in range(200_000):  # each pop spins <= 50 us: bounded to about 10 s
            got += pair.rx.pop_burst(8, True, True)
            if len(got) >= 3:
                return got == [b"a", b"b", b"c"]
        return False

    pid = _child_popping(pops)
    assert pair.tx.push_burst([b"a", b"b", b"c"]) == 3
    assert _wait_child(pid) == 0
    batch = pair.rx.pop_views(8, True, True)
    assert [bytes(v) for v in batch] == [b"a", b"b", b"c"]
    for pop in (pair.rx.pop_burst, pair.rx.pop_views):
        with pytest.raises(TypeError, match=r"\(max_n, commit\[, spin\]\)"):
            pop(8)
        with pytest.raises(TypeError, match="got 4"):
            pop(8, True, True, True)


def test_waits_time_out_and_flags_wake_them(pair: Pair) -> None:
    start = time.monotonic()
    assert pair.rx.wait_data(100) is False
    assert 0.08 < time.monotonic() - start < 2
    assert pair.rx.wait_data(0) is False
    pair.tx.set_flags(_ring.PRODUCER_CLOSED)
    assert pair.rx.wait_data(5000) is True  # a flag ends the wait at once
    assert pair.tx.wait_space(-1, 0) is True  # nothing pushed: all committed


# --- argument checking ------------------------------------------------------------------


def test_bad_arguments_give_clear_errors(pair: Pair) -> None:
    with pytest.raises(ValueError, match="fd must be"):
        _ring.Ring(-1, HDR + 4096)
    with pytest.raises(ValueError, match="map_bytes"):
        _ring.Ring(pair.fd, 10)
    with pytest.raises(OSError) as info:
        _ring.Ring(9999, HDR + 4096)
    assert info.value.filename == "mmap"
    fresh = _ring.Ring(pair.fd, pair.map_bytes)
    with pytest.raises(ValueError, match="power of two"):
        fresh.init_producer(5000, 8, 100)
    with pytest.raises(ValueError, match="capacity"):
        fresh.init_producer(4096, 0, 100)
    with pytest.raises(ValueError, match="max_message"):
        fresh.init_producer(4096, 8, 4096)
    with pytest.raises(ValueError, match="producer"):
        fresh.push(b"x")
    fresh.close()
    with pytest.raises(ValueError, match="closed"):
        fresh.pop(False)
    with pytest.raises(ValueError, match="consumer"):
        pair.tx.pop_burst(1, False)
    with pytest.raises(ValueError, match="producer"):
        pair.rx.push(b"x")
    with pytest.raises(TypeError, match="message 1 is str"):
        pair.tx.push_burst([b"ok", "text"])
    with pytest.raises(ValueError, match="message 2 has 1001 bytes, more than max_message 1000"):
        pair.tx.push_burst([b"", b"", bytes(1001)])
    assert pair.rx.pop(False) is None, "a rejected burst sends nothing"
    with pytest.raises(TypeError):
        pair.tx.push_burst(42)
    with pytest.raises(ValueError, match="max_n"):
        pair.rx.pop_burst(0, False)
    with pytest.raises(ValueError, match="timeout_ms"):
        pair.rx.wait_data(-1)
    with pytest.raises(ValueError, match="unknown flag"):
        pair.tx.set_flags(0x80)
    with pytest.raises(ValueError, match="multiple"):
        _ring.memfd_create("x", 4096, True)


def test_transport_level_configuration_errors() -> None:
    resolver = MemoryResolver()
    with pytest.raises(ConfigError, match="ring_bytes"):
        shm.open_sender("cfg", resolver=resolver, ring_bytes=1 << 20, max_message=1 << 20)
    with pytest.raises(ConfigError, match="capacity"):
        shm.open_sender("cfg", resolver=resolver, capacity=0)
    tx = shm.open_sender("cfg", resolver=resolver, ring_bytes=64 << 10, max_message=1000)
    try:
        extra = tx.statistics().extra
        assert extra["ring_bytes"] == 64 << 10
        assert isinstance(extra["hugepages"], bool)
        assert extra["page_size"] in (4096, 2 << 20)
    finally:
        tx.close()


# --- leaks --------------------------------------------------------------------------------


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _grows(fn, times: int) -> int:
    for _ in range(times // 10):  # warm up allocators and caches
        fn()
    gc.collect()
    before = _rss_kib()
    for _ in range(times):
        fn()
    gc.collect()
    return _rss_kib() - before


def test_entry_points_do_not_leak(pair: Pair) -> None:
    msgs = [b"x" * 64] * 32
    view = [memoryview(b"y" * 100), bytearray(b"z" * 10)]

    def hot_path() -> None:
        pair.tx.push_burst(msgs)
        pair.tx.push_burst(view)
        pair.rx.pop_burst(40, True)
        pair.tx.push(b"one")
        pair.rx.pop(True)
        pair.tx.push(b"two")
        pair.rx.pop(True, True)
        pair.rx.positions()
        pair.rx.resync(pair.rx.positions()[5])

    def errors() -> None:
        for bad in ([b"a", 1], [bytes(5000)]):
            with contextlib.suppress(TypeError, ValueError):
                pair.tx.push_burst(bad)

    def lifecycle() -> None:
        fd = _ring.memfd_create("leak", HDR + 4096, False)
        ring = _ring.Ring(fd, HDR + 4096)
        ring.init_producer(4096, 8, 100)
        ring.close()
        os.close(fd)

    assert _grows(hot_path, 30_000) < 2048
    assert _grows(errors, 30_000) < 2048
    assert _grows(lifecycle, 5_000) < 2048


# --- zero-copy views -----------------------------------------------------------------------


def test_views_point_into_the_ring_and_expire(pair: Pair) -> None:
    from dpmigrate.errors import ViewExpired, ViewsHeld

    pair.rx.name = "t"
    assert pair.tx.push_burst([b"a" * 10, b"", b"c" * 700]) == 3
    batch = pair.rx.pop_views(8, False)
    assert (len(batch), batch.first_seq, batch.nbytes, batch.expired) == (3, 0, 710, False)
    assert pair.rx.exports == 0, "no buffer taken before a view is asked for"
    views = list(batch)
    assert [bytes(v) for v in views] == [b"a" * 10, b"", b"c" * 700]
    assert all(v.readonly for v in views) and pair.rx.exports == 1
    # the view shows the ring's own memory: its payload sits 16 bytes after its record header
    raw = os.pread(pair.fd, 10, HDR + REC)
    assert raw == bytes(views[0])
    kept = views[2][100:]
    with pytest.raises(ViewsHeld):
        pair.rx.pop_views(8, True)  # would commit: refused, nothing moved
    assert pair.rx.positions()[3] == 0, "a refused call committed"
    assert batch.expired
    with pytest.raises(ViewExpired):
        batch[0]
    with pytest.raises(ValueError):
        views[0].tobytes()
    assert bytes(kept) == b"c" * 600
    del kept, views
    assert pair.rx.exports == 0
    assert len(pair.rx.pop_views(8, True)) == 0  # now it commits
    assert pair.rx.positions()[3] == 3


def test_close_with_a_view_out_unmaps_at_its_release() -> None:
    p = Pair()
    p.tx.push(b"q" * 64)
    batch = p.rx.pop_views(1, False)
    kept = batch[0][1:]
    p.rx.close()
    assert p.rx.closed and p.rx.exports == 1
    with pytest.raises(ValueError):
        p.rx.pop(False)  # closed for every call
    assert bytes(kept) == b"q" * 63, "the mapping must outlive the view"
    del kept, batch
    gc.collect()
    assert p.rx.exports == 0
    p.tx.close()
    os.close(p.fd)


def test_views_do_not_leak(pair: Pair) -> None:
    msgs = [b"x" * 64] * 32

    def hot_path() -> None:
        pair.tx.push_burst(msgs)
        batch = pair.rx.pop_views(32, True)
        for v in batch:
            len(v)
        pair.rx.expire_views()

    assert _grows(hot_path, 20_000) < 2048
