"""The shared-memory ring of the multi-process model: both ends on one host, C core underneath.

Memory: one memfd per ring, created by the producer (2 MB hugepages when the kernel has them,
else 4 KB pages), mapped by both ends. Its layout (header, producer and consumer cache lines,
variable-length records) is the versioned ABI described in ``dpmigrate/native/ring.h``. The
C core moves bytes and waits on futexes; everything here is policy.

Rendezvous and liveness: the producer listens on an abstract unix seqpacket socket
``dpmigrate/ring/<ring>/<pid>-<random>`` and registers ``Endpoint("shm", that name, gen)``.
A consumer connects (looking the name up again on every attempt), says ``HELLO next_expected``
and receives ``GEOMETRY`` with the memfd (SCM_RIGHTS). The connection then stays open only
as a liveness channel: EOF means the peer died or dropped the link; a clean close sends
``CLOSE`` first. Seqpacket keeps each control message one datagram, so every message is
checked for its exact size, magic, version and kind.

Retention: the consumer reads at a private cursor and publishes its position only on commit,
so the ring memory itself is the producer's retention. After any break the consumer maps the
memfd afresh, scans from the committed position and skips records below ``next_expected``
(counted in ``duplicates_dropped``). Nothing is copied again and nothing is lost.

No background threads: the producer accepts (re)connecting consumers inside its own calls,
and both ends look at the socket at most every few milliseconds on the hot path and on every
wait slice (waits are futex waits of at most 50 ms, so Ctrl-C and peer death get through).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import select
import socket
import struct
import time
from collections.abc import Sequence
from pathlib import Path

from dpmigrate.errors import (
    ConfigError,
    DpmigrateError,
    EndOfRing,
    MessageTooLarge,
    NativeError,
    ProtocolError,
    RingBroken,
    RingError,
    RingTimeout,
    WouldBlock,
    from_errno,
)
from dpmigrate.native import _ring
from dpmigrate.transports.base import (
    DEFAULT_CAPACITY,
    DEFAULT_RECONNECT_TIMEOUT,
    MAX_MESSAGE,
    MessageViews,
    RingReceiver,
    RingSender,
    RingStatistics,
    ViewBatch,
    held_error,
)
from dpmigrate.transports.resolver import Endpoint, Resolver, check_ring_name

__all__ = ["DEFAULT_RING_BYTES", "ShmReceiver", "ShmSender", "open_receiver", "open_sender"]

MessageViews.register(_ring.Views)

#: Default size of a ring's data area (bytes); ``open_sender(..., ring_bytes=...)`` changes it.
DEFAULT_RING_BYTES = 4 << 20

_SLICE = 0.05  # longest single futex wait: bounds reaction to Ctrl-C and to a dead peer
_LINK_CHECK = 0.005  # how often the hot path looks at the liveness socket
_SPIN_MAX = _ring.SPIN_MAX_NS / 1e9  # the C core's longest spin: a shorter timeout skips it
_HANDSHAKE_GRACE = 2.0  # a connection that has not said HELLO by then is dropped
_RETRY = 0.01  # pause between two connection attempts of a reconnecting consumer

# Control messages: magic, version, kind, then kind-specific u64 fields (little-endian).
_MAGIC, _VERSION = b"DPMS", 1
_HELLO, _GEOMETRY, _CLOSE = 1, 2, 3
_SMALL = struct.Struct("<4sHHQ")  # HELLO(next_expected), CLOSE(0)
_GEOM = struct.Struct("<4sHHQQQQQ")  # map_bytes, data_bytes, capacity, max_message, page_size


def _native(err: OSError, ring: str) -> NativeError:
    """The one place where an OSError from the C core or a socket becomes a NativeError."""
    return from_errno(err.filename or "syscall", err.errno or errno.EIO, f"shm ring {ring!r}")


def _parse_small(ring: str, data: bytes, who: str) -> tuple[int, int]:
    """Check a HELLO/CLOSE datagram exactly; return (kind, value)."""
    if len(data) != _SMALL.size:
        raise ProtocolError(
            f"ring {ring!r}: {who} sent a {len(data)}-byte control message, expected "
            f"{_SMALL.size}; is a different dpmigrate version on the other end?"
        )
    magic, version, kind, value = _SMALL.unpack(data)
    if magic != _MAGIC or version != _VERSION or kind not in (_HELLO, _CLOSE):
        raise ProtocolError(
            f"ring {ring!r}: {who} sent an unknown control message (magic {magic!r}, "
            f"version {version}, kind {kind}); upgrade both ends to the same dpmigrate"
        )
    if kind == _CLOSE and value != 0:
        raise ProtocolError(f"ring {ring!r}: {who} sent a CLOSE with a non-zero field {value}")
    return kind, value


def _round_up(n: int, unit: int) -> int:
    return (n + unit - 1) // unit * unit


def _monotonic_deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + max(0.0, timeout)


def _slice_ms(deadline: float | None, now: float) -> int:
    if deadline is None:
        return int(_SLICE * 1000)
    return max(0, min(int(_SLICE * 1000), int((deadline - now) * 1000) + 1))


# --------------------------------------------------------------------------- producer


class ShmSender(RingSender):
    """Producer end: owns the memfd and the listening socket, serves consumers in its calls."""

    transport = "shm"

    def __init__(
        self,
        name: str,
        resolver: Resolver,
        capacity: int,
        max_message: int,
        reconnect_timeout: float,
        ring_bytes: int | None,
        hugepages: bool | None,
        next_seq: int,
    ) -> None:
        self.name, self.capacity, self._resolver = name, capacity, resolver
        self._closed = False  # see RingEnd._closed
        self._max_message, self._reconnect_timeout = max_message, reconnect_timeout
        self._fd = -1
        self._ring: _ring.Ring | None = None
        self._final: RingStatistics | None = None
        self._conn: socket.socket | None = None
        self._pending: dict[int, tuple[socket.socket, float]] = {}
        self._poll = select.poll()
        self._next_check = 0.0
        self._lost_at: float | None = None  # when the last consumer vanished without CLOSE
        self._had_consumer = self._consumer_closed = False
        self._broken: str | None = None
        self._reconnects = self._resent = self._rejected = 0
        self._connected_at = 0.0
        self._skip = 0  # upcoming sends the consumer already has (see _catch_up)
        try:
            self._create(ring_bytes, hugepages, next_seq)
            self._listen()
        except BaseException:
            self._release()
            raise

    # -- setup -------------------------------------------------------------------------

    def _create(self, ring_bytes: int | None, hugepages: bool | None, next_seq: int) -> None:
        need = 2 * _ring.record_bytes(self._max_message)
        if ring_bytes is None:
            data_bytes = max(DEFAULT_RING_BYTES, 1 << (need - 1).bit_length())
        else:
            data_bytes = 1 << max(ring_bytes - 1, 1).bit_length()
            if data_bytes < need:
                raise ConfigError(
                    f"ring {self.name!r}: ring_bytes={ring_bytes} cannot hold two records of "
                    f"max_message={self._max_message}; use ring_bytes >= {need} or a smaller "
                    "max_message"
                )
        data_bytes = max(data_bytes, _ring.MIN_DATA_BYTES)
        if self.capacity > data_bytes // _ring.RECORD_HEADER_BYTES:
            raise ConfigError(
                f"ring {self.name!r}: capacity {self.capacity} needs at least "
                f"{self.capacity * _ring.RECORD_HEADER_BYTES} bytes; raise ring_bytes"
            )
        attempts = [True, False] if hugepages is None else [hugepages]
        self._fallback: str | None = None
        for huge in attempts:
            page = _ring.HUGE_PAGE_BYTES if huge else os.sysconf("SC_PAGE_SIZE")
            map_bytes = _round_up(_ring.HEADER_BYTES + data_bytes, page)
            try:
                fd = _ring.memfd_create(f"dpmigrate:{self.name}", map_bytes, huge)
                try:
                    ring = _ring.Ring(fd, map_bytes)
                except BaseException:
                    os.close(fd)
                    raise
            except OSError as err:
                if huge and hugepages is None:  # none free: fall back to 4 KB pages
                    self._fallback = _fallback_reason(map_bytes, err)
                    continue
                raise _native(err, self.name) from err
            self._fd, self._ring = fd, ring
            break
        self._huge, self._page, self._map_bytes, self._data_bytes = (
            huge,
            page,
            map_bytes,
            data_bytes,
        )
        # Sealing the size means the consumer can never be SIGBUSed by a shrunk file.
        with contextlib.suppress(OSError):
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
            fcntl.fcntl(self._fd, fcntl.F_ADD_SEALS, seals)
        ring.init_producer(data_bytes, self.capacity, self._max_message, next_seq)

    def _listen(self) -> None:
        self._address = f"dpmigrate/ring/{self.name[:48]}/{os.getpid()}-{secrets.token_hex(6)}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.bind("\0" + self._address)
            sock.listen(8)
            sock.setblocking(False)
        except OSError as err:
            sock.close()
            raise _native(err, self.name) from err
        self._listener = sock
        self._poll.register(sock, select.POLLIN)
        try:
            previous = self._resolver.lookup(self.name, timeout=0).generation
        except (RingTimeout, ConfigError):
            previous = -1
        self._generation = previous + 1
        self._resolver.register(self.name, Endpoint("shm", self._address, self._generation))

    # -- liveness and rendezvous, all inside the caller's thread -------------------------

    def _service(self, force: bool = False) -> None:
        """Accept reconnecting consumers and notice a lost one; raise if the ring broke."""
        now = time.monotonic()
        if force or self._conn is None or now >= self._next_check:
            self._next_check = now + _LINK_CHECK
            for fd, _events in self._poll.poll(0):
                if fd == self._listener.fileno():
                    self._accept(now)
                elif self._conn is not None and fd == self._conn.fileno():
                    self._on_consumer_message()
                elif fd in self._pending:
                    self._on_hello(fd)
            for fd, (sock, since) in list(self._pending.items()):
                if now - since > _HANDSHAKE_GRACE:
                    self._drop_pending(fd, sock)
            if (
                self._conn is None
                and self._lost_at is not None
                and now - self._lost_at > self._reconnect_timeout
            ):
                self._broken = (
                    f"ring {self.name!r}: the consumer went away and did not reconnect within "
                    f"{self._reconnect_timeout} s; restart the consuming stage"
                )
        if self._consumer_closed:
            raise RingBroken(f"ring {self.name!r}: consumer closed the ring; nothing reads it")
        if self._broken:
            raise RingBroken(self._broken)

    def _accept(self, now: float) -> None:
        for _ in range(8):
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                if err.errno in (errno.ECONNABORTED, errno.EMFILE, errno.ENFILE):
                    return
                raise _native(err, self.name) from err
            sock.setblocking(False)
            self._pending[sock.fileno()] = (sock, now)
            self._poll.register(sock, select.POLLIN)
            self._on_hello(sock.fileno())  # usually already queued: connect() sends it

    def _drop_pending(self, fd: int, sock: socket.socket) -> None:
        self._pending.pop(fd, None)
        self._poll.unregister(fd)
        sock.close()

    def _on_hello(self, fd: int) -> None:
        sock, _since = self._pending[fd]
        try:
            data = sock.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        try:
            kind, next_expected = _parse_small(self.name, data, "a connecting consumer")
        except ProtocolError:
            self._rejected += 1  # anyone in this netns can connect: refuse, do not fail
            self._drop_pending(fd, sock)
            return
        if kind == _CLOSE:  # a consumer that closed while it was disconnected
            self._consumer_closed = True
            self._drop_pending(fd, sock)
            return
        self._catch_up(next_expected)
        geometry = _GEOM.pack(
            _MAGIC, _VERSION, _GEOMETRY, self._map_bytes, self._data_bytes, self.capacity,
            self._max_message, self._page,
        )  # fmt: skip
        try:
            socket.send_fds(sock, [geometry], [self._fd])
        except OSError:
            self._drop_pending(fd, sock)
            return
        self._pending.pop(fd)
        self._drop_consumer()
        self._conn, self._lost_at = sock, None
        self._connected_at = time.time()
        if self._had_consumer:
            self._reconnects += 1
            self._resent += max(0, self._ring.positions()[1] - next_expected)
        self._had_consumer = True

    def _catch_up(self, next_expected: int) -> None:
        """A consumer ahead of everything this producer holds: this producer restarted from
        an older persisted point and will regenerate messages the consumer already has. Start
        the (empty) ring at the consumer's seq and drop that many upcoming sends."""
        _head, head_seq, _tail, tail_seq, *_ = self._ring.positions()
        if next_expected <= head_seq or tail_seq != head_seq:
            return
        fresh = _ring.Ring(self._fd, self._map_bytes)
        fresh.init_producer(self._data_bytes, self.capacity, self._max_message, next_expected)
        self._ring.close()
        self._ring = fresh
        self._skip += next_expected - head_seq

    def _on_consumer_message(self) -> None:
        try:
            data = self._conn.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # EOF: died or dropped the link; it has reconnect_timeout to come back
            self._drop_consumer(lost=True)
            return
        try:
            kind, _value = _parse_small(self.name, data, "the consumer")
            if kind != _CLOSE:
                raise ProtocolError(f"ring {self.name!r}: the consumer sent HELLO twice")
        finally:
            self._drop_consumer()
        self._consumer_closed = True

    def _drop_consumer(self, lost: bool = False) -> None:
        if self._conn is not None:
            self._poll.unregister(self._conn)
            self._conn.close()
            self._conn = None
            if lost:
                self._lost_at = time.monotonic()

    # -- sending -----------------------------------------------------------------------

    @property
    def next_seq(self) -> int:
        if self._ring is None:
            return self._final.next_seq if self._final else 0
        return self._ring.positions()[1] - self._skip

    def service(self, timeout: float = 0.0) -> None:
        """See RingSender.service: wait for socket activity, then handle it."""
        self._check_open()
        if timeout > 0:
            self._poll.poll(max(1, int(timeout * 1000)))
        self._service(force=True)

    @property
    def acked(self) -> int:
        if self._ring is None:
            return self._final.acked if self._final else 0
        # The acks are in shared memory; the socket is looked at only as often as by a send
        # (a reconnecting consumer is let in by that, or by service() when idle).
        with contextlib.suppress(RingError):
            self._service()
        return self._ring.positions()[3]

    def _push(self, msgs: Sequence[bytes]) -> int:
        if self._skip:  # regenerated messages the consumer already has (see _catch_up)
            k = min(self._skip, len(msgs))
            self._skip -= k
            return k + (self._push(msgs[k:]) if k < len(msgs) else 0)
        try:
            n = self._ring.push_burst(msgs)
        except ValueError as err:  # the C core names the message and its size
            raise MessageTooLarge(
                f"ring {self.name!r}: {err}; split it or raise the ring's max_message"
            ) from None
        except TypeError as err:
            raise TypeError(f"ring {self.name!r}: {err}") from None
        if n < 0:
            self._consumer_closed = True
            self._service(force=True)
        return n

    def _push_waiting(self, msgs: Sequence[bytes], timeout: float | None) -> int:
        """Push as many as fit; wait up to ``timeout`` for room for the first one."""
        self._check_open()
        self._service()
        n = self._push(msgs)
        if n or not msgs or timeout == 0:
            return n
        first = len(msgs[0])
        deadline = _monotonic_deadline(timeout)
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return 0
            self._service(force=True)
            try:
                self._ring.wait_space(first, _slice_ms(deadline, now))
            except OSError as err:
                raise _native(err, self.name) from err
            n = self._push(msgs)
            if n:
                return n

    def send(self, msg: bytes, timeout: float | None = None) -> None:
        if not self.send_burst((msg,), timeout):  # its fast path: a ping-pong's latency
            raise RingTimeout(
                f"ring {self.name!r}: full for {timeout} s ({self.capacity} messages or "
                f"{self._data_bytes} bytes retained); is the consumer keeping up?"
            )

    def send_nowait(self, msg: bytes) -> None:
        if not self._push_waiting((msg,), 0):
            raise WouldBlock(f"ring {self.name!r}: full ({self.capacity} messages retained)")

    def send_burst(self, msgs: Sequence[bytes], timeout: float | None = 0) -> int:
        # Fast path, the steady state of a busy stage: open, connected, nothing to skip,
        # the link looked at within _LINK_CHECK, and room in the ring. It is _push_waiting
        # with its calls inlined (each Python call costs about as much as a short burst's
        # copy); anything else - full, an error to name, a consumer gone - goes the long way.
        ring = self._ring
        if (
            ring is not None
            and not self._closed
            and not self._skip
            and self._conn is not None
            and not self._consumer_closed
            and not self._broken
            and time.monotonic() < self._next_check
        ):
            try:
                n = ring.push_burst(msgs)
            except (ValueError, TypeError):
                n = 0  # the long way pushes nothing either, and words the error
            if n > 0:
                return n
        return self._push_waiting(msgs, timeout)

    # -- closing -----------------------------------------------------------------------

    def close(self) -> None:
        """Wait (up to reconnect_timeout) until the consumer committed everything, then mark
        the ring closed in shared memory, say CLOSE on the socket and release everything."""
        if self._closed:
            return
        self._closed = True
        try:
            ring = self._ring
            deadline = time.monotonic() + self._reconnect_timeout
            while ring is not None:
                _h, head_seq, _t, tail_seq, *_ = ring.positions()
                now = time.monotonic()
                if tail_seq >= head_seq or now >= deadline:
                    break
                try:
                    self._service(force=True)
                except RingError:
                    break
                ring.wait_space(-1, _slice_ms(deadline, now))
            if ring is not None:
                ring.set_flags(_ring.PRODUCER_CLOSED)
                self._final = self.statistics()
            if self._conn is not None:
                with contextlib.suppress(OSError):
                    self._conn.send(_SMALL.pack(_MAGIC, _VERSION, _CLOSE, 0))
        finally:
            self._release()

    def detach(self) -> None:
        """Leave without CLOSE: the consumer waits for a new producer instance."""
        if self._closed:
            return
        self._closed = True
        if self._ring is not None:
            self._final = self.statistics()
        self._release()

    def _release(self) -> None:
        """Free every resource this end holds; safe on a half-built end."""
        self._drop_consumer()
        for fd, (sock, _since) in list(self._pending.items()):
            self._drop_pending(fd, sock)
        listener = getattr(self, "_listener", None)
        if listener is not None:
            listener.close()
            with contextlib.suppress(Exception):
                if self._resolver.lookup(self.name, timeout=0).address == self._address:
                    self._resolver.unregister(self.name)
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _break_connection(self) -> None:
        """Testing hook: drop the consumer's link as a crash would; it must reconnect."""
        self._drop_consumer(lost=True)

    def statistics(self) -> RingStatistics:
        if self._ring is None:
            if self._final is None:
                return RingStatistics(
                    self.name,
                    "shm",
                    "producer",
                    self.capacity,
                    reconnect_timeout=self._reconnect_timeout,
                )
            return self._final
        ring = self._ring
        _h, head_seq, _t, tail_seq, *_ = ring.positions()
        return RingStatistics(
            name=self.name, transport="shm", role="producer", capacity=self.capacity,
            messages=ring.messages, bytes=ring.bytes, occupancy=head_seq - tail_seq,
            peak_occupancy=ring.peak, reconnects=self._reconnects, resent=self._resent,
            connected_at=self._connected_at, reconnect_timeout=self._reconnect_timeout,
            next_seq=head_seq, acked=tail_seq,
            extra={
                "hugepages": self._huge, "page_size": self._page,
                "page_fallback": self._fallback, "ring_bytes": self._data_bytes,
                "map_bytes": self._map_bytes,
                "address": self._address, "generation": self._generation,
                "consumer_connected": self._conn is not None, "rejected": self._rejected,
            },
        )  # fmt: skip


