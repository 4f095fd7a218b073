"""The ring conformance kit: one body per behaviour, run against every transport.

Every transport (mem, shm, tcp, and any added later) must pass every check here. A test
module parametrises over transports and checks (see tests/test_rings_conformance.py):

    harness = Harness("tcp", workdir)
    for check in CHECKS:
        check(harness)

A check raises AssertionError (or a ring error) when the transport misbehaves. Checks that
need a second process (peer death) run only for transports whose ends can live in two
processes (``Harness.crosses_processes``); for the in-process mem ring a dead peer cannot
happen, and those checks return early, saying so in ``Harness.notes``.

Every wait is bounded: a hung transport fails the check instead of hanging the suite.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from dpmigrate import transports
from dpmigrate.cluster.pki import ring_tls_context
from dpmigrate.errors import (
    EndOfRing,
    MessageTooLarge,
    RingBroken,
    RingClosed,
    RingTimeout,
    ViewExpired,
    ViewsHeld,
    WouldBlock,
)
from dpmigrate.testing.peer import message
from dpmigrate.transports.base import MAX_MESSAGE, MessageViews, RingReceiver, RingSender
from dpmigrate.transports.resolver import DirectoryResolver, MemoryResolver

#: Upper bound for any single wait in a check; far above what a healthy ring needs.
BOUND_S = 30.0
#: Reconnect bound given to ends in peer-death checks, and the slack allowed on top of it.
RECONNECT_S = 1.0
SLACK_S = 5.0

_names = itertools.count()


class Harness:
    """Opens ring ends of one transport for the checks, and cleans them up."""

    def __init__(self, transport: str, workdir: Path, tls_dir: Path | None = None) -> None:
        """``tls_dir``: for tcp, run every check over TLS with the ring files that
        :func:`dpmigrate.cluster.pki.make` wrote there (its peer processes too)."""
        self.transport = transport
        self.tls_dir = tls_dir
        self._tls: dict[bool, object] = {}
        self.crosses_processes = transport != "mem"
        self.workdir = Path(workdir)
        self.notes: list[str] = []
        self._ends: list[RingSender | RingReceiver] = []
        self._procs: list[subprocess.Popen[str]] = []
        self.last_resolver = MemoryResolver()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"ring-{transport}")

    def tx_opts(self) -> dict[str, object]:
        """Transport options of every producer end a check opens."""
        return self._tls_opts(server_side=True)

    def rx_opts(self) -> dict[str, object]:
        return self._tls_opts(server_side=False)

    def _tls_opts(self, server_side: bool) -> dict[str, object]:
        if self.tls_dir is None:
            return {}
        if server_side not in self._tls:
            self._tls[server_side] = ring_tls_context(self.tls_dir, server_side=server_side)
        return {"tls": self._tls[server_side]}

    def ring_name(self) -> str:
        return f"conf-{self.transport}-{os.getpid()}-{next(_names)}"

    def pair(
        self, capacity: int = 64, *, auto_commit: bool = True, reconnect_timeout: float = BOUND_S
    ) -> tuple[RingSender, RingReceiver, str]:
        """A producer and a consumer of a fresh ring in this process."""
        name = self.ring_name()
        resolver = self.last_resolver = MemoryResolver()
        tx = transports.open_sender(
            self.transport, name, resolver=resolver, capacity=capacity,
            reconnect_timeout=reconnect_timeout, **self.tx_opts(),
        )  # fmt: skip
        self._ends.append(tx)
        rx = transports.open_receiver(
            self.transport, name, resolver=resolver, auto_commit=auto_commit,
            reconnect_timeout=reconnect_timeout, connect_timeout=BOUND_S, **self.rx_opts(),
        )  # fmt: skip
        self._ends.append(rx)
        if self.tls_dir is not None:
            self.settle(tx, rx)
        return tx, rx, name

    def settle(self, tx: RingSender, rx: RingReceiver) -> None:
        """Drive both ends through the TLS handshake before a check starts. A keyless plain
        link is adopted by the producer's very first call, so the checks may leave the
        producer idle while a consumer reads in another thread; a TLS handshake needs a few
        round trips with both ends at work."""
        deadline = time.monotonic() + BOUND_S
        while time.monotonic() < deadline:
            tx.service(0.002)
            assert rx.recv_burst(1, timeout=0.002) == [], "a message before the check began"
            if tx.statistics().extra.get("connected") and rx.statistics().extra.get("connected"):
                return
        raise AssertionError(f"the TLS handshake did not complete within {BOUND_S} s")

    def background(self, fn: Callable[[], object]) -> Future[object]:
        """Run ``fn`` in a worker thread (the other end of a ring usually needs one)."""
        return self._pool.submit(fn)

    def registry(self) -> DirectoryResolver:
        return DirectoryResolver(self.workdir / "registry")

    def spawn_peer(self, role: str, ring: str, *args: str) -> subprocess.Popen[str]:
        """Start ``python -m dpmigrate.testing.peer ROLE`` for ``ring`` in a new process."""
        cmd = [
            sys.executable, "-m", "dpmigrate.testing.peer", role, "--transport", self.transport,
            "--ring", ring, "--registry", str(self.registry().directory), *args,
        ]  # fmt: skip
        if self.tls_dir is not None:
            cmd += ["--tls-dir", str(self.tls_dir)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._procs.append(proc)
        return proc

    def close(self) -> None:
        """Close every end and end every process this harness started (by PID)."""
        # Consumers first: a producer's close waits for its consumer's last acknowledgement.
        for end in sorted(self._ends, key=lambda e: isinstance(e, RingSender)):
            with contextlib.suppress(Exception):
                _close_quickly(end)
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(Exception):
                proc.communicate(timeout=BOUND_S)
        self._pool.shutdown(wait=False, cancel_futures=True)


def _close_quickly(end: RingSender | RingReceiver) -> None:
    """Close an end at teardown; a producer's close may wait for acks, so bound it."""
    done = threading.Event()

    def closer() -> None:
        with contextlib.suppress(Exception):
            end.close()
        done.set()

    threading.Thread(target=closer, daemon=True).start()
    done.wait(BOUND_S)


