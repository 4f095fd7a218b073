"""The in-memory ring of the in-process model: both ends live in one process (threads or the
cooperative scheduler).

It keeps the full ring protocol rather than a bare queue, so stage code and the conformance
suite see the same behaviour as with shm and tcp: messages carry sequence numbers, the
producer retains them until the consumer commits, and a simulated break (``_break_connection``)
makes the producer "resend" everything it retains, which the consumer drops below
``next_expected``.
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence

from dpmigrate.errors import EndOfRing, RingBroken, RingTimeout, WouldBlock
from dpmigrate.transports.base import (
    DEFAULT_CAPACITY,
    DEFAULT_RECONNECT_TIMEOUT,
    MAX_MESSAGE,
    RingReceiver,
    RingSender,
    RingStatistics,
    ViewBatch,
    check_message,
    held_error,
)
from dpmigrate.transports.resolver import Endpoint, Resolver, check_ring_name

_channels: weakref.WeakValueDictionary[str, _Channel] = weakref.WeakValueDictionary()
_ids = itertools.count(1)


class _Channel:
    """State shared by the two ends: the retained messages and one condition to wait on."""

    def __init__(self, name: str, capacity: int, max_message: int) -> None:
        self.name = name
        self.capacity = capacity
        self.max_message = max_message
        self.cond = threading.Condition()
        self.retained: deque[tuple[int, bytes]] = deque()  # seq acked .. next_seq-1
        self.acked = 0
        self.next_seq = 0
        self.producer_closed = False
        self.consumer_closed = False
        self.resend_from: int | None = None  # set by a break: the consumer rereads from here
        self.reconnects = 0


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class MemSender(RingSender):
    transport = "mem"

    def __init__(self, channel: _Channel) -> None:
        self._ch = channel
        self.name = channel.name
        self._closed = False  # see RingEnd._closed
        self.capacity = channel.capacity
        self._messages = 0
        self._bytes = 0
        self._peak = 0

    @property
    def next_seq(self) -> int:
        return self._ch.next_seq

    @property
    def acked(self) -> int:
        return self._ch.acked

    def service(self, timeout: float = 0.0) -> None:
        """Nothing to do in-process; waits up to ``timeout`` for the consumer to commit."""
        self._check_open()
        with self._ch.cond:
            if self._ch.consumer_closed:
                raise RingBroken(f"ring {self.name!r}: the consumer closed the ring")
            if timeout > 0:
                self._ch.cond.wait(timeout)

    def _room(self) -> int:
        return self.capacity - len(self._ch.retained)

    def _push_locked(self, msg: bytes) -> None:
        ch = self._ch
        ch.retained.append((ch.next_seq, bytes(msg)))
        ch.next_seq += 1
        self._messages += 1
        self._bytes += len(msg)
        self._peak = max(self._peak, len(ch.retained))

    def _wait_room_locked(self, deadline: float | None) -> bool:
        while True:
            if self._ch.consumer_closed:
                raise RingBroken(f"ring {self.name!r}: the consumer closed the ring")
            if self._room() > 0:
                return True
            remaining = _remaining(deadline)
            if remaining == 0:
                return False
            self._ch.cond.wait(remaining)

    def send(self, msg: bytes, timeout: float | None = None) -> None:
        self._check_open()
        check_message(self.name, msg, self._ch.max_message)
        with self._ch.cond:
            if not self._wait_room_locked(_deadline(timeout)):
                raise RingTimeout(f"ring {self.name!r}: full for {timeout} s (consumer too slow?)")
            self._push_locked(msg)
            self._ch.cond.notify_all()

    def send_nowait(self, msg: bytes) -> None:
        self._check_open()
        check_message(self.name, msg, self._ch.max_message)
        with self._ch.cond:
            if not self._wait_room_locked(_deadline(0)):
                raise WouldBlock(f"ring {self.name!r}: full ({self.capacity} messages retained)")
            self._push_locked(msg)
            self._ch.cond.notify_all()

    def send_burst(self, msgs: Sequence[bytes], timeout: float | None = 0) -> int:
        self._check_open()
        for msg in msgs:
            check_message(self.name, msg, self._ch.max_message)
        if not msgs:
            return 0
        with self._ch.cond:
            if not self._wait_room_locked(_deadline(timeout)):
                return 0
            n = min(self._room(), len(msgs))
            for msg in msgs[:n]:
                self._push_locked(msg)
            self._ch.cond.notify_all()
            return n

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._ch.cond:
            self._ch.producer_closed = True
            self._ch.cond.notify_all()

    def _break_connection(self) -> None:
        with self._ch.cond:
            self._ch.resend_from = self._ch.acked
            self._ch.reconnects += 1
            self._ch.cond.notify_all()

    def detach(self) -> None:
        self._closed = True  # in-process: the channel stays for a new end to pick up

    def statistics(self) -> RingStatistics:
        with self._ch.cond:
            return RingStatistics(
                name=self.name, transport="mem", role="producer", capacity=self.capacity,
                messages=self._messages, bytes=self._bytes, occupancy=len(self._ch.retained),
                peak_occupancy=self._peak, reconnects=self._ch.reconnects,
                next_seq=self._ch.next_seq, acked=self._ch.acked,
            )  # fmt: skip


class MemReceiver(RingReceiver):
    transport = "mem"

    def __init__(self, channel: _Channel, auto_commit: bool, next_expected: int) -> None:
        self._ch = channel
        self.name = channel.name
        self._closed = False  # see RingEnd._closed
        self.capacity = channel.capacity
        self._auto_commit = auto_commit
        self._next_expected = next_expected
        self._cursor = next_expected  # next seq to read from the retained deque
        self._messages = 0
        self._bytes = 0
        self._dups = 0
        self._peak = 0
        self._batch: ViewBatch | None = None  # the live recv_views batch, if any

    @property
    def next_expected(self) -> int:
        return self._next_expected

    def _expire(self, what: str) -> None:
        """End the live batch of views (the contract: valid until the next receive or
        commit). Its bytes are immutable here, but the rule is the same on every transport,
        so code tested in-process behaves alike on shm and tcp."""
        batch = self._batch
        if batch is not None:
            if not batch.expire():
                raise held_error(self.name, what)
            self._batch = None

    def commit(self, upto: int | None = None) -> None:
        self._check_open()
        self._expire("commit")
        if upto is not None and upto > self._next_expected:
            raise ValueError(
                f"ring {self.name!r}: cannot commit up to {upto}, only {self._next_expected} "
                "messages were delivered"
            )
        with self._ch.cond:
            self._commit_locked(self._next_expected if upto is None else upto)

    def _commit_locked(self, upto: int | None = None) -> None:
        ch = self._ch
        upto = self._next_expected if upto is None else upto
        while ch.retained and ch.retained[0][0] < upto:
            ch.retained.popleft()
        if upto > ch.acked:
            ch.acked = upto
            ch.cond.notify_all()

    def _take_locked(self, max_n: int) -> list[bytes]:
        ch = self._ch
        self._peak = max(self._peak, ch.next_seq - self._next_expected)
        if ch.resend_from is not None:  # the "reconnection": reread what the producer retains
            self._cursor = ch.resend_from
            ch.resend_from = None
        out: list[bytes] = []
        base = ch.retained[0][0] if ch.retained else ch.next_seq
        index = max(0, self._cursor - base)
        while len(out) < max_n and index < len(ch.retained):
            seq, msg = ch.retained[index]
            index += 1
            self._cursor = seq + 1
            if seq < self._next_expected:
                self._dups += 1
                continue
            self._next_expected = seq + 1
            self._messages += 1
            self._bytes += len(msg)
            out.append(msg)
        return out

    def _receive(self, max_n: int, timeout: float | None) -> list[bytes]:
        self._check_open()
        self._expire("receive")
        deadline = _deadline(timeout)
        with self._ch.cond:
            if self._auto_commit:
                self._commit_locked()
            while True:
                got = self._take_locked(max_n)
                if got:
                    return got
                if self._ch.producer_closed and self._next_expected >= self._ch.next_seq:
                    raise EndOfRing(f"ring {self.name!r}: the producer closed the ring")
                remaining = _remaining(deadline)
                if remaining == 0:
                    return []
                self._ch.cond.wait(remaining)

    def recv(self, timeout: float | None = None) -> bytes:
        got = self._receive(1, timeout)
        if not got:
            raise RingTimeout(f"ring {self.name!r}: nothing arrived within {timeout} s")
        return got[0]

    def recv_nowait(self) -> bytes:
        got = self._receive(1, 0)
        if not got:
            raise WouldBlock(f"ring {self.name!r}: empty")
        return got[0]

    def recv_burst(self, max_n: int, timeout: float | None = None) -> list[bytes]:
        if max_n < 1:
            raise ValueError(f"ring {self.name!r}: recv_burst needs max_n >= 1, got {max_n}")
        return self._receive(max_n, timeout)

    def recv_views(self, max_n: int, timeout: float | None = None) -> ViewBatch:
        if max_n < 1:
            raise ValueError(f"ring {self.name!r}: recv_views needs max_n >= 1, got {max_n}")
        got = self._receive(max_n, timeout)
        first = self._next_expected - len(got)
        batch = ViewBatch(self.name, first, [memoryview(m) for m in got], sum(map(len, got)))
        self._batch = batch
        return batch

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._batch is not None:
            self._batch.expire()
            self._batch = None
        with self._ch.cond:
            self._ch.consumer_closed = True
            self._ch.cond.notify_all()

    def _break_connection(self) -> None:
        with self._ch.cond:
            self._ch.resend_from = self._ch.acked
            self._ch.reconnects += 1

    def detach(self) -> None:
        self._closed = True
        if self._batch is not None:
            self._batch.expire()
            self._batch = None

    def statistics(self) -> RingStatistics:
        with self._ch.cond:
            buffered = max(0, self._ch.next_seq - self._next_expected)
            return RingStatistics(
                name=self.name, transport="mem", role="consumer", capacity=self.capacity,
                messages=self._messages, bytes=self._bytes, occupancy=buffered,
                peak_occupancy=self._peak,
                reconnects=self._ch.reconnects, duplicates_dropped=self._dups,
                next_expected=self._next_expected, committed=self._ch.acked,
            )  # fmt: skip


def open_sender(
    name: str,
    *,
    resolver: Resolver,
    capacity: int = DEFAULT_CAPACITY,
    max_message: int = MAX_MESSAGE,
    reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
    next_seq: int = 0,
) -> MemSender:
    """Create a ring's producer end and register it under ``name`` in ``resolver``."""
    check_ring_name(name)
    if capacity < 1:
        raise ValueError(f"ring {name!r}: capacity must be >= 1, got {capacity}")
    channel = _Channel(name, capacity, max_message)
    channel.next_seq = channel.acked = next_seq
    address = f"{name}#{next(_ids)}"
    _channels[address] = channel
    sender = MemSender(channel)
    resolver.register(name, Endpoint("mem", address))
    return sender


def open_receiver(
    name: str,
    *,
    resolver: Resolver,
    auto_commit: bool = True,
    next_expected: int = 0,
    reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
    connect_timeout: float = 10.0,
) -> MemReceiver:
    """Attach the consumer end of the in-process ring ``name``."""
    endpoint = resolver.lookup(check_ring_name(name), timeout=connect_timeout)
    channel = _channels.get(endpoint.address)
    if endpoint.transport != "mem" or channel is None:
        raise RingBroken(
            f"ring {name!r}: no in-process producer at {endpoint.address}; mem rings only "
            "connect ends inside one process"
        )
    return MemReceiver(channel, auto_commit, next_expected)