# --------------------------------------------------------------------------- consumer


class ShmReceiver(RingReceiver):
    """Consumer end: maps the producer's memfd; remaps and resyncs after every break."""

    transport = "shm"

    def __init__(
        self,
        name: str,
        resolver: Resolver,
        auto_commit: bool,
        next_expected: int,
        reconnect_timeout: float,
        connect_timeout: float,
    ) -> None:
        self.name, self.capacity, self._resolver = name, 0, resolver
        self._closed = False  # see RingEnd._closed
        self._auto_commit, self._reconnect_timeout = auto_commit, reconnect_timeout
        self._next_expected = self._committed = next_expected
        self._ring: _ring.Ring | None = None
        self._conn: socket.socket | None = None
        self._poll = select.poll()
        self._next_check = 0.0
        self._lost_at: float | None = None  # when the link dropped; None while connected
        self._producer_closed = self._eof = self._attached_once = False
        self._broken: str | None = None
        self._endpoint: Endpoint | None = None
        self._reconnects = self._dups = 0
        self._connected_at = 0.0
        self._old_messages = self._old_bytes = self._old_peak = 0  # from dropped mappings
        self._extra: dict[str, object] = {}
        # Dropped mappings that a view still shows (unmapped by the C core at its release):
        # until they are free, no receive or commit may let the producer reuse that memory.
        self._held: list[_ring.Ring] = []
        # First contact: wait up to connect_timeout for a registered, listening producer.
        # The GEOMETRY reply is read lazily by the first recv, so a producer in the same
        # thread is never waited for here.
        deadline = time.monotonic() + connect_timeout
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            if self._connect(resolver.lookup(name, timeout=remaining)):
                return
            if time.monotonic() >= deadline:
                raise RingBroken(
                    f"ring {name!r}: the registered producer at {self._endpoint.address} "
                    f"refused connections for {connect_timeout} s; is the producing stage alive?"
                )
            time.sleep(_RETRY)

    # -- link management ---------------------------------------------------------------

    def _connect(self, endpoint: Endpoint) -> bool:
        """Try once to connect and say HELLO; False if nobody listens there (yet)."""
        self._endpoint = endpoint
        if endpoint.transport != "shm":
            raise RingBroken(
                f"ring {self.name!r}: the producer now uses transport {endpoint.transport!r}; "
                "reopen this consumer with that transport"
            )
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            sock.connect("\0" + endpoint.address)
            sock.send(_SMALL.pack(_MAGIC, _VERSION, _HELLO, self._next_expected))
        except OSError:
            sock.close()
            return False
        self._conn = sock
        self._poll.register(sock, select.POLLIN)
        return True

    def _drop_link(self) -> None:
        """Forget the socket and the mapping, as a crash would; the next call reconnects."""
        if self._conn is not None:
            self._poll.unregister(self._conn)
            self._conn.close()
            self._conn = None
        if self._ring is not None:
            ring, self._ring = self._ring, None
            self._old_messages += ring.messages
            self._old_bytes += ring.bytes
            self._old_peak = max(self._old_peak, ring.peak)
            ring.close()  # expires the live batch; with views still out, unmaps later
            if ring.exports:
                self._held.append(ring)
        if self._lost_at is None:
            self._lost_at = time.monotonic()

    def _check_link(self, wait_ms: int = 0) -> None:
        """Read whatever the producer sent: GEOMETRY (+memfd), CLOSE, or EOF."""
        if self._conn is None or not self._poll.poll(wait_ms):
            return
        if self._ring is None:
            self._on_geometry()
            return
        try:
            data = self._conn.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            if self._producer_closed:  # clean close: keep the mapping, drain it
                self._poll.unregister(self._conn)
                self._conn.close()
                self._conn = None
            else:
                self._drop_link()
            return
        kind, _value = _parse_small(self.name, data, "the producer")
        if kind != _CLOSE:
            raise ProtocolError(f"ring {self.name!r}: the producer sent HELLO; it never should")
        self._producer_closed = True

    def _on_geometry(self) -> None:
        try:
            data, fds, flags, _addr = socket.recv_fds(self._conn, 256, 4)
        except BlockingIOError:
            return
        except OSError:
            data, fds, flags = b"", [], 0
        try:
            if not data and not fds:  # the producer died or dropped us before answering
                self._drop_link()
                return
            self._attach(data, fds, flags)
        finally:
            for fd in fds:
                os.close(fd)

    def _attach(self, data: bytes, fds: list[int], flags: int) -> None:
        bad = f"ring {self.name!r}: the producer's GEOMETRY message"
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(data) != _GEOM.size:
            raise ProtocolError(f"{bad} has {len(data)} bytes, expected {_GEOM.size}")
        if len(fds) != 1:
            raise ProtocolError(f"{bad} carried {len(fds)} file descriptors, expected 1")
        magic, version, kind, map_bytes, data_bytes, capacity, max_message, page = _GEOM.unpack(
            data
        )
        if magic != _MAGIC or version != _VERSION or kind != _GEOMETRY:
            raise ProtocolError(
                f"{bad} is not one (magic {magic!r}, version {version}, kind {kind})"
            )
        size = os.fstat(fds[0]).st_size
        if size != map_bytes or not _ring.HEADER_BYTES + data_bytes <= map_bytes < 1 << 42:
            raise ProtocolError(f"{bad} claims {map_bytes} bytes; the memfd has {size}")
        try:
            ring = _ring.Ring(fds[0], map_bytes)
        except OSError as err:
            raise _native(err, self.name) from err
        ring.name = self.name
        try:
            why = ring.attach_consumer()
            if why is not None:
                raise ProtocolError(f"ring {self.name!r}: the shared memory is unusable: {why}")
            code, skipped, committed = ring.resync(self._next_expected)
            if code != _ring.OK:
                raise self._resync_error(code, committed, ring.positions()[1])
        except BaseException:
            ring.close()
            raise
        if self._committed > committed:  # acks given while unmapped, or a restored state
            ring.commit_upto(self._committed)
        self._ring, self.capacity, self._lost_at = ring, capacity, None
        self._dups += skipped
        self._connected_at = time.time()
        if self._attached_once:
            self._reconnects += 1
        self._attached_once = True
        self._extra = {
            "hugepages": page == _ring.HUGE_PAGE_BYTES, "page_size": page,
            "ring_bytes": data_bytes, "map_bytes": map_bytes, "max_message": max_message,
            "address": self._endpoint.address, "generation": self._endpoint.generation,
        }  # fmt: skip

    def _resync_error(self, code: int, committed: int, head_seq: int) -> RingError:
        ne = self._next_expected
        if code == _ring.GAP:
            return ProtocolError(
                f"ring {self.name!r}: this consumer expects seq {ne} but the producer retains "
                f"only seq {committed} and later (gap {ne}..{committed - 1}); restore the "
                "consumer from a state that covers them"
            )
        if code == _ring.AHEAD:
            return ProtocolError(
                f"ring {self.name!r}: this consumer expects seq {ne} but the producer has sent "
                f"only up to seq {head_seq - 1}; is this a new producer (generation "
                f"{self._endpoint.generation})?"
            )
        return ProtocolError(f"ring {self.name!r}: the shared memory does not follow the layout")

    def _reconnect_step(self, deadline: float | None) -> None:
        """One bounded step towards a mapped ring: connect, or wait a slice for GEOMETRY."""
        now = time.monotonic()
        if self._conn is not None:  # connected: the producer is alive, await its answer
            self._check_link(_slice_ms(deadline, now))
            return
        if self._lost_at is None:
            self._lost_at = now
        give_up = self._lost_at + self._reconnect_timeout
        if now >= give_up:
            self._broken = (
                f"ring {self.name!r}: the producer went away and could not be reached again "
                f"within {self._reconnect_timeout} s; restart the producing stage"
            )
            raise RingBroken(self._broken)
        try:
            endpoint: Endpoint | None = self._resolver.lookup(self.name, timeout=0)
        except RingTimeout:
            endpoint = None
        if endpoint is None or not self._connect(endpoint):
            pause = min(_RETRY, give_up - now, _RETRY if deadline is None else deadline - now)
            if pause > 0:  # wait for a newer producer end; try it the moment one comes
                known = -1 if endpoint is None else endpoint.generation
                try:
                    self._resolver.wait_newer(self.name, known, pause)
                except DpmigrateError:
                    time.sleep(pause)

    # -- receiving ---------------------------------------------------------------------

    @property
    def next_expected(self) -> int:
        return self._next_expected

    def _check_held(self, what: str) -> None:
        """Refuse while a dropped mapping is still shown by a view (see _held)."""
        self._held = [ring for ring in self._held if ring.exports]
        if self._held:
            raise held_error(self.name, what)

    def _pop(
        self, ring: _ring.Ring, max_n: int, views: bool = False, spin: bool = False
    ) -> list[bytes] | MessageViews:
        try:
            if views:
                msgs = ring.pop_views(max_n, self._auto_commit, spin)
            else:
                msgs = ring.pop_burst(max_n, self._auto_commit, spin)
        except _ring.RingCorrupt as err:
            raise ProtocolError(
                f"ring {self.name!r}: the shared memory is corrupt ({err}); restart both stages"
            ) from None
        if self._auto_commit:
            self._committed = self._next_expected
        self._next_expected += len(msgs)
        return msgs

    def _link_ok(self) -> bool:
        """Hot-path liveness: look at the socket at most every _LINK_CHECK seconds."""
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + _LINK_CHECK
            self._check_link()
        return self._ring is not None

    def _receive(
        self, max_n: int, timeout: float | None, views: bool = False, spin: bool = True
    ) -> list[bytes] | MessageViews:
        """The whole receive; ``spin=False`` when the caller's fast path has just spun."""
        self._check_open()
        if self._held:
            self._check_held("receive")
        ring = self._ring
        if ring is not None and self._link_ok():  # an empty ring: spin in C first (see recv)
            spin = spin and (timeout is None or timeout >= _SPIN_MAX)
            msgs = self._pop(ring, max_n, views, spin)
            if msgs:
                return msgs
        deadline = _monotonic_deadline(timeout)
        while True:
            if self._eof:
                raise EndOfRing(f"ring {self.name!r}: the producer closed the ring")
            if self._broken:
                raise RingBroken(self._broken)
            ring = self._ring
            if ring is None:
                self._reconnect_step(deadline)
            else:
                msgs = self._pop(ring, max_n, views)  # also flushes acks before any wait
                if msgs:
                    return msgs
                if self._producer_closed or ring.flags() & _ring.PRODUCER_CLOSED:
                    msgs = self._pop(ring, max_n, views)
                    if msgs:
                        return msgs
                    self._eof = True
                    continue
                self._check_link()
                if self._ring is None:
                    continue
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return ViewBatch(self.name, self._next_expected, [], 0) if views else []
            if self._ring is not None:
                try:
                    self._ring.wait_data(_slice_ms(deadline, now))
                except OSError as err:
                    raise _native(err, self.name) from err

    def recv(self, timeout: float | None = None) -> bytes:
        self._check_open()
        ring = self._ring
        if ring is not None and not self._held and self._link_ok():
            try:  # an empty ring is watched in C for the spin budget (1-50 us) first
                msg = ring.pop(self._auto_commit, timeout is None or timeout >= _SPIN_MAX)
            except _ring.RingCorrupt:
                msg = None  # let the slow path raise the ProtocolError
            if msg is not None:
                if self._auto_commit:
                    self._committed = self._next_expected
                self._next_expected += 1
                return msg
            got = self._receive(1, timeout, spin=False)
        else:
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
        if not isinstance(max_n, int) or max_n < 1:
            raise ValueError(f"ring {self.name!r}: recv_burst needs max_n >= 1, got {max_n!r}")
        return self._receive(max_n, timeout)

    def recv_views(self, max_n: int, timeout: float | None = None) -> MessageViews:
        """Zero-copy burst: a batch of views straight into the shared memory (see
        RingReceiver.recv_views). The records stay in the ring until commit anyway (the ring
        memory is the producer's retention), so handing out views costs no copy at all."""
        if not isinstance(max_n, int) or max_n < 1:
            raise ValueError(f"ring {self.name!r}: recv_views needs max_n >= 1, got {max_n!r}")
        ring = self._ring  # fast path: _receive's first step with its calls inlined
        if (
            ring is not None
            and not self._closed
            and not self._held
            and time.monotonic() < self._next_check
        ):
            spin = timeout is None or timeout >= _SPIN_MAX
            try:  # an empty ring is watched in C for the spin budget first (see recv)
                msgs = ring.pop_views(max_n, self._auto_commit, spin)
            except _ring.RingCorrupt:
                msgs = None  # let the slow path raise the ProtocolError
            if msgs:
                if self._auto_commit:
                    self._committed = self._next_expected
                self._next_expected += len(msgs)
                return msgs
            return self._receive(max_n, timeout, views=True, spin=False)
        return self._receive(max_n, timeout, views=True)

    def commit(self, upto: int | None = None) -> None:
        self._check_open()
        if self._held:
            self._check_held("commit")
        if self._ring is not None:
            self._ring.expire_views()  # the contract: a commit ends the live batch
        if upto is None:
            upto = self._next_expected
        elif not isinstance(upto, int) or upto > self._next_expected:
            raise ValueError(
                f"ring {self.name!r}: cannot commit up to {upto!r}, only seq below "
                f"{self._next_expected} were delivered"
            )
        if upto <= self._committed:
            return  # acks are cumulative
        if self._ring is not None:  # otherwise applied right after the next attach
            try:
                self._ring.commit_upto(upto)
            except _ring.RingCorrupt as err:
                raise ProtocolError(
                    f"ring {self.name!r}: the shared memory is corrupt ({err}); restart both stages"
                ) from None
        self._committed = upto

    # -- closing -----------------------------------------------------------------------

    def close(self) -> None:
        """Tell the producer (flag in shared memory and CLOSE on the socket), then detach."""
        if self._closed:
            return
        self._closed = True
        closing = _SMALL.pack(_MAGIC, _VERSION, _CLOSE, 0)
        if self._ring is not None:
            self._ring.set_flags(_ring.CONSUMER_CLOSED)
        if self._conn is None and not (self._eof or self._producer_closed):
            # Disconnected: a fresh connection whose first message is CLOSE still tells it.
            with contextlib.suppress(RingError, OSError):
                self._connect(self._resolver.lookup(self.name, timeout=0))
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.send(closing)
        lost_at = self._lost_at
        self._drop_link()
        self._lost_at = lost_at

    def detach(self) -> None:
        """Leave without CLOSE: the producer keeps the ring for a new consumer instance."""
        if not self._closed:
            self._closed = True
            self._drop_link()

    def _break_connection(self) -> None:
        """Testing hook: drop socket and mapping as a crash would; the next call recovers."""
        self._drop_link()

    def statistics(self) -> RingStatistics:
        ring = self._ring
        occupancy = 0
        messages, nbytes, peak = self._old_messages, self._old_bytes, self._old_peak
        if ring is not None:
            _h, head_seq, _t, _ts, _r, read_seq, _f = ring.positions()
            occupancy = max(0, head_seq - read_seq)
            messages, nbytes, peak = (
                messages + ring.messages,
                nbytes + ring.bytes,
                max(peak, ring.peak),
            )
        return RingStatistics(
            name=self.name, transport="shm", role="consumer", capacity=self.capacity,
            messages=messages, bytes=nbytes, occupancy=occupancy, peak_occupancy=peak,
            reconnects=self._reconnects, duplicates_dropped=self._dups,
            connected_at=self._connected_at, reconnect_timeout=self._reconnect_timeout,
            next_expected=self._next_expected, committed=self._committed,
            extra=dict(self._extra, connected=self._ring is not None),
        )  # fmt: skip