def _pump(tx: RingSender, job: Future[object]) -> object:
    """Keep an otherwise idle producer serving (see RingSender.service) until ``job`` ends."""
    deadline = time.monotonic() + BOUND_S
    while not job.done():
        assert time.monotonic() < deadline, "the consumer side never finished"
        tx.service(0.01)
    return job.result(0)


def _drain(rx: RingReceiver, count: int, max_n: int = 64) -> list[bytes]:
    """Receive exactly ``count`` messages (bounded in time)."""
    out: list[bytes] = []
    deadline = time.monotonic() + BOUND_S
    while len(out) < count:
        assert time.monotonic() < deadline, f"only {len(out)} of {count} messages arrived"
        out.extend(rx.recv_burst(min(max_n, count - len(out)), timeout=1.0))
    return out


@contextlib.contextmanager
def _timed(bound: float, what: str) -> Iterator[None]:
    start = time.monotonic()
    yield
    elapsed = time.monotonic() - start
    assert elapsed < bound, f"{what} took {elapsed:.2f} s, more than the bound of {bound} s"


# --- the checks -------------------------------------------------------------------------


def check_order_and_content(h: Harness) -> None:
    """Messages of many sizes arrive complete and in order, with send, send_burst and recv."""
    tx, rx, _ = h.pair(capacity=32)
    count, seed = 2000, 11
    expected = [message(seed, i) for i in range(count)]

    def produce() -> None:
        i = 0
        while i < count:
            if i % 3 == 0:
                tx.send(expected[i], timeout=BOUND_S)
                i += 1
            else:
                i += tx.send_burst(expected[i : i + 7], timeout=BOUND_S)

    job = h.background(produce)
    got = [rx.recv(timeout=BOUND_S) for _ in range(count // 2)]
    got += _drain(rx, count - len(got))
    job.result(BOUND_S)
    assert got == expected
    stats = rx.statistics()
    assert stats.messages == count and stats.next_expected == count
    assert stats.bytes == sum(map(len, expected))


def check_backpressure(h: Harness) -> None:
    """A full window blocks (timeout), raises WouldBlock (nowait), returns short (burst)."""
    capacity = 16
    tx, rx, _ = h.pair(capacity=capacity, auto_commit=False)
    for i in range(capacity):
        tx.send_nowait(b"m%d" % i)
    try:
        tx.send_nowait(b"one too many")
    except WouldBlock:
        pass
    else:
        raise AssertionError("send_nowait on a full window did not raise WouldBlock")
    assert tx.send_burst([b"x", b"y"]) == 0, "send_burst on a full window must return 0"
    try:
        with _timed(BOUND_S, "send(timeout=0.2) on a full window"):
            tx.send(b"late", timeout=0.2)
    except RingTimeout:
        pass
    else:
        raise AssertionError("send(timeout) on a full window did not time out")
    stats = tx.statistics()
    assert stats.occupancy == capacity and stats.peak_occupancy == capacity
    # Without a commit the producer must keep everything: nothing frees up on delivery alone.
    got = h.background(lambda: _drain(rx, capacity)).result(BOUND_S)
    assert got == [b"m%d" % i for i in range(capacity)]
    assert tx.send_burst([b"still full"]) == 0, "the window freed before the consumer committed"
    rx.commit()
    # After the commit the producer regains the whole window.
    sent = 0
    deadline = time.monotonic() + BOUND_S
    while sent < capacity and time.monotonic() < deadline:
        sent += tx.send_burst([b"again"] * (capacity - sent), timeout=1.0)
    assert sent == capacity
    assert h.background(lambda: _drain(rx, capacity)).result(BOUND_S) == [b"again"] * capacity


def check_burst_semantics(h: Harness) -> None:
    """send_burst sends as many as fit, in order; recv_burst returns 1..max_n, [] on timeout."""
    capacity = 32
    tx, rx, _ = h.pair(capacity=capacity)
    assert tx.send_burst([]) == 0
    msgs = [b"%05d" % i for i in range(capacity + 10)]
    assert tx.send_burst(msgs) == capacity, "a burst larger than the window must fill it exactly"

    def consume() -> list[bytes]:
        first = rx.recv_burst(5, timeout=BOUND_S)
        assert 1 <= len(first) <= 5
        return first + _drain(rx, capacity - len(first))

    assert h.background(consume).result(BOUND_S) == msgs[:capacity]
    with _timed(BOUND_S, "recv_burst(timeout=0.1) on an empty ring"):
        assert h.background(lambda: rx.recv_burst(8, timeout=0.1)).result(BOUND_S) == []
    try:
        rx.recv_burst(0)
    except ValueError:
        pass
    else:
        raise AssertionError("recv_burst(0) must be a ValueError")


def check_timeouts(h: Harness) -> None:
    """recv on an empty ring times out (RingTimeout) or raises WouldBlock (nowait)."""
    tx, rx, _ = h.pair()

    def consume() -> None:
        with _timed(BOUND_S, "recv(timeout=0.2)"):
            try:
                rx.recv(timeout=0.2)
            except RingTimeout as err:
                assert isinstance(err, TimeoutError), "RingTimeout must be a TimeoutError"
            else:
                raise AssertionError("recv on an empty ring did not time out")
        try:
            rx.recv_nowait()
        except WouldBlock:
            pass
        else:
            raise AssertionError("recv_nowait on an empty ring did not raise WouldBlock")

    h.background(consume).result(BOUND_S)
    tx.send(b"now", timeout=BOUND_S)

    def consume_one() -> bytes:
        deadline = time.monotonic() + BOUND_S
        while True:
            try:
                return rx.recv_nowait()
            except WouldBlock:
                assert time.monotonic() < deadline, "a sent message never became receivable"
                time.sleep(0.001)

    assert h.background(consume_one).result(BOUND_S) == b"now"


def check_message_sizes(h: Harness) -> None:
    """Zero-length and maximum-size messages pass intact; larger ones are MessageTooLarge."""
    tx, rx, _ = h.pair(capacity=4)
    big = bytes(random.Random(3).randbytes(MAX_MESSAGE))
    job = h.background(lambda: _drain(rx, 3))
    tx.send(b"", timeout=BOUND_S)
    tx.send(big, timeout=BOUND_S)
    tx.send(memoryview(b"view"), timeout=BOUND_S)
    assert job.result(BOUND_S) == [b"", big, b"view"]
    for bad in (bytes(MAX_MESSAGE + 1),):
        try:
            tx.send_nowait(bad)
        except MessageTooLarge as err:
            assert str(MAX_MESSAGE) in str(err), "the error must state the maximum"
        else:
            raise AssertionError("a message above the maximum was accepted")
    try:
        tx.send_nowait("text")  # type: ignore[arg-type]
    except TypeError:
        pass
    else:
        raise AssertionError("a str message was accepted; messages are bytes")


def check_clean_close(h: Harness) -> None:
    """Producer close: the consumer gets everything, then EndOfRing. Closed ends: RingClosed."""
    tx, rx, _ = h.pair(capacity=64)
    msgs = [b"last words %d" % i for i in range(20)]
    job = h.background(lambda: _drain(rx, len(msgs)) + _end_of_ring(rx))
    assert tx.send_burst(msgs, timeout=BOUND_S) == len(msgs)
    tx.close()
    tx.close()  # idempotent
    assert job.result(BOUND_S) == [*msgs, b"<EndOfRing>"]
    for call in (
        lambda: tx.send(b"x"),
        lambda: tx.send_nowait(b"x"),
        lambda: tx.send_burst([b"x"]),
    ):
        _expect(RingClosed, call, "using a closed producer")
    rx.close()
    _expect(RingClosed, lambda: rx.recv(timeout=0.1), "using a closed consumer")


def check_consumer_close_breaks_producer(h: Harness) -> None:
    """A consumer that closes is gone for good: the producer's next send is RingBroken."""
    tx, rx, _ = h.pair(capacity=8)
    tx.send(b"hello", timeout=BOUND_S)
    assert h.background(lambda: rx.recv(timeout=BOUND_S)).result(BOUND_S) == b"hello"
    rx.close()

    def fill_until_broken() -> None:
        deadline = time.monotonic() + BOUND_S
        while time.monotonic() < deadline:
            tx.send(b"anyone?", timeout=1.0)
        raise AssertionError("the producer never noticed that its consumer closed")

    with _timed(BOUND_S, "noticing a closed consumer"):
        _expect(
            RingBroken,
            lambda: h.background(fill_until_broken).result(BOUND_S),
            "sending to a closed consumer",
        )


def check_producer_death(h: Harness) -> None:
    """A producer killed with SIGKILL: the consumer gets what was sent, then RingBroken."""
    if not h.crosses_processes:
        h.notes.append("producer death: not applicable, both ends share one process")
        return
    ring = h.ring_name()
    proc = h.spawn_peer("producer", ring, "--count", "10", "--seed", "5", "--then", "hang",
                        "--reconnect-timeout", str(RECONNECT_S))  # fmt: skip
    rx = transports.open_receiver(
        h.transport, ring, resolver=h.registry(), reconnect_timeout=RECONNECT_S,
        connect_timeout=BOUND_S, **h.rx_opts(),
    )  # fmt: skip
    h._ends.append(rx)
    assert _drain(rx, 10) == [message(5, i) for i in range(10)]
    assert proc.stdout is not None
    assert json.loads(proc.stdout.readline()) == {"sent": 10}
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(BOUND_S)
    with _timed(RECONNECT_S + SLACK_S, "noticing a dead producer"):
        _expect(RingBroken, lambda: rx.recv(timeout=None), "receiving from a dead producer")


def check_consumer_death(h: Harness) -> None:
    """A consumer killed with SIGKILL: the producer's blocked send ends with RingBroken."""
    if not h.crosses_processes:
        h.notes.append("consumer death: not applicable, both ends share one process")
        return
    ring = h.ring_name()
    tx = transports.open_sender(
        h.transport,
        ring,
        resolver=h.registry(),
        capacity=8,
        reconnect_timeout=RECONNECT_S,
        **h.tx_opts(),
    )
    h._ends.append(tx)
    proc = h.spawn_peer("consumer", ring, "--count", "4", "--seed", "9", "--then", "hang",
                        "--reconnect-timeout", str(RECONNECT_S))  # fmt: skip
    for i in range(4):
        tx.send(message(9, i), timeout=BOUND_S)
    assert proc.stdout is not None
    line = _pump(tx, h.background(proc.stdout.readline))
    assert json.loads(str(line)) == {"received": 4, "bad": 0}
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(BOUND_S)

    def send_until_broken() -> None:
        for i in range(1000):
            tx.send(b"%d" % i, timeout=None)
        raise AssertionError("1000 sends succeeded with a dead consumer and a window of 8")

    with _timed(RECONNECT_S + SLACK_S + 2, "noticing a dead consumer"):
        _expect(
            RingBroken,
            lambda: h.background(send_until_broken).result(BOUND_S),
            "sending to a dead consumer",
        )


def check_partial_commit_and_restart(h: Harness) -> None:
    """commit(upto) acknowledges a prefix; a consumer restarted from that point (a new end
    with next_expected) receives everything after it again, nothing before it."""
    capacity = 8
    tx, rx, name = h.pair(capacity=capacity, auto_commit=False)
    msgs = [b"p%d" % i for i in range(capacity)]
    assert tx.send_burst(msgs, timeout=BOUND_S) == capacity
    assert h.background(lambda: _drain(rx, capacity)).result(BOUND_S) == msgs
    _expect(
        ValueError, lambda: rx.commit(upto=capacity + 1), "committing beyond what was delivered"
    )
    h.background(lambda: rx.commit(upto=3)).result(BOUND_S)
    deadline = time.monotonic() + BOUND_S
    while tx.acked < 3:
        assert time.monotonic() < deadline, f"the producer never saw the commit (acked={tx.acked})"
        time.sleep(0.002)
    assert tx.acked == 3, "commit(upto=3) acknowledged more than asked"
    assert tx.send_burst([b"more"] * 5, timeout=1.0) == 3, "exactly the committed 3 must free up"
    # The consumer leaves without closing the ring (a stage stopping to be restarted or
    # moved); a new instance resumes from what was committed.
    rx.detach()
    _expect(RingClosed, lambda: rx.recv(timeout=0.1), "using a detached consumer")
    rx2 = transports.open_receiver(
        h.transport, name, resolver=h.last_resolver, auto_commit=True, next_expected=3,
        connect_timeout=BOUND_S, **h.rx_opts(),
    )  # fmt: skip
    h._ends.append(rx2)
    got = _pump(tx, h.background(lambda: _drain(rx2, capacity)))
    assert got == msgs[3:] + [b"more"] * 3


def check_producer_restarted_behind(h: Harness) -> None:
    """A producer restarted from an older persisted point (next_seq below what the consumer
    has) regenerates messages: the consumer gets only the new ones, numbered on."""
    if not h.crosses_processes:
        h.notes.append("producer restart: not applicable, both ends share one process")
        return
    tx, rx, name = h.pair(capacity=16)
    assert tx.send_burst([b"old%d" % i for i in range(10)], timeout=BOUND_S) == 10
    first = _pump(tx, h.background(lambda: _drain(rx, 10)))
    assert first == [b"old%d" % i for i in range(10)]
    # The producer leaves without closing (its stage restarts) and comes back at its persisted
    # seq 6; the consumer just waits for it.
    tx.detach()
    _expect(RingClosed, lambda: tx.send(b"x", timeout=0.1), "using a detached producer")
    tx2 = transports.open_sender(h.transport, name, resolver=h.last_resolver, capacity=16,
                                 next_seq=6, reconnect_timeout=BOUND_S,
                                 **h.tx_opts())  # fmt: skip
    h._ends.append(tx2)
    job = h.background(lambda: _drain(rx, 5))
    regenerated = [b"old%d" % i for i in range(6, 10)] + [b"new%d" % i for i in range(10, 15)]
    sent = 0
    deadline = time.monotonic() + BOUND_S
    while sent < len(regenerated):
        assert time.monotonic() < deadline, f"the restarted producer sent only {sent}"
        sent += tx2.send_burst(regenerated[sent:], timeout=0.05)
    assert tx2.next_seq == 15
    assert _pump(tx2, job) == [b"new%d" % i for i in range(10, 15)]
    assert rx.next_expected == 15


def check_views_order_and_content(h: Harness) -> None:
    """recv_views delivers the same messages as recv_burst (sizes 0 B .. 256 KiB, in order,
    each once), as read-only views with the right first_seq and nbytes; the two APIs mix
    on one end; a timeout gives an empty batch; EndOfRing after the producer's close."""
    tx, rx, _ = h.pair(capacity=32)
    count, seed = 1500, 13
    expected = [message(seed, i) for i in range(count)]
    expected[7] = b""
    expected[100] = bytes(range(256)) * 1024  # 256 KiB: spans many reads on tcp

    def produce() -> None:
        i = 0
        while i < count:
            i += tx.send_burst(expected[i : i + 9], timeout=BOUND_S)

    job = h.background(produce)
    got: list[bytes] = []
    deadline = time.monotonic() + BOUND_S
    turn = 0
    while len(got) < count:
        assert time.monotonic() < deadline, f"only {len(got)} of {count} messages arrived"
        turn += 1
        if turn % 4 == 3:  # the owned-bytes API in between
            got.extend(rx.recv_burst(5, timeout=1.0))
            continue
        batch = rx.recv_views(min(40, count - len(got)), timeout=1.0)
        assert isinstance(batch, MessageViews)
        if not len(batch):
            continue
        assert batch.first_seq == len(got), "first_seq is not the batch's first sequence number"
        views = list(batch)
        assert len(views) == len(batch) <= 40
        assert all(isinstance(v, memoryview) and v.readonly for v in views)
        assert batch.nbytes == sum(v.nbytes for v in views)
        assert rx.next_expected == len(got) + len(views)
        got.extend(bytes(v) for v in views)
    job.result(BOUND_S)
    assert got == expected
    stats = rx.statistics()
    assert stats.messages == count and stats.bytes == sum(map(len, expected))
    with _timed(BOUND_S, "recv_views(timeout=0.1) on an empty ring"):
        empty = h.background(lambda: rx.recv_views(8, timeout=0.1)).result(BOUND_S)
    assert len(empty) == 0 and list(empty) == []
    _expect(ValueError, lambda: rx.recv_views(0), "recv_views(0)")
    rx.commit()
    closer = h.background(tx.close)

    def until_end() -> None:
        while True:
            assert not len(rx.recv_views(4, timeout=BOUND_S)), "a message after the last one"

    _expect(EndOfRing, lambda: h.background(until_end).result(BOUND_S), "recv_views at the end")
    closer.result(BOUND_S)


def check_views_expire(h: Harness) -> None:
    """A batch of views expires at the next receive or commit: its views are released
    (ValueError on use) and the batch raises ViewExpired. Memory still shown by a slice or
    an exported buffer is never handed back: the receive or commit raises ViewsHeld,
    delivers and acknowledges nothing, and the slice keeps its bytes while the producer
    tries to fill the ring; once it is dropped everything goes on, exactly once.

    (mem: its views show immutable bytes objects that are never reused, so a slice of one
    stays valid and refuses nothing; a buffer exported from a view still does.)"""
    capacity = 8
    tx, rx, _ = h.pair(capacity=capacity, auto_commit=True)
    first = [b"first-%d" % i * 50 for i in range(4)]
    assert tx.send_burst(first, timeout=BOUND_S) == 4
    batch = _pump(tx, h.background(lambda: _views(rx, 4)))
    kept = batch[1]
    assert bytes(kept) == first[1]
    # The next receive expires it.
    assert tx.send_burst([b"second"], timeout=BOUND_S) == 1
    nxt = _pump(tx, h.background(lambda: _views(rx, 1)))
    assert bytes(nxt[0]) == b"second" and nxt.first_seq == 4
    _expect(ValueError, lambda: bytes(kept), "using a view after the next receive")
    _expect(ViewExpired, lambda: batch[0], "indexing an expired batch")
    _expect(ViewExpired, lambda: list(batch), "iterating an expired batch")
    assert batch.expired and len(batch) == 4 and batch.first_seq == 0
    # A commit expires it too.
    view = nxt[0]
    rx.commit()
    _expect(ValueError, lambda: view.tobytes(), "using a view after commit")
    # A slice (it outlives the view it was cut from) holds the memory: refused.
    holds = [lambda v: pickle.PickleBuffer(v)]
    if h.transport != "mem":
        holds += [lambda v: v[2:], lambda v: memoryview(v)]
    for hold in holds:
        msgs = [b"held-%d" % i * 40 for i in range(3)]
        assert _send_all(tx, msgs) == 3
        held_batch = _pump(tx, h.background(lambda: _views(rx, 3)))
        holder = hold(held_batch[0])
        snapshot = bytes(holder)
        acked, delivered = tx.acked, rx.next_expected
        # the producer fills what room is left; an expired batch must not give it more
        tx.send_burst([b"x" * 300] * capacity, timeout=0)
        tx.service(0.01)
        _expect(ViewsHeld, lambda: rx.recv_views(8, timeout=0), "a receive while a slice lives")
        _expect(ViewsHeld, lambda: rx.recv_burst(8, timeout=0), "recv_burst while a slice lives")
        _expect(ViewsHeld, lambda: rx.commit(), "a commit while a slice lives")
        tx.service(0.01)
        assert rx.next_expected == delivered, "a refused receive delivered something"
        assert tx.acked == acked, "a refused receive or commit acknowledged something"
        assert bytes(holder) == snapshot, "memory shown by a held slice was reused"
        del holder
        # (with views: bytes parsed ahead by recv_burst are immutable objects, which a
        # slice may keep, so the next batch must come straight from the ring's memory)
        left = tx.next_seq - delivered
        rest = _pump(tx, h.background(lambda n=left: _drain_views(rx, n)))
        assert rest == [b"x" * 300] * len(rest)
        rx.commit()
    # close releases the live batch's views.
    assert tx.send_burst([b"last"], timeout=BOUND_S) == 1
    live = _pump(tx, h.background(lambda: _views(rx, 1)))
    last = live[0]
    rx.close()
    _expect(ValueError, lambda: last.tobytes(), "using a view after close")


def _views(rx: RingReceiver, count: int) -> MessageViews:
    """One batch of exactly ``count`` messages, sent as one burst just before (bounded)."""
    deadline = time.monotonic() + BOUND_S
    while True:
        assert time.monotonic() < deadline, "the burst never arrived"
        batch = rx.recv_views(count, timeout=0.05)
        if len(batch):
            assert len(batch) == count, f"a burst of {count} came as {len(batch)}"
            return batch


def _drain_views(rx: RingReceiver, count: int) -> list[bytes]:
    """Receive exactly ``count`` messages through recv_views (bounded in time)."""
    out: list[bytes] = []
    deadline = time.monotonic() + BOUND_S
    while len(out) < count:
        assert time.monotonic() < deadline, f"only {len(out)} of {count} messages arrived"
        out.extend(map(bytes, rx.recv_views(count - len(out), timeout=0.05)))
    return out


def _send_all(tx: RingSender, msgs: list[bytes]) -> int:
    sent = 0
    deadline = time.monotonic() + BOUND_S
    while sent < len(msgs):
        assert time.monotonic() < deadline, "the window never opened"
        sent += tx.send_burst(msgs[sent:], timeout=0.05)
    return sent


def check_exactly_once_across_breaks(h: Harness) -> None:
    """Thousands of messages, connection breaks injected at random points from both ends:
    every message delivered exactly once, in order."""
    _exactly_once_across_breaks(h, views=False)


def check_views_exactly_once_across_breaks(h: Harness) -> None:
    """The same with the zero-copy receive: a break between two batches (or inside the
    reads of one) loses nothing and duplicates nothing."""
    _exactly_once_across_breaks(h, views=True)


def _exactly_once_across_breaks(h: Harness, views: bool) -> None:
    tx, rx, _ = h.pair(capacity=64)
    count, seed = 5000, 23
    rng_p, rng_c = random.Random(seed), random.Random(seed + 1)

    consumer_done = threading.Event()

    def produce() -> int:
        seq = 0
        deadline = time.monotonic() + BOUND_S * 2
        while seq < count:
            assert time.monotonic() < deadline, f"producer stuck at {seq}"
            burst = [message(seed, s) for s in range(seq, min(count, seq + rng_p.randint(1, 32)))]
            seq += tx.send_burst(burst, timeout=1.0)
            if rng_p.random() < 0.02:
                tx._break_connection()  # type: ignore[attr-defined]
        while not consumer_done.is_set():  # serve reconnections until the consumer has all
            assert time.monotonic() < deadline, "consumer never finished"
            tx.service(0.01)
        return seq

    job = h.background(produce)
    got: list[bytes] = []
    deadline = time.monotonic() + BOUND_S * 2
    breaks = 0
    while len(got) < count:
        assert time.monotonic() < deadline, f"consumer stuck at {len(got)}"
        if views:
            batch = rx.recv_views(rng_c.randint(1, 64), timeout=1.0)
            assert not len(batch) or batch.first_seq == len(got)
            got.extend(map(bytes, batch))
        else:
            got.extend(rx.recv_burst(rng_c.randint(1, 64), timeout=1.0))
        if rng_c.random() < 0.02:
            rx._break_connection()  # type: ignore[attr-defined]
            breaks += 1
    rx.commit()  # everything acknowledged: the producer's close then has nothing to wait for
    deadline = time.monotonic() + BOUND_S
    # (statistics() only reads counters, so looking at the producer from here is safe)
    while tx.statistics().acked < count:
        assert time.monotonic() < deadline, "the final acknowledgement never reached the producer"
        rx.recv_burst(1, timeout=0.01)  # lets a reconnecting consumer flush its ack
    consumer_done.set()
    assert job.result(BOUND_S) == count
    assert len(got) == count, f"{len(got) - count} extra messages"
    for i, msg in enumerate(got):
        assert msg == message(seed, i), f"message {i} is wrong (lost, duplicated or reordered)"
    rstats, tstats = rx.statistics(), tx.statistics()
    assert rstats.messages == count and tstats.messages == count
    assert breaks > 0 and rstats.reconnects + tstats.reconnects > 0
    assert tstats.peak_occupancy <= 64


def check_exactly_once_across_processes(h: Harness) -> None:
    """Like the check above, with the producer in another process breaking links too."""
    if not h.crosses_processes:
        h.notes.append("cross-process exactly-once: not applicable to the in-process ring")
        return
    ring, count, seed = h.ring_name(), 4000, 31
    proc = h.spawn_peer("producer", ring, "--count", str(count), "--seed", str(seed),
                        "--break-prob", "0.02", "--then", "close", "--capacity", "64")  # fmt: skip
    rx = transports.open_receiver(h.transport, ring, resolver=h.registry(), connect_timeout=BOUND_S,
                                  **h.rx_opts())  # fmt: skip
    h._ends.append(rx)
    rng = random.Random(seed)
    got: list[bytes] = []
    deadline = time.monotonic() + BOUND_S * 2
    while len(got) < count:
        assert time.monotonic() < deadline, f"consumer stuck at {len(got)}"
        got.extend(rx.recv_burst(64, timeout=1.0))
        if rng.random() < 0.02:
            rx._break_connection()  # type: ignore[attr-defined]
    assert got == [message(seed, i) for i in range(count)]
    assert _end_of_ring(rx) == [b"<EndOfRing>"]
    out, err = proc.communicate(timeout=BOUND_S)
    assert proc.returncode == 0, f"producer process failed: {out} {err}"


def _end_of_ring(rx: RingReceiver) -> list[bytes]:
    try:
        extra = rx.recv(timeout=BOUND_S)
    except EndOfRing:
        return [b"<EndOfRing>"]
    raise AssertionError(f"expected EndOfRing, got a message {extra[:20]!r}")


def _expect(exc: type[BaseException], call: Callable[[], object], what: str) -> None:
    try:
        call()
    except exc:
        return
    raise AssertionError(f"{what} did not raise {exc.__name__}")


CHECKS: tuple[Callable[[Harness], None], ...] = (
    check_order_and_content,
    check_backpressure,
    check_burst_semantics,
    check_timeouts,
    check_message_sizes,
    check_clean_close,
    check_partial_commit_and_restart,
    check_producer_restarted_behind,
    check_consumer_close_breaks_producer,
    check_producer_death,
    check_consumer_death,
    check_exactly_once_across_breaks,
    check_exactly_once_across_processes,
    check_views_order_and_content,
    check_views_expire,
    check_views_exactly_once_across_breaks,
)
