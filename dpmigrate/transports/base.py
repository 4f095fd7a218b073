"""The ring interface every transport implements, and the sequence bookkeeping they share.

A ring is a bounded, ordered, single-producer single-consumer channel of ``bytes``. It has
two ends, usually in different processes: a :class:`RingSender` (producer) and a
:class:`RingReceiver` (consumer). Every message carries a logical sequence number that is
independent of the transport (DESIGN.md §3):

* the producer numbers messages 0, 1, 2, ... and *retains* each one until the consumer
  acknowledges it (cumulatively); the retained window is the ring's capacity, so a full
  window blocks the producer (backpressure) and nothing is ever dropped;
* the consumer delivers each sequence number exactly once, in order, and acknowledges only
  what it has committed (``commit()``; with ``auto_commit`` a message counts as committed
  once the caller asks for the next one);
* after any break the consumer says ``next_expected`` and the producer resends from there;
  anything below ``next_expected`` that still arrives is dropped as a duplicate.

Who listens: the producer end is the server for both shm and tcp; the consumer end finds it
by ring name through a :class:`~dpmigrate.transports.resolver.Resolver` and connects. A
consumer that restarts or moves therefore only needs the ring name and its own committed
``next_expected``.

Burst calls follow DPDK's rte_ring vocabulary: ``send_burst`` sends *as many as fit* and
returns the count; ``recv_burst`` returns up to ``max_n`` messages, possibly fewer.

Two receive APIs: ``recv``/``recv_burst`` hand out owned ``bytes`` (one copy and one
allocation per message, kept as long as the caller likes); ``recv_views`` hands out a
:class:`MessageViews` batch of memoryviews into the ring's own memory (shm) or the receive
buffer (tcp, mem) with no copy at all. Such a batch is valid until the next receive or
commit on that end (or its close): that is when the memory may be given back to the
producer or overwritten by the next read, so at that moment the ring releases every view
(using one afterwards raises :class:`~dpmigrate.errors.ViewExpired`), and a receive or
commit that finds memory of an expired batch still referenced through a slice or an
exported buffer refuses with :class:`~dpmigrate.errors.ViewsHeld` rather than let it be
reused. Delivery and exactly-once are the same for both APIs: ``next_expected`` moves when
the batch is returned, ``commit`` acknowledges as always.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, overload

from dpmigrate.errors import MessageTooLarge, RingClosed, ViewExpired, ViewsHeld

#: Largest message any transport accepts, in bytes (1 MiB). Larger is MessageTooLarge.
MAX_MESSAGE = 1 << 20

#: Default retained window (messages) when a ring is created without a capacity
#: (``DPMIGRATE_RING_CAPACITY``'s default; entry points pass the configured value).
DEFAULT_CAPACITY = 1024

#: Default seconds a ring end waits for its peer to come back before it is broken
#: (``DPMIGRATE_RECONNECT_TIMEOUT``'s default; entry points pass the configured value).
DEFAULT_RECONNECT_TIMEOUT = 10.0


@dataclasses.dataclass
class RingStatistics:
    """What a ring end has done so far; ``as_dict()`` is the JSON form."""

    name: str
    transport: str
    role: str  # "producer" or "consumer"
    capacity: int
    messages: int = 0  # sent (producer, first transmissions only) or delivered (consumer)
    bytes: int = 0  # payload bytes of those messages
    occupancy: int = 0  # producer: messages retained (unacked); consumer: buffered, undelivered
    peak_occupancy: int = 0
    reconnects: int = 0
    resent: int = 0  # producer: messages transmitted again after a reconnection
    duplicates_dropped: int = 0  # consumer: messages below next_expected that arrived again
    next_seq: int = 0  # producer: sequence number of the next new message
    acked: int = 0  # producer: every seq below this is acknowledged
    next_expected: int = 0  # consumer: sequence number it will deliver next
    committed: int = 0  # consumer: every seq below this is committed (acked to the producer)
    connected_at: float = 0.0  # wall clock of the last (re)connection to the peer; 0: never
    reconnect_timeout: float = 0.0  # seconds it waits for a lost peer; 0: never reconnects (mem)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # transport-specific

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_message(ring: str, msg: bytes | bytearray | memoryview, limit: int = MAX_MESSAGE) -> None:
    """Raise MessageTooLarge (naming the ring) unless ``msg`` is a bytes-like of legal size."""
    if not isinstance(msg, bytes | bytearray | memoryview):
        raise TypeError(f"ring {ring!r}: messages are bytes, got {type(msg).__name__}")
    if len(msg) > limit:
        raise MessageTooLarge(
            f"ring {ring!r}: message of {len(msg)} bytes exceeds the maximum of {limit} bytes; "
            "split it or raise the ring's max_message"
        )


class MessageViews(Sequence[memoryview]):
    """A received batch as zero-copy views, valid until the next receive or commit.

    ``len(batch)`` messages; ``batch[i]`` and iteration give read-only memoryviews;
    ``first_seq`` is the sequence number of ``batch[0]``; ``nbytes`` the payload bytes of
    them all (so a consumer that only counts never touches a view). After expiry every
    access raises ViewExpired; ``len``, ``first_seq`` and ``nbytes`` stay readable.
    The shm ring's batch is a C type registered as a virtual subclass.
    """

    __slots__ = ()

    first_seq: int
    nbytes: int

    @property
    @abc.abstractmethod
    def expired(self) -> bool:
        """True once the batch's memory may have been reused (its views are released)."""