def _fallback_reason(map_bytes: int, err: OSError) -> str:
    """Why a ring that wanted 2 MB pages got 4 KB ones (its statistics' ``page_fallback``,
    which the stage host logs): the pool's counts, so that the fix is plain."""
    pool = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")
    try:
        total, free = (int((pool / f"{n}_hugepages").read_text()) for n in ("nr", "free"))
    except (OSError, ValueError):
        return f"no 2 MB hugepage pool on this host ({err.strerror}): 4 KB pages"
    need = map_bytes // _ring.HUGE_PAGE_BYTES
    if total == 0:
        return (f"no 2 MB hugepages reserved on this host: 4 KB pages (reserve {need} per ring "
                "with `dpmigrate cluster up --hugepages N`)")  # fmt: skip
    return (f"hugepage reservation short: {need} 2 MB pages needed, {free} of {total} free "
            f"({err.strerror}): 4 KB pages; reserve more (cluster up --hugepages N)")  # fmt: skip


# --------------------------------------------------------------------------- module API


def open_sender(
    name: str,
    *,
    resolver: Resolver,
    capacity: int = DEFAULT_CAPACITY,
    max_message: int = MAX_MESSAGE,
    reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
    ring_bytes: int | None = None,
    hugepages: bool | None = None,
    next_seq: int = 0,
) -> ShmSender:
    """Create the ring's memory and listening socket and register ``name`` in ``resolver``.

    Never waits for a consumer. ``ring_bytes`` sizes the data area (rounded up to a power of
    two, default 4 MiB); ``hugepages`` True/False forces or forbids 2 MB pages (default: use
    them when the kernel has some reserved); ``next_seq`` numbers the first message.
    """
    check_ring_name(name)
    if not isinstance(capacity, int) or capacity < 1:
        raise ConfigError(f"ring {name!r}: capacity must be an integer >= 1, got {capacity!r}")
    if not isinstance(max_message, int) or not 0 <= max_message < 1 << 31:
        raise ConfigError(f"ring {name!r}: max_message must be 0..2**31-1, got {max_message!r}")
    if not reconnect_timeout > 0:
        raise ConfigError(f"ring {name!r}: reconnect_timeout must be > 0, got {reconnect_timeout}")
    if ring_bytes is not None and (not isinstance(ring_bytes, int) or ring_bytes < 1):
        raise ConfigError(f"ring {name!r}: ring_bytes must be a positive integer")
    if not isinstance(next_seq, int) or next_seq < 0:
        raise ConfigError(f"ring {name!r}: next_seq must be an integer >= 0, got {next_seq!r}")
    return ShmSender(
        name, resolver, capacity, max_message, reconnect_timeout, ring_bytes, hugepages, next_seq
    )


def open_receiver(
    name: str,
    *,
    resolver: Resolver,
    auto_commit: bool = True,
    next_expected: int = 0,
    reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
    connect_timeout: float = 10.0,
) -> ShmReceiver:
    """Find ring ``name`` through ``resolver`` and connect to its producer.

    Waits up to ``connect_timeout`` for the producer to be registered and listening; the
    memory itself is handed over (and ``next_expected`` checked) on the first receive call.
    """
    check_ring_name(name)
    if not isinstance(next_expected, int) or next_expected < 0:
        raise ConfigError(f"ring {name!r}: next_expected must be an integer >= 0")
    if not reconnect_timeout > 0:
        raise ConfigError(f"ring {name!r}: reconnect_timeout must be > 0, got {reconnect_timeout}")
    return ShmReceiver(
        name, resolver, auto_commit, next_expected, reconnect_timeout, connect_timeout
    )