def expired_error(ring: str) -> ViewExpired:
    """The one wording of a use after expiry, naming the ring."""
    return ViewExpired(
        f"ring {ring!r}: this batch of views expired at the next receive or commit on its "
        "ring end (its memory may be reused now); copy what you keep with bytes(view)"
    )


def held_error(ring: str, what: str) -> ViewsHeld:
    """The one wording of a refused receive/commit while expired memory is referenced."""
    return ViewsHeld(
        f"ring {ring!r}: {what} refused: memory of the previous batch of views is still in use "
        "(a slice of one of its views, or a buffer such as a numpy array taken from one); "
        "drop it, or copy what you keep with bytes(view) before the next receive"
    )


class ViewBatch(MessageViews):
    """The Python implementation of :class:`MessageViews` (mem and tcp rings).

    It owns the memoryviews it hands out and releases them on :meth:`expire`, which the
    ring end calls at its next receive or commit: a released memoryview raises ValueError on
    any use, and this batch raises ViewExpired, so nothing reads memory that was reused.
    """

    __slots__ = ("_count", "_ring", "_views", "first_seq", "nbytes")

    def __init__(self, ring: str, first_seq: int, views: list[memoryview], nbytes: int) -> None:
        self._ring = ring
        self._views: list[memoryview] | None = views
        self._count = len(views)
        self.first_seq = first_seq
        self.nbytes = nbytes

    @property
    def expired(self) -> bool:
        return self._views is None

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> memoryview: ...
    @overload
    def __getitem__(self, index: slice) -> list[memoryview]: ...
    def __getitem__(self, index: int | slice) -> memoryview | list[memoryview]:
        views = self._views
        if views is None:
            raise expired_error(self._ring)
        return views[index]

    def __iter__(self) -> Iterator[memoryview]:
        views = self._views
        if views is None:
            raise expired_error(self._ring)
        return iter(views)

    def __repr__(self) -> str:
        state = "expired" if self._views is None else "live"
        return f"<ViewBatch ring={self._ring!r} seq={self.first_seq} n={len(self)} {state}>"

    def expire(self) -> bool:
        """Release every view; False if one of them has a buffer exported from it (a numpy
        array, say) and could not be released."""
        views = self._views
        if views is None:
            return True
        ok = True
        for v in views:
            try:
                v.release()
            except BufferError:
                ok = False
        if ok:
            self._views = None
        return ok


class RingEnd(abc.ABC):
    """What both ends have: a name, a transport, close() and statistics()."""

    name: str
    transport: str
    capacity: int
    #: Every end also sets this in its __init__: CPython 3.11 specialises the read of an
    #: instance attribute but not of a class default, and the hot paths read it once per
    #: call (shm send_burst + recv_views of 32 x 64 B: 10.04k -> 9.50k instructions).
    _closed: bool = False

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise RingClosed(
                f"ring {self.name!r}: this {self._role} end was closed; open a new one"
            )

    @property
    @abc.abstractmethod
    def _role(self) -> str: ...

    @abc.abstractmethod
    def close(self) -> None:
        """Close this end. Idempotent. A producer's close is seen by the consumer as
        EndOfRing once it has received everything sent before the close."""

    @abc.abstractmethod
    def detach(self) -> None:
        """Leave without closing the ring: free this end's resources but do not tell the peer
        the ring is over, so the peer waits (up to its reconnect_timeout) for a new instance
        of this end to come back — after a restart, a checkpoint/restore or a migration.
        Afterwards this end is closed (RingClosed on use)."""

    @abc.abstractmethod
    def statistics(self) -> RingStatistics: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RingSender(RingEnd):
    """The producer end."""

    _role = "producer"

    @abc.abstractmethod
    def send(self, msg: bytes, timeout: float | None = None) -> None:
        """Send one message, waiting while the window is full.

        Raises RingTimeout if ``timeout`` seconds pass first, RingBroken if the consumer died
        and did not come back within the ring's reconnect bound, RingClosed after close().
        """

    @abc.abstractmethod
    def send_nowait(self, msg: bytes) -> None:
        """Send one message or raise WouldBlock at once if the window is full."""

    @abc.abstractmethod
    def send_burst(self, msgs: Sequence[bytes], timeout: float | None = 0) -> int:
        """Send as many of ``msgs`` (in order) as fit and return how many were sent.

        With ``timeout=0`` it never waits; otherwise it waits up to ``timeout`` (None: for
        ever) for room for at least one message. Returns 0 when nothing fit in time.
        """

    @property
    @abc.abstractmethod
    def next_seq(self) -> int:
        """Sequence number the next new message will get."""

    @abc.abstractmethod
    def service(self, timeout: float = 0.0) -> None:
        """Do pending I/O without sending, waiting up to ``timeout`` for activity: let a
        (re)connecting consumer in and resend to it, take in acknowledgements, notice a dead
        consumer (RingBroken after reconnect_timeout).

        An end has no thread of its own (cheap, deterministic, and nothing running while CRIU
        freezes the process), so it makes progress only inside its calls: a producer that has
        nothing to send for a while calls this from its idle loop.
        """

    @property
    @abc.abstractmethod
    def acked(self) -> int:
        """Every seq below this has been acknowledged by the consumer.

        Reading it also takes in acknowledgements that have arrived (no waiting), so a stage
        with nothing to send still learns what its consumer committed.
        """


class RingReceiver(RingEnd):
    """The consumer end."""

    _role = "consumer"

    @abc.abstractmethod
    def recv(self, timeout: float | None = None) -> bytes:
        """Return the next message, waiting for one.

        Raises RingTimeout after ``timeout`` seconds, EndOfRing when the producer closed and
        everything was delivered, RingBroken if the producer died and did not come back
        within the ring's reconnect bound, RingClosed after close().
        """

    @abc.abstractmethod
    def recv_nowait(self) -> bytes:
        """Return the next message or raise WouldBlock at once."""

    @abc.abstractmethod
    def recv_burst(self, max_n: int, timeout: float | None = None) -> list[bytes]:
        """Return between 1 and ``max_n`` messages, waiting up to ``timeout`` for the first.

        Returns an empty list when nothing arrived in time (never raises RingTimeout).
        Raises EndOfRing only when the producer closed and nothing is left.
        """

    @abc.abstractmethod
    def recv_views(self, max_n: int, timeout: float | None = None) -> MessageViews:
        """Like recv_burst, but the batch is zero-copy views, valid until the next receive
        or commit on this end (see the module docstring); an empty batch on timeout.

        Raises ViewsHeld (and delivers nothing) while memory of the previous batch is still
        referenced through a slice or an exported buffer.
        """

    @abc.abstractmethod
    def commit(self, upto: int | None = None) -> None:
        """Acknowledge delivered messages (a cumulative ack to the producer).

        ``upto=None`` acknowledges everything delivered so far; ``upto=N`` acknowledges every
        seq below N (N at most ``next_expected``). A stage uses ``upto`` to acknowledge only
        what its persisted state covers, while it keeps processing later messages.
        """

    @property
    @abc.abstractmethod
    def next_expected(self) -> int:
        """Sequence number of the next message this end will deliver."""
