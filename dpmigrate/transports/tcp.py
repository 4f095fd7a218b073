"""The tcp ring transport: one TCP connection per ring, producer listening, consumer connecting.

The producer end listens on a loopback port and registers ``Endpoint("tcp", "host:port",
generation)`` under the ring name; the consumer resolves the name on every connection attempt
(the producer may have moved) and connects. Frames are described in
:mod:`dpmigrate.transports.frames`.

There are no background threads: every call does its I/O with non-blocking sockets and
``poll()`` (accepting a reconnecting consumer, reading acks, writing queued frames), which
keeps the GIL free for the stage and leaves nothing running behind CRIU's back. The price: a
producer serves a (re)connecting consumer only inside its calls, so a producer with nothing
to send calls :meth:`TcpSender.service` (or reads ``acked``) from its idle loop.

Per-message Python work is kept to a header pack or unpack and one copy: a burst's headers
and payloads go to the kernel in one gathering ``sendmsg()`` (no joined copy), and the
consumer cuts many frames out of each large ``recv_into()``.

Sequence bookkeeping follows :mod:`dpmigrate.transports.base`: the producer retains every
unacked message (the window is ``capacity`` messages) and resends from the consumer's
``next_expected`` after a reconnection; the consumer delivers each seq once, in order, and
drops (counts) anything below its cursor.

Authentication (``key``): with a ring credential both ends prove it at every connection
(CHALLENGE, HELLO, WELCOME; see :mod:`~dpmigrate.transports.frames`) before the producer
looks at the consumer's generation or window, so a peer without the key can neither take
the consumer's place nor learn anything about the ring: it is refused with the one text
``"refused"``, and nothing it sends (garbage, a forged HELLO, a flood of idle connections)
changes the producer's state or makes it raise. ``key=None`` keeps an unauthenticated ring
for library use and tests; the runtime always passes a key. Only the connection is
authenticated: the DATA hot path is unchanged.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import select
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from dpmigrate.errors import (
    ConfigError,
    DpmigrateError,
    EndOfRing,
    ProtocolError,
    RingBroken,
    RingTimeout,
    WouldBlock,
)
from dpmigrate.transports import frames as fr
from dpmigrate.transports.base import (
    DEFAULT_CAPACITY,
    DEFAULT_RECONNECT_TIMEOUT,
    MAX_MESSAGE,
    MessageViews,
    RingReceiver,
    RingSender,
    RingStatistics,
    ViewBatch,
    check_message,
    held_error,
)
from dpmigrate.transports.resolver import Endpoint, Resolver, check_ring_name

TRANSPORT = "tcp"

_BACKOFF_MIN = 0.005  # first reconnection retry delay (s); doubles up to _BACKOFF_MAX
_BACKOFF_MAX = 0.1
#: Accepted connections that have not completed the handshake yet. Strangers may fill this
#: table; when it is full the OLDEST pending connection is closed (silently: an honest
#: consumer that loses its slot just reconnects, within its reconnect bound). A consumer's
#: handshake takes one round trip after the producer's CHALLENGE, so a flood evicts it only
#: by opening more than this many connections within that round trip; each pending slot costs
#: a socket and a 4 KiB buffer, so 64 keeps a flood's memory small. (A flood at a rate no
#: bookkeeping survives is for the network to stop: ring ports face the cluster only.)
_MAX_PENDING = 64
#: A pending connection that has not sent a valid HELLO this long after its CHALLENGE is
#: closed (silently, as above): long enough for a consumer busy in its stage to come back to
#: its ring, short enough that idle strangers do not hold slots.
_HANDSHAKE_TIMEOUT = 2.0
_LISTEN_BACKLOG = 128  # a flood must not fill the accept queue before the producer drains it
_IOV_MAX = 512  # buffers per sendmsg() call
_RECV_BUFFER = 4 << 20  # consumer receive buffer; holds at least two maximal frames
_ACK_DIVISOR = 8  # the consumer acks once committed advanced by capacity/8 (and before waiting)
_RECV_CHUNK = 256 << 10  # bytes asked of one recv_into(): large, yet warm in cache
_FLUSH_LINGER = 1.0  # how long close() waits to hand its last frames to the kernel
_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST (a crash)
#: A consumer whose producer went silent this long asks the registry, at most this often,
#: whether a newer producer was registered: a producer that was paused, or whose node was cut
#: off, keeps its connection open, and the copy that replaced it (a failover) must not wait
#: for that connection to die.
_SILENT_CHECK_S = 0.1

_PRODUCER_ALLOWED = frozenset({fr.ACK, fr.CLOSE, fr.PING})
_HELLO_ALLOWED = frozenset({fr.HELLO})
_CHALLENGE_ALLOWED = frozenset({fr.CHALLENGE, fr.ERROR, fr.PING})
_HANDSHAKE_ALLOWED = frozenset({fr.WELCOME, fr.ERROR, fr.PING})
_CONSUMER_ALLOWED = frozenset({fr.DATA, fr.CLOSE, fr.PING, fr.ERROR})

_POLL_IN = select.POLLIN | select.POLLHUP | select.POLLERR
#: What a non-blocking socket raises when it must wait (a TLS one for records too).
_AGAIN = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
_TLS_WRITE = 256 << 10  # bytes joined for one TLS write (TLS cannot gather: one copy)
#: The consumer's spin before a poll() sleep (see TcpReceiver._spin_read): it adapts between
#: these bounds (s) to how long its waits turn out to last; a wait longer than _SPIN_MAX is
#: idle time, not a burst in flight. _SPIN_READS bounds the reads of one spin.
_SPIN_MIN, _SPIN_MAX, _SPIN_READS = 2e-6, 50e-6, 200
_TLS_READS = 64  # reads after one poll while TLS holds decrypted bytes the kernel does not


def _poll_ms(wait: float | None) -> int | None:
    """poll() takes milliseconds; round up so a short wait never becomes a busy spin."""
    if wait is None:
        return None
    if wait <= 0:
        return 0
    return math.ceil(wait * 1000)


def _tune(sock: socket.socket, sockbuf: int | None, reconnect_timeout: float) -> None:
    """Non-blocking, no Nagle delay (acks and small frames must leave at once), a dead peer
    noticed within about reconnect_timeout even on an idle or half-open link (keepalive and
    TCP_USER_TIMEOUT), and optionally fixed socket buffers (the default keeps the kernel's
    autotuning, which on loopback grows further than SO_SNDBUF may be set unprivileged)."""
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle = max(1, int(reconnect_timeout / 2))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    sock.setsockopt(
        socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1000, int(reconnect_timeout * 1000))
    )
    if sockbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sockbuf)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sockbuf)


def _abort(sock: socket.socket) -> None:
    """Close ``sock`` the way a crash would look to the peer (RST, no close frame)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    sock.close()


def _parse_address(ring: str, address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"ring {ring!r}: registered tcp address {address!r} is not host:port; "
            "re-register the producer"
        )
    return host, int(port)


def _check_key(ring: str, key: object) -> bytes | None:
    """A ring credential is None (unauthenticated ring) or at least KEY_SIZE bytes."""
    if key is None:
        return None
    if not isinstance(key, bytes) or len(key) < fr.KEY_SIZE:
        size = len(key) if isinstance(key, bytes) else type(key).__name__
        raise ConfigError(
            f"ring {ring!r}: the ring credential (key) must be bytes of at least {fr.KEY_SIZE} "
            f"bytes, got {size}; pass the key the agents derived for this ring, or None"
        )
    return key


def _check_tls(ring: str, tls: object, server_side: bool) -> ssl.SSLContext | None:
    """A ring's TLS is None (plain TCP) or a context that verifies its peer: both ends show
    a certificate of the cluster's CA (mutual), so neither talks to a stranger's TLS."""
    if tls is None:
        return None
    if not isinstance(tls, ssl.SSLContext):
        raise ConfigError(
            f"ring {ring!r}: tls must be an ssl.SSLContext or None, got {type(tls).__name__}"
        )
    if tls.verify_mode != ssl.CERT_REQUIRED:
        side = "producer" if server_side else "consumer"
        raise ConfigError(
            f"ring {ring!r}: the {side}'s TLS context does not verify its peer; set "
            "verify_mode = ssl.CERT_REQUIRED and load the cluster CA (tls_context() does)"
        )
    return tls


def _wrap_tls(sock: socket.socket, tls: ssl.SSLContext, server_side: bool) -> ssl.SSLSocket:
    """The TLS layer over a connected non-blocking socket; its handshake is driven by the
    ring's own loop (:func:`_tls_handshake`), never blocking it."""
    return tls.wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False)


def _tls_handshake(sock: ssl.SSLSocket) -> bool:
    """One step of the TLS handshake: True once done, False while it waits for the peer.
    Raises ssl.SSLError (a failed handshake: wrong CA, not TLS) or OSError."""
    try:
        sock.do_handshake()
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return False
    return True


def _split_opts(ring: str, opts: dict[str, Any], known: dict[str, Any]) -> dict[str, Any]:
    unknown = set(opts) - set(known)
    if unknown:
        raise ConfigError(
            f"ring {ring!r}: unknown tcp transport option(s) {sorted(unknown)}; "
            f"known: {sorted(known)}"
        )
    return {**known, **opts}


class _OutQueue:
    """Frames waiting to be handed to the kernel, as a list of buffers written with one
    gathering sendmsg() per call: headers and payloads are never copied into a joined buffer
    (the kernel gathers them), and only a partial write leaves a memoryview behind."""

    __slots__ = ("bufs", "nbytes", "tls_retry")

    def __init__(self) -> None:
        self.bufs: deque[bytes | memoryview] = deque()
        self.nbytes = 0
        self.tls_retry = 0  # a TLS write that must be retried with exactly this many bytes

    def __bool__(self) -> bool:
        return self.nbytes > 0

    def append(self, data: bytes) -> None:
        if data:
            self.bufs.append(data)
            self.nbytes += len(data)

    def extend(self, parts: list[bytes], nbytes: int) -> None:
        """Queue ``parts`` (no empty buffers among them) totalling ``nbytes``."""
        self.bufs.extend(parts)
        self.nbytes += nbytes

    def clear(self) -> None:
        self.bufs.clear()
        self.nbytes = 0
        self.tls_retry = 0

    def write(self, sock: socket.socket) -> None:
        """Write as much as the socket takes now. Raises OSError other than EAGAIN/EINTR."""
        if isinstance(sock, ssl.SSLSocket):
            self._write_tls(sock)
            return
        bufs = self.bufs
        while bufs:
            try:
                if len(bufs) <= _IOV_MAX:
                    n = sock.sendmsg(bufs)
                else:
                    n = sock.sendmsg(list(itertools.islice(bufs, _IOV_MAX)))
            except (BlockingIOError, InterruptedError):
                return
            if n == self.nbytes:  # the common case: everything went
                bufs.clear()
                self.nbytes = 0
                return
            if not self._consumed(n):
                return  # the kernel took less than offered: it is full for now

    def drop(self, n: int) -> None:
        """Forget the first ``n`` queued bytes: they were written another way."""
        self._consumed(n)

    def _consumed(self, n: int) -> bool:
        """Drop the first ``n`` bytes written; False when a buffer was cut (the socket took
        less than offered)."""
        self.nbytes -= n
        bufs = self.bufs
        while n:
            size = len(bufs[0])
            if n >= size:
                n -= size
                bufs.popleft()
            else:
                bufs[0] = memoryview(bufs[0])[n:]
                return False
        return True

    def _write_tls(self, sock: ssl.SSLSocket) -> None:
        """TLS takes one buffer per write, and a write that had to wait must be offered
        again with the same bytes (OpenSSL's rule): join up to _TLS_WRITE, remember the
        length while it waits."""
        while self.bufs:
            size = self.tls_retry or min(self.nbytes, _TLS_WRITE)
            data = self._head(size)
            try:
                n = sock.send(data)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                self.tls_retry = size
                return
            self.tls_retry = 0
            self._consumed(n)  # (a cut buffer here only means it was larger than one write)
            if n < size:
                return

    def _head(self, size: int) -> bytes | memoryview:
        first = self.bufs[0]
        if len(first) >= size:
            return memoryview(first)[:size]
        parts, got = [], 0
        for buf in self.bufs:
            take = min(len(buf), size - got)
            parts.append(buf if take == len(buf) else memoryview(buf)[:take])
            got += take
            if got == size:
                break
        return b"".join(parts)


class _Pending:
    """An accepted connection that has not yet sent a complete, valid HELLO; ``nonce`` is the
    producer's CHALLENGE to it (fresh per connection: a recorded HELLO answers no other)."""

    __slots__ = ("challenged", "nonce", "peer", "reader", "since", "sock")

    def __init__(self, sock: socket.socket, peer: str, since: float) -> None:
        self.sock = sock
        self.peer = peer
        self.since = since
        self.nonce = os.urandom(fr.NONCE_SIZE)
        self.reader = fr.FrameReader(_HELLO_ALLOWED, 0, size=4096)
        self.challenged = False  # with TLS: once its handshake is done


class TcpSender(RingSender):
    """The producer end: a listening socket, the retained window, and one consumer link."""

    transport = TRANSPORT

    def __init__(
        self,
        name: str,
        resolver: Resolver,
        capacity: int,
        max_message: int,
        reconnect_timeout: float,
        host: str,
        port: int,
        generation: int | None,
        sockbuf: int | None,
        next_seq: int = 0,
        *,
        key: bytes | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        check_ring_name(name)
        self._key = _check_key(name, key)
        self._tls = _check_tls(name, tls, server_side=True)
        if not 1 <= capacity < 1 << 32:
            raise ConfigError(f"ring {name!r}: capacity {capacity} must be 1 .. 2**32-1 messages")
        if not 0 <= max_message <= fr.MAX_ANNOUNCED_MESSAGE:
            raise ConfigError(
                f"ring {name!r}: max_message {max_message} must be 0 .. {fr.MAX_ANNOUNCED_MESSAGE}"
            )
        self.name = name
        self._closed = False  # see RingEnd._closed
        self.capacity = capacity
        self.max_message = max_message
        self.reconnect_timeout = reconnect_timeout
        self._resolver = resolver
        self._sockbuf = sockbuf

        self._retained: deque[bytes] = deque()  # payloads of seq acked .. next_seq-1
        # A producer resumed from a persisted point numbers on from there.
        self._acked = self._next_seq = next_seq
        self._skip = 0  # upcoming sends the consumer already has (producer restarted behind)
        self._transmitted = next_seq  # every seq below this was written to some connection
        self._conn: socket.socket | None = None
        self._conn_fd = -1
        self._conn_peer = ""
        self._conn_mask = 0
        self._reader: fr.FrameReader | None = None
        self._out = _OutQueue()
        self._pending: dict[int, _Pending] = {}
        self._had_consumer = False
        self._lost_at: float | None = None
        self._lost_reason = ""
        self._consumer_closed = False
        self._consumer_generation = -1
        self._error: ProtocolError | None = None

        self._messages = 0
        self._bytes = 0
        self._peak = 0
        self._reconnects = 0
        self._connected_at = 0.0
        self._resent = 0
        self._rejected = 0
        self._refused_consumers = 0  # authenticated consumers refused (generation, window)
        self._last_refusal = ""

        if generation is None:
            try:
                generation = resolver.lookup(name, timeout=0).generation + 1
            except (RingTimeout, ConfigError):
                generation = 0
        self.generation = generation

        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
            listener.listen(_LISTEN_BACKLOG)
            listener.setblocking(False)
        except OSError as err:
            listener.close()
            raise ConfigError(
                f"ring {name!r}: cannot listen on {host}:{port}: {err}; choose another port "
                "(port=0 picks a free one)"
            ) from err
        self._listener = listener
        bound_host, bound_port = listener.getsockname()[:2]
        self.address = f"{bound_host}:{bound_port}"
        self._poller = select.poll()
        self._listener_fd = listener.fileno()
        self._poller.register(self._listener_fd, select.POLLIN)
        self._endpoint = Endpoint(TRANSPORT, self.address, generation)
        try:
            resolver.register(name, self._endpoint)
        except BaseException:
            listener.close()
            raise

    # ----------------------------------------------------------------- public API

    @property
    def next_seq(self) -> int:
        return self._next_seq - self._skip

    @property
    def acked(self) -> int:
        """Every seq below this is acknowledged; reading it takes in acks that have arrived
        (and pending reconnections) without waiting. Protocol errors found meanwhile are
        raised by the next send."""
        if not self._closed:
            self._service(0)
        return self._acked

    def service(self, timeout: float = 0.0) -> None:
        """Do this end's pending I/O without sending: accept a (re)connecting consumer and
        resend to it, read acks, write queued frames; wait up to ``timeout`` for activity.

        The end has no thread of its own, so a producer that has nothing to send for a while
        calls this (or reads ``acked``) from its idle loop; otherwise a consumer that
        reconnects meanwhile waits for the producer's next call.
        """
        self._check_open()
        self._service(timeout)
        self._raise_pending()

    def send(self, msg: bytes, timeout: float | None = None) -> None:
        check_message(self.name, msg, self.max_message)
        if self._send([msg], timeout) == 0:
            raise RingTimeout(
                f"ring {self.name!r}: window of {self.capacity} messages still full after "
                f"{timeout} s; the consumer is slow or stalled"
            )

    def send_nowait(self, msg: bytes) -> None:
        check_message(self.name, msg, self.max_message)
        if self._send([msg], 0) == 0:
            raise WouldBlock(
                f"ring {self.name!r}: window of {self.capacity} messages is full; retry later"
            )

    def send_burst(self, msgs: Sequence[bytes], timeout: float | None = 0) -> int:
        return self._send(msgs, timeout)

    def close(self) -> None:
        """Wait up to reconnect_timeout for everything to be acked, send CLOSE, then close.

        Never raises for the link: a consumer that does not come back simply sees a producer
        that is gone (RingBroken on its side).
        """
        if self._closed:
            return
        try:
            deadline = time.monotonic() + self.reconnect_timeout
            with contextlib.suppress(ProtocolError):
                while self._acked < self._next_seq and not self._consumer_closed:
                    now = time.monotonic()
                    if now >= deadline:
                        break
                    self._service(deadline - now)
            if self._conn is not None and not self._consumer_closed:
                self._out.append(fr.encode_close(self._next_seq))
                self._linger_flush(time.monotonic() + _FLUSH_LINGER)
        finally:
            self._teardown()

    def statistics(self) -> RingStatistics:
        return RingStatistics(
            name=self.name,
            transport=TRANSPORT,
            role="producer",
            capacity=self.capacity,
            messages=self._messages,
            bytes=self._bytes,
            occupancy=self._next_seq - self._acked,
            peak_occupancy=self._peak,
            reconnects=self._reconnects,
            connected_at=self._connected_at,
            reconnect_timeout=self.reconnect_timeout,
            resent=self._resent,
            next_seq=self._next_seq,
            acked=self._acked,
            extra={
                "address": self.address,
                "generation": self.generation,
                "connected": self._conn is not None,
                "peer": self._conn_peer,
                "rejected_connections": self._rejected,
                "refused_consumers": self._refused_consumers,
                "last_refusal": self._last_refusal,
                "authenticated": self._key is not None,
                "tls": self._tls is not None,
                "unwritten_bytes": self._out.nbytes,
                "consumer_closed": self._consumer_closed,
            },
        )

    def detach(self) -> None:
        """Leave without CLOSE: the consumer waits for a new producer instance."""
        if not self._closed:
            self._teardown()

    def _break_connection(self) -> None:
        """Testing hook: drop the consumer link as a crash would (RST, no CLOSE frame)."""
        if self._conn is not None:
            self._lose("connection broken by _break_connection()", abort=True)

    # ------------------------------------------------------------------ sending

    def _send(self, msgs: Sequence[bytes], timeout: float | None) -> int:
        self._check_open()
        self._service(0)
        self._raise_pending()
        if self._consumer_closed:
            self._raise_consumer_closed()
        if not msgs:
            return 0
        if self._skip:  # regenerated messages the consumer already has (see _read_pending)
            k = min(self._skip, len(msgs))
            self._skip -= k
            return k + (self._send(msgs[k:], timeout) if k < len(msgs) else 0)
        room = self.capacity - (self._next_seq - self._acked)
        if room <= 0:
            deadline = None if timeout is None else time.monotonic() + timeout
            room = self._wait_room(deadline)
            if room <= 0:
                return 0
        n = len(msgs)
        if n > room:
            msgs = list(itertools.islice(msgs, room))
            n = room
        limit = self.max_message
        if set(map(type, msgs)) == {bytes}:
            batch = msgs
        else:
            batch = []
            for m in msgs:
                check_message(self.name, m, limit)
                batch.append(m if type(m) is bytes else bytes(m))
        sizes = list(map(len, batch))
        if max(sizes) > limit:
            for m in batch:
                check_message(self.name, m, limit)
        total = sum(sizes)
        seq = self._next_seq
        self._retained.extend(batch)
        self._next_seq = seq + n
        self._messages += n
        self._bytes += total
        occupancy = self._next_seq - self._acked
        if occupancy > self._peak:
            self._peak = occupancy
        if self._conn is not None:
            if self._tls is None and not self._out and n <= fr.WRITE_MAX:
                self._write_direct(seq, batch, sizes, total)
            else:
                self._queue_frames(seq, batch, sizes)
                self._flush()
            self._transmitted = self._next_seq
        return n

    def _write_direct(self, seq: int, batch: Sequence[bytes], sizes: list[int], total: int) -> None:
        """A plain link with nothing queued ahead: one sendmsg of the frames, packed in C
        (frames.write_data), which saves the per-message Python of _queue_frames and the
        queue's own walk. What the socket does not take now is queued exactly as _flush
        would have left it."""
        try:
            sent = fr.write_data(self._conn_fd, seq, batch if type(batch) is list else list(batch))
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as err:
            self._lose(f"write to consumer {self._conn_peer} failed: {err.strerror or err}")
            return
        if sent < total + fr.HEADER_SIZE * len(sizes):
            self._queue_frames(seq, batch, sizes)
            self._out.drop(sent)
            self._set_mask(select.POLLIN | select.POLLOUT)

    def _queue_frames(
        self, seq: int, payloads: Sequence[bytes], sizes: Sequence[int] | None = None
    ) -> None:
        """Queue DATA frames for ``payloads`` (seq, seq+1, ...): a packed header and the
        payload itself per message, gathered by the kernel on write."""
        if sizes is None:
            sizes = list(map(len, payloads))
        pack = fr.HEADER.pack
        word = fr.DATA_WORD
        parts: list[bytes] = []
        append = parts.append
        for m, size in zip(payloads, sizes, strict=True):
            append(pack(word, seq, size))
            if size:
                append(m)
            seq += 1
        self._out.extend(parts, sum(sizes) + fr.HEADER_SIZE * len(sizes))

    def _wait_room(self, deadline: float | None) -> int:
        """Wait for window room; RingBroken if the consumer stays away too long."""
        while True:
            room = self.capacity - (self._next_seq - self._acked)
            if room > 0:
                return room
            if self._consumer_closed:
                self._raise_consumer_closed()
            now = time.monotonic()
            broken_at = None
            if self._conn is None and self._lost_at is not None:
                broken_at = self._lost_at + self.reconnect_timeout
                if now >= broken_at:
                    raise RingBroken(
                        f"ring {self.name!r}: consumer gone since {now - self._lost_at:.2f} s "
                        f"({self._lost_reason}) and did not reconnect within "
                        f"{self.reconnect_timeout} s; {self._next_seq - self._acked} messages "
                        "remain unacknowledged; restart the consumer or reopen the ring"
                    )
            if deadline is not None and now >= deadline:
                return 0
            wakes = [t for t in (deadline, broken_at, self._next_expiry()) if t is not None]
            wake = min(wakes) if wakes else None
            self._service(None if wake is None else wake - now)
            self._raise_pending()

    def _raise_consumer_closed(self) -> None:
        raise RingBroken(
            f"ring {self.name!r}: consumer closed the ring; "
            f"{self._next_seq - self._acked} messages were not acknowledged; "
            "open a new ring to a new consumer"
        )

    def _raise_pending(self) -> None:
        err = self._error
        if err is not None:
            self._error = None
            raise err

    # ------------------------------------------------------------------ I/O

    def _service(self, wait: float | None) -> None:
        """One poll(): accept connections, read HELLOs and acks, write queued frames."""
        for fd, ev in self._poller.poll(_poll_ms(wait)):
            if fd == self._conn_fd:
                if ev & _POLL_IN:
                    self._read_conn()
                if ev & select.POLLOUT and self._conn is not None:
                    self._flush()
            elif fd == self._listener_fd:
                self._accept()
            else:
                pending = self._pending.get(fd)
                if pending is not None:
                    self._read_pending(pending)
        if self._pending:
            self._expire_pending()

    def _next_expiry(self) -> float | None:
        if not self._pending:
            return None
        return min(p.since for p in self._pending.values()) + _HANDSHAKE_TIMEOUT

    def _accept(self) -> None:
        """Take every waiting connection, CHALLENGE it at once, and keep the pending table
        bounded. Nothing here raises: a connection that fails is closed and counted."""
        while True:
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. ECONNABORTED, EMFILE: the client retries
            peer = f"{addr[0]}:{addr[1]}"
            try:
                _tune(sock, self._sockbuf, self.reconnect_timeout)
                if self._tls is not None:  # the CHALLENGE waits for the TLS handshake
                    sock = _wrap_tls(sock, self._tls, server_side=True)
            except (OSError, ValueError):
                self._rejected += 1
                sock.close()
                continue
            pending = _Pending(sock, peer, time.monotonic())
            if self._tls is None and not self._challenge(pending):
                self._rejected += 1
                sock.close()
                continue
            self._pending[sock.fileno()] = pending
            self._poller.register(sock.fileno(), select.POLLIN)
            if len(self._pending) > _MAX_PENDING:
                oldest = min(self._pending.values(), key=lambda p: p.since)
                self._rejected += 1
                self._drop_pending(oldest)
            # A consumer without a key sends HELLO right behind connect(): take it now rather
            # than one call later, so it is served by the very call that accepted it. (With a
            # key the HELLO answers the CHALLENGE just sent: a later call serves it.)
            if self._key is None and pending.sock.fileno() in self._pending:
                self._read_pending(pending)

    def _challenge(self, p: _Pending) -> bool:
        """Send the CHALLENGE (a fresh socket takes 32 bytes at once, or the peer is gone)."""
        challenge = fr.encode_challenge(p.nonce)
        try:
            sent = p.sock.send(challenge)
        except OSError:
            sent = -1
        p.challenged = sent == len(challenge)
        return p.challenged

    def _expire_pending(self) -> None:
        """Close pending connections past the handshake timeout, without a word: an honest
        consumer that was slow to answer its CHALLENGE sees a closed link and reconnects."""
        limit = time.monotonic() - _HANDSHAKE_TIMEOUT
        for p in [p for p in self._pending.values() if p.since < limit]:
            self._rejected += 1
            self._drop_pending(p)

    def _drop_pending(self, p: _Pending, abort: bool = False) -> None:
        fd = p.sock.fileno()
        self._pending.pop(fd, None)
        with contextlib.suppress(KeyError, ValueError):
            self._poller.unregister(fd)
        if abort:
            _abort(p.sock)
        else:
            p.sock.close()

    def _reject(self, p: _Pending) -> None:
        """Refuse a peer that has not proved it is this ring's consumer: one generic text, so
        a stranger learns nothing (not the ring's name, window or next seq). Keep serving."""
        self._rejected += 1
        with contextlib.suppress(OSError):
            p.sock.send(fr.encode_error(fr.REFUSED_TEXT))
        self._drop_pending(p)

    def _refuse_consumer(self, p: _Pending, problem: str) -> None:
        """Refuse an authenticated consumer that cannot be served (older generation, a gap):
        a real bug of that peer, so it is told why; the producer itself carries on (the
        refusal is counted and kept in statistics, never raised here)."""
        self._rejected += 1
        self._refused_consumers += 1
        self._last_refusal = problem
        with contextlib.suppress(OSError):
            p.sock.send(fr.encode_error(f"ring {self.name!r}: {problem}"))
        self._drop_pending(p)

    def _read_pending(self, p: _Pending) -> None:
        """Read a pending connection's HELLO; adopt it only after the key (if any) is proved,
        and only then look at its generation and window. With TLS, first its handshake
        (a peer without a certificate of the cluster's CA ends here), then the CHALLENGE."""
        if not p.challenged:
            try:
                if not _tls_handshake(p.sock):  # type: ignore[arg-type]
                    return
            except OSError:  # ssl.SSLError too: not TLS, or not the cluster's CA
                self._rejected += 1
                self._drop_pending(p)
                return
            if not self._challenge(p):
                self._rejected += 1
                self._drop_pending(p)
                return
        try:
            n = p.reader.recv_from(p.sock)
        except _AGAIN:
            return
        except OSError:
            self._rejected += 1
            self._drop_pending(p)
            return
        if n == 0:
            self._rejected += 1
            self._drop_pending(p)
            return
        try:
            frame = p.reader.next_frame()
            if frame is None:
                return
            hello = fr.decode_hello(frame[2])
        except fr.FrameError:
            self._reject(p)
            return
        next_expected = frame[1]
        if hello.ring != self.name:
            self._reject(p)
            return
        key = self._key
        if key is not None:
            expected = fr.consumer_proof(
                key, self.name, p.nonce, hello.nonce, hello.generation, next_expected
            )
            if not fr.proof_matches(expected, hello.proof):
                self._reject(p)
                return
        # Authenticated (or a keyless ring): now the epoch and the window.
        generation = hello.generation
        if generation < self._consumer_generation:
            self._refuse_consumer(
                p,
                f"consumer generation {generation} from {p.peer} is older than the current "
                f"consumer's {self._consumer_generation}",
            )
            return
        if next_expected > self._next_seq and self._acked == self._next_seq:
            # This producer restarted from an older persisted point and will regenerate
            # messages the consumer already has: number on from the consumer's seq and drop
            # that many upcoming sends.
            self._skip += next_expected - self._next_seq
            self._acked = self._next_seq = self._transmitted = next_expected
        if not self._acked <= next_expected <= self._next_seq:
            self._refuse_consumer(
                p,
                f"consumer at {p.peer} expects seq {next_expected} but this producer retains "
                f"only {self._acked} .. {self._next_seq - 1} (next new seq {self._next_seq}): a "
                "gap that cannot be resent; restore the consumer from a checkpoint at or after "
                f"seq {self._acked}",
            )
            return
        self._adopt(p, hello, next_expected)

    def _adopt(self, p: _Pending, hello: fr.Hello, next_expected: int) -> None:
        """Make ``p`` the consumer link: WELCOME (with this end's proof of the key), then
        resend everything from next_expected."""
        generation = hello.generation
        self._pending.pop(p.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self._poller.unregister(p.sock.fileno())
        if self._conn is not None:
            self._lose("superseded by a new connection from the consumer", abort=True)
        self._connected_at = time.time()
        if self._had_consumer:
            self._reconnects += 1
        self._had_consumer = True
        self._lost_at = None
        self._consumer_closed = False
        self._consumer_generation = generation
        self._conn = p.sock
        self._conn_fd = p.sock.fileno()
        self._conn_peer = p.peer
        p.reader.set_allowed(_PRODUCER_ALLOWED)
        self._reader = p.reader
        self._conn_mask = 0
        self._out.clear()
        welcome = fr.Welcome(
            self.generation, self.capacity, self.max_message, self._next_seq, fr.NO_PROOF
        )
        key = self._key
        if key is not None:
            args = (key, self.name, p.nonce, hello.nonce, generation, next_expected)
            welcome = welcome._replace(proof=fr.producer_proof(*args, self._acked, welcome))
        self._out.append(fr.encode_welcome(self._acked, *welcome))
        start = next_expected - self._acked
        count = self._next_seq - next_expected
        if count:
            self._resent += max(0, min(self._transmitted, self._next_seq) - next_expected)
            chunk = 1024  # keep each joined buffer moderate
            for i in range(start, start + count, chunk):
                part = list(itertools.islice(self._retained, i, min(i + chunk, start + count)))
                self._queue_frames(self._acked + i, part)
        self._transmitted = self._next_seq
        self._set_mask(select.POLLIN)
        self._flush()
        # The consumer may have sent more right behind its HELLO.
        if self._conn is not None and self._reader.pending:
            self._parse_conn()

    def _set_mask(self, mask: int) -> None:
        if self._conn is None or mask == self._conn_mask:
            return
        if self._conn_mask:
            self._poller.modify(self._conn_fd, mask)
        else:
            self._poller.register(self._conn_fd, mask)
        self._conn_mask = mask

    def _flush(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            self._out.write(conn)
        except OSError as err:
            self._lose(f"write to consumer {self._conn_peer} failed: {err.strerror or err}")
            return
        self._set_mask(select.POLLIN | select.POLLOUT if self._out else select.POLLIN)

    def _read_conn(self) -> None:
        conn, reader = self._conn, self._reader
        if conn is None or reader is None:
            return
        for _ in range(_TLS_READS):
            try:
                n = reader.recv_from(conn)
            except _AGAIN:
                return
            except OSError as err:
                self._lose(f"consumer link {self._conn_peer} failed: {err.strerror or err}")
                return
            if n == 0:
                self._lose(f"consumer {self._conn_peer} closed the connection without CLOSE")
                return
            self._parse_conn()
            # TLS may hold decrypted bytes the kernel no longer shows poll(): read them now
            if self._conn is not conn or not isinstance(conn, ssl.SSLSocket) or not conn.pending():
                return

    def _parse_conn(self) -> None:
        reader = self._reader
        while self._conn is not None and reader is not None:
            try:
                frame = reader.next_frame()
            except fr.FrameError as err:
                self._protocol_failure(str(err))
                return
            if frame is None:
                return
            ftype, seq, _payload = frame
            if ftype == fr.ACK or ftype == fr.CLOSE:
                if not self._acked <= seq <= self._next_seq:
                    self._protocol_failure(
                        f"{fr.TYPE_NAMES[ftype]} {seq} outside the window "
                        f"{self._acked} .. {self._next_seq}"
                    )
                    return
                retained = self._retained
                for _ in range(seq - self._acked):
                    retained.popleft()
                self._acked = seq
                if ftype == fr.CLOSE:
                    self._consumer_closed = True
                    self._drop_conn(abort=False)
                    self._lost_at = None
                    return

    def _protocol_failure(self, problem: str) -> None:
        peer = self._conn_peer
        self._lose(f"protocol error: {problem}", abort=True)
        self._error = ProtocolError(
            f"ring {self.name!r}: consumer {peer} sent bad data: {problem}; the link was "
            "dropped and the consumer may reconnect"
        )

    def _drop_conn(self, abort: bool) -> None:
        conn = self._conn
        if conn is None:
            return
        if self._conn_mask:
            with contextlib.suppress(KeyError, ValueError):
                self._poller.unregister(self._conn_fd)
        if abort:
            _abort(conn)
        else:
            conn.close()
        self._conn = None
        self._conn_fd = -1
        self._conn_mask = 0
        self._reader = None
        self._out.clear()

    def _lose(self, reason: str, abort: bool = False) -> None:
        self._drop_conn(abort)
        self._lost_at = time.monotonic()
        self._lost_reason = reason

    def _linger_flush(self, deadline: float) -> None:
        """close(): hand the last frames to the kernel, then wait briefly for the consumer's
        EOF so that closing with unread input cannot turn into an RST that loses the CLOSE."""
        self._flush()
        while self._conn is not None and self._out:
            now = time.monotonic()
            if now >= deadline:
                return
            self._service(deadline - now)
        conn = self._conn
        if conn is None:
            return
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_WR)
        while self._conn is not None:
            now = time.monotonic()
            if now >= deadline:
                return
            self._service(deadline - now)  # reading EOF drops the link

    def _teardown(self) -> None:
        self._closed = True
        self._drop_conn(abort=False)
        for p in list(self._pending.values()):
            self._drop_pending(p)
        self._listener.close()
        with contextlib.suppress(Exception):
            if self._resolver.lookup(self.name, timeout=0) == self._endpoint:
                self._resolver.unregister(self.name)


class TcpReceiver(RingReceiver):
    """The consumer end: connects by name, delivers in order once, acks in batches."""

    transport = TRANSPORT

    def __init__(
        self,
        name: str,
        resolver: Resolver,
        auto_commit: bool,
        next_expected: int,
        reconnect_timeout: float,
        connect_timeout: float,
        max_message: int,
        generation: int,
        sockbuf: int | None,
        *,
        key: bytes | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        check_ring_name(name)
        self._key = _check_key(name, key)
        self._tls = _check_tls(name, tls, server_side=False)
        self._tls_done = True  # this connection's TLS handshake (True: none to do)
        if next_expected < 0:
            raise ConfigError(f"ring {name!r}: next_expected must be >= 0, got {next_expected}")
        self.name = name
        self._closed = False  # see RingEnd._closed
        self.capacity = DEFAULT_CAPACITY  # replaced by the producer's WELCOME
        self.auto_commit = auto_commit
        self.reconnect_timeout = reconnect_timeout
        self.connect_timeout = connect_timeout
        self.generation = generation
        self._max_message = max_message
        self._resolver = resolver
        self._sockbuf = sockbuf
        self.before_reconnect: Callable[[], None] | None = None

        self._queue: list[bytes] = []
        self._qhead = 0
        # Zero-copy receive: the live batch of views (into the reader's buffer, or of queued
        # bytes), and whether the reader must prove its buffer free before the next read.
        self._batch: ViewBatch | None = None
        self._reclaim = False
        self._lazy = False  # inside recv_views: DATA frames stay in the buffer (no copy)
        self._next_expected = next_expected  # delivered
        self._cursor = next_expected  # parsed (delivered + queued)
        self._committed = next_expected
        self._ack_sent = next_expected
        self._ack_every = max(1, self.capacity // _ACK_DIVISOR)
        self._ended = False

        self._sock: socket.socket | None = None
        self._peer = ""
        self._welcomed = False
        # This connection's handshake: the producer's CHALLENGE nonce, ours, and the HELLO
        # fields we sent (the producer's proof must cover exactly these).
        self._producer_nonce = b""
        self._nonce = b""
        self._hello_fields = (0, 0)
        self._sock_since = 0.0
        self._heard_at = 0.0  # monotonic time of the last bytes from the producer
        self._spin = _SPIN_MIN  # s of reading before a poll() sleep (see _spin_read)
        self._replaced_check_at = 0.0
        self._reader = fr.FrameReader(
            _HANDSHAKE_ALLOWED, max_message, size=_RECV_BUFFER, chunk=_RECV_CHUNK
        )
        self._out = _OutQueue()
        self._poller = select.poll()
        self._down_since: float | None = None
        self._down_reason = ""
        self._next_attempt = 0.0
        self._backoff = _BACKOFF_MIN
        self._producer_generation = -1
        self._tried_generation = -1  # generation of the endpoint last tried
        self._had_producer = False

        self._messages = 0
        self._bytes = 0
        self._peak = 0
        self._reconnects = 0
        self._connected_at = 0.0
        self._dups = 0

        resolver.lookup(name, timeout=connect_timeout)
        deadline = time.monotonic() + connect_timeout
        while True:
            self._down_since = None  # the bound here is connect_timeout, not reconnect_timeout
            self._connect()
            if self._sock is not None:
                break
            now = time.monotonic()
            if now >= deadline:
                raise RingBroken(
                    f"ring {name!r}: producer registered but unreachable for {connect_timeout} s "
                    f"({self._down_reason}); is the producing stage alive?"
                )
            self._await_producer(max(0.0, min(self._next_attempt, deadline) - now))
        self._down_since = None

    # ----------------------------------------------------------------- public API

    @property
    def next_expected(self) -> int:
        return self._next_expected

    def recv(self, timeout: float | None = None) -> bytes:
        got = self._recv(1, timeout)
        if not got:
            raise RingTimeout(f"ring {self.name!r}: no message within {timeout} s")
        return got[0]

    def recv_nowait(self) -> bytes:
        got = self._recv(1, 0)
        if not got:
            raise WouldBlock(f"ring {self.name!r}: no message available now; retry later")
        return got[0]

    def recv_burst(self, max_n: int, timeout: float | None = None) -> list[bytes]:
        if max_n < 1:
            raise ValueError(f"ring {self.name!r}: recv_burst needs max_n >= 1, got {max_n}")
        return self._recv(max_n, timeout)

    def recv_views(self, max_n: int, timeout: float | None = None) -> MessageViews:
        """Zero-copy burst (RingReceiver.recv_views): read-only views of the DATA payloads
        where recv_into() put them in the reader's buffer. Frames are cut lazily, at this
        call, so the bytes are never copied again; the next receive or commit releases the
        views and checks that nothing still shows the buffer before it reads into it."""
        if max_n < 1:
            raise ValueError(f"ring {self.name!r}: recv_views needs max_n >= 1, got {max_n}")
        self._check_open()
        self._expire("receive")
        self._auto_ack()
        first = self._next_expected
        views: list[memoryview] = []
        if self._qhead < len(self._queue):  # parsed earlier by the bytes API: views of those
            got = self._take_queued(max_n)
            batch = ViewBatch(self.name, first, list(map(memoryview, got)), sum(map(len, got)))
            self._batch = batch
            return batch
        deadline = None if timeout is None else time.monotonic() + timeout
        reader = self._reader
        self._lazy = True
        try:
            while True:
                if self._welcomed and reader.data_ready():
                    nbytes = self._take_views(views, max_n)
                    if views:
                        break
                    continue
                if reader.pending:
                    self._parse()  # control frames before the next DATA (CLOSE, PING, ...)
                    if self._welcomed and reader.data_ready():
                        continue
                if self._ended:
                    raise EndOfRing(
                        f"ring {self.name!r}: the producer closed the ring after seq "
                        f"{self._next_expected - 1}; every message was delivered"
                    )
                if not self._fill(deadline):
                    return ViewBatch(self.name, first, [], 0)
        finally:
            self._lazy = False
        n = len(views)
        self._next_expected += n
        self._messages += n
        self._bytes += nbytes
        batch = ViewBatch(self.name, first, views, nbytes)
        self._batch = batch
        self._reclaim = True
        return batch

    def _take_views(self, views: list[memoryview], max_n: int) -> int:
        """Cut up to max_n DATA frames at the parse position as views; returns their bytes."""
        try:
            self._cursor, dups, nbytes = self._reader.take_views(views, self._cursor, max_n)
        except fr.GapError as err:
            self._cursor, self._dups = err.cursor, self._dups + err.dups
            self._fail(str(err))
        except fr.FrameError as err:
            self._cursor = self._next_expected + len(views)
            self._fail(str(err))
        self._dups += dups
        return nbytes

    def _expire(self, what: str) -> None:
        """End the live batch of views before anything reads into the buffer again (every
        receive, commit); ViewsHeld while something still shows the buffer."""
        batch = self._batch
        if batch is not None:
            if not batch.expire():
                raise held_error(self.name, what)
            self._batch = None
        if self._reclaim:
            if not self._reader.reclaim():
                raise held_error(self.name, what)
            self._reclaim = False

    def commit(self, upto: int | None = None) -> None:
        """Acknowledge every seq below ``upto`` (default: all delivered) at once."""
        self._check_open()
        if self._batch is not None or self._reclaim:
            self._expire("commit")
        if upto is None:
            upto = self._next_expected
        elif upto > self._next_expected:
            raise ValueError(
                f"ring {self.name!r}: cannot commit up to {upto}, only {self._next_expected} "
                "messages were delivered"
            )
        if upto > self._committed:
            self._committed = upto
            self._send_ack(force=True)

    def detach(self) -> None:
        """Leave without CLOSE: the producer keeps the window for a new consumer instance."""
        if not self._closed:
            self._closed = True
            self._end_views()
            if self._sock is not None:
                self._drop_sock(abort=False)

    def _end_views(self) -> None:
        """Closing: release the live views (nothing will read into the buffer again)."""
        if self._batch is not None:
            self._batch.expire()
            self._batch = None

    def close(self) -> None:
        """Tell the producer we are leaving (CLOSE carries what was committed) and close."""
        if self._closed:
            return
        self._closed = True
        self._end_views()
        sock = self._sock
        if sock is None:
            return
        if self._welcomed and not self._ended:
            self._out.append(fr.encode_close(max(self._committed, self._ack_sent)))
            deadline = time.monotonic() + _FLUSH_LINGER
            with contextlib.suppress(OSError):
                while self._out and time.monotonic() < deadline:
                    self._out.write(sock)
                    if self._out:
                        select.select([], [sock], [], max(0.0, deadline - time.monotonic()))
        self._drop_sock(abort=False)

    def statistics(self) -> RingStatistics:
        return RingStatistics(
            name=self.name,
            transport=TRANSPORT,
            role="consumer",
            capacity=self.capacity,
            messages=self._messages,
            bytes=self._bytes,
            occupancy=len(self._queue) - self._qhead,
            peak_occupancy=self._peak,
            reconnects=self._reconnects,
            connected_at=self._connected_at,
            reconnect_timeout=self.reconnect_timeout,
            duplicates_dropped=self._dups,
            next_expected=self._next_expected,
            committed=self._committed,
            extra={
                "connected": self._sock is not None and self._welcomed,
                "peer": self._peer,
                "producer_generation": self._producer_generation,
                "acked_to_producer": self._ack_sent,
                "ended": self._ended,
                "tls": self._tls is not None,
            },
        )

    def _break_connection(self) -> None:
        """Testing hook: drop the link as a crash would (RST, no CLOSE frame)."""
        if self._sock is not None:
            self._lose("connection broken by _break_connection()", abort=True)

    # ------------------------------------------------------------------ receiving

    def _auto_ack(self) -> None:
        if self.auto_commit and self._next_expected > self._committed:
            self._committed = self._next_expected
            if self._committed - self._ack_sent >= self._ack_every:
                self._send_ack()

    def _take_queued(self, max_n: int) -> list[bytes]:
        head = self._qhead
        queue = self._queue
        got = queue[head : head + max_n]
        n = len(got)
        head += n
        if head == len(queue):
            queue.clear()
            head = 0
        self._qhead = head
        self._next_expected += n
        self._messages += n
        self._bytes += sum(map(len, got))
        return got

    def _recv(self, max_n: int, timeout: float | None) -> list[bytes]:
        self._check_open()
        if self._batch is not None or self._reclaim:
            self._expire("receive")
        self._auto_ack()
        if self._qhead == len(self._queue) and self._reader.pending:
            self._parse()  # frames recv_views left in the buffer
        if self._qhead == len(self._queue):
            deadline = None if timeout is None else time.monotonic() + timeout
            if not self._fill(deadline):
                return []
            if self._qhead == len(self._queue):
                raise EndOfRing(
                    f"ring {self.name!r}: the producer closed the ring after seq "
                    f"{self._next_expected - 1}; every message was delivered"
                )
        return self._take_queued(max_n)

    def _fill(self, deadline: float | None) -> bool:
        """Make the queue non-empty (True), or see the end of the ring (True, queue empty),
        or run out of time (False). Reconnects as needed; bounded by deadline and by the
        reconnect bound (RingBroken)."""
        while True:
            if self._ended:
                return True
            if self._sock is None:
                self._connect()
                if self._sock is None:
                    now = time.monotonic()
                    if deadline is not None and now >= deadline:
                        return False
                    wake = (
                        self._next_attempt
                        if deadline is None
                        else min(self._next_attempt, deadline)
                    )
                    self._await_producer(max(0.0, wake - now))
                    continue
            if self._read_once():
                return True
            if self._sock is None:
                continue
            self._send_ack(force=True)
            if self._welcomed and self._spin_read(deadline):
                return True
            if self._sock is None:
                continue
            now = time.monotonic()
            wake = deadline
            if not self._welcomed:
                limit = self._sock_since + max(self.reconnect_timeout, self.connect_timeout)
                if now >= limit:
                    self._lose(f"producer {self._peer} accepted but never sent WELCOME")
                    continue
                wake = limit if wake is None else min(wake, limit)
            if deadline is not None and now >= deadline:
                return False
            sock = self._sock
            if sock is None:
                continue
            mask = select.POLLIN | select.POLLOUT if self._out else select.POLLIN
            self._poller.modify(sock.fileno(), mask)
            events = self._poller.poll(_poll_ms(None if wake is None else wake - now))
            if events and self._out:
                self._write_out()
            if not events and self._welcomed:
                self._check_replaced()
            if self._welcomed:
                self._learn_spin(time.monotonic() - now)

    def _spin_read(self, deadline: float | None) -> bool:
        """Before sleeping in poll(), keep reading for up to the spin budget: a consumer
        asleep costs the producer a wake-up inside every write (loopback delivers in the
        writer's own system call), which halved what 128 KiB writes moved here (2.3 vs
        3.8 GB/s raw, measured side by side). True when something can be returned."""
        start = time.monotonic()
        stop = start + self._spin
        if deadline is not None and deadline < stop:
            stop = deadline
        for _ in range(_SPIN_READS):  # bounded in count as well as time
            if time.monotonic() >= stop:
                return False
            if self._read_once():
                self._spin = min(_SPIN_MAX, self._spin * 2)
                return True
            if self._sock is None:
                return False
        return False

    def _learn_spin(self, slept: float) -> None:
        """A poll() sleep that ended sooner than _SPIN_MAX would have been cheaper as a spin:
        cover it next time; a longer one was idle time: spin less."""
        if slept < _SPIN_MAX:
            self._spin = min(_SPIN_MAX, max(self._spin, 2 * slept))
        else:
            self._spin = max(_SPIN_MIN, self._spin / 2)

    def _check_replaced(self) -> None:
        """Silent producer: drop the link if the registry names a newer producer."""
        now = time.monotonic()
        if now - self._heard_at < _SILENT_CHECK_S or now < self._replaced_check_at:
            return
        self._replaced_check_at = now + _SILENT_CHECK_S
        try:
            endpoint = self._resolver.lookup(self.name, timeout=0)
        except DpmigrateError:
            return
        if endpoint.generation > self._producer_generation:
            self._lose(f"producer {self._peer} went silent and a newer producer (generation "
                       f"{endpoint.generation}) was registered")  # fmt: skip

    def _read_once(self) -> bool:
        """One non-blocking recv_into() and parse; True when something can be returned."""
        sock = self._sock
        if sock is None:
            return False
        if not self._tls_done and not self._advance_tls(sock):
            return False
        for _ in range(_TLS_READS):
            try:
                n = self._reader.recv_from(sock)
            except _AGAIN:
                return False
            except OSError as err:
                self._lose(f"link to producer {self._peer} failed: {err.strerror or err}")
                return False
            if n == 0:
                torn = " in the middle of a frame" if self._reader.pending else ""
                self._lose(f"producer {self._peer} closed the connection{torn} without CLOSE")
                return False
            self._heard_at = time.monotonic()
            self._parse()
            if self._qhead < len(self._queue) or self._ended:
                return True
            if self._lazy and self._welcomed and self._reader.data_ready():
                return True
            # TLS may hold decrypted bytes the kernel no longer shows poll(): read them now
            if self._sock is not sock or not isinstance(sock, ssl.SSLSocket) or not sock.pending():
                return False
        return False

    def _advance_tls(self, sock: socket.socket) -> bool:
        """One step of this connection's TLS handshake; True once done (then, keyless, the
        HELLO goes out: see _connect)."""
        try:
            done = _tls_handshake(sock)  # type: ignore[arg-type]
        except OSError as err:  # ssl.SSLError too
            self._lose(f"TLS with producer {self._peer} failed: {err}")
            return False
        if not done:
            return False
        self._tls_done = True
        if self._key is None:
            self._out.append(fr.encode_hello(self.name, self._cursor, self.generation))
            self._write_out()
        return self._sock is sock

    def _parse(self) -> None:
        reader = self._reader
        queue = self._queue
        while True:
            if self._lazy and self._welcomed and reader.at_data():
                return  # recv_views cuts DATA itself, as views
            if self._welcomed:
                try:
                    self._cursor, dups = reader.take_data(queue, self._cursor)
                except fr.GapError as err:
                    self._cursor, self._dups = err.cursor, self._dups + err.dups
                    self._fail(str(err))
                except fr.FrameError as err:
                    self._cursor = self._next_expected + len(queue) - self._qhead
                    self._fail(str(err))
                self._dups += dups
                occupancy = len(queue) - self._qhead
                if occupancy > self._peak:
                    self._peak = occupancy
            try:
                frame = reader.next_frame()
            except fr.FrameError as err:
                self._fail(str(err))
            if frame is None:
                return
            ftype, seq, payload = frame
            if ftype == fr.CHALLENGE:
                self._on_challenge(payload)
            elif ftype == fr.WELCOME:
                self._on_welcome(seq, payload)
            elif ftype == fr.CLOSE:
                if seq != self._cursor:
                    self._fail(
                        f"CLOSE after seq {seq - 1} but this consumer has received up to "
                        f"{self._cursor - 1}"
                    )
                self._ended = True
                self._drop_sock(abort=False)
                return
            elif ftype == fr.ERROR:
                text = fr.decode_error(payload)
                peer = self._peer
                self._lose(f"producer refused: {text}", abort=True)
                hint = ""
                if text == fr.REFUSED_TEXT:
                    hint = (
                        "; a producer refuses a consumer that does not prove the ring "
                        "credential: both ends need the same ring credential (key)"
                        if self._key is not None
                        else "; this consumer has no ring credential (key=None) and the "
                        "producer may require one: both ends need the same ring credential"
                    )
                raise ProtocolError(
                    f"ring {self.name!r}: producer {peer} refused this consumer: {text}{hint}"
                )
            # PING: nothing to do

    def _on_challenge(self, payload: bytes) -> None:
        """With a key, answer the producer's CHALLENGE with HELLO: our nonce, and our proof of
        the key bound to both nonces and to the generation and next_expected we claim.
        Without a key the HELLO already went out at connect; the CHALLENGE is only read."""
        try:
            producer_nonce = fr.decode_challenge(payload)
        except fr.FrameError as err:
            self._fail(str(err))
        self._reader.set_allowed(_HANDSHAKE_ALLOWED)
        if self._key is None:
            return
        nonce = os.urandom(fr.NONCE_SIZE)
        fields = (self.generation, self._cursor)
        proof = fr.consumer_proof(self._key, self.name, producer_nonce, nonce, *fields)
        self._producer_nonce, self._nonce, self._hello_fields = producer_nonce, nonce, fields
        self._out.append(fr.encode_hello(self.name, self._cursor, self.generation, nonce, proof))
        self._write_out()

    def _on_welcome(self, first_retained: int, payload: bytes) -> None:
        try:
            welcome = fr.decode_welcome(payload)
        except fr.FrameError as err:
            self._fail(str(err))
        if self._key is not None:
            expected = fr.producer_proof(
                self._key, self.name, self._producer_nonce, self._nonce, *self._hello_fields,
                first_retained, welcome,
            )  # fmt: skip
            if not fr.proof_matches(expected, welcome.proof):
                peer = self._peer
                self._lose("the producer did not prove the ring credential", abort=True)
                raise ProtocolError(
                    f"ring {self.name!r}: the peer at {peer} could not prove it holds this "
                    "ring's credential, so this consumer refused it (is a stranger listening at "
                    "the registered address, or was one end given another key?); both ends "
                    "need the same ring credential (key); the consumer will reconnect"
                )
        generation, capacity, max_message, next_seq = welcome[:4]
        if not first_retained <= self._cursor <= next_seq:
            self._fail(
                f"WELCOME says the producer retains {first_retained} .. {next_seq - 1} but this "
                f"consumer expects seq {self._cursor}: a gap that cannot be resent"
            )
        if max_message > self._max_message:
            self._fail(
                f"the producer allows messages of up to {max_message} bytes, above this "
                f"consumer's max_message={self._max_message}; open the receiver with "
                f"max_message={max_message}"
            )
        if generation < self._producer_generation:
            self._lose(
                f"stale producer at {self._peer}: generation {generation} is older than "
                f"{self._producer_generation}"
            )
            return
        self._producer_generation = generation
        self.capacity = capacity
        self._ack_every = max(1, capacity // _ACK_DIVISOR)
        self._reader.set_data_limit(max_message)
        self._reader.set_allowed(_CONSUMER_ALLOWED)
        self._welcomed = True
        self._connected_at = time.time()
        if self._had_producer:
            self._reconnects += 1
        self._had_producer = True
        self._down_since = None
        self._backoff = _BACKOFF_MIN
        self._ack_sent = first_retained
        self._send_ack(force=True)

    def _fail(self, problem: str) -> NoReturn:
        """Malformed input: drop the link (the next call reconnects) and raise."""
        peer = self._peer
        self._lose(f"protocol error: {problem}", abort=True)
        raise ProtocolError(
            f"ring {self.name!r}: producer {peer} sent bad data: {problem}; the link was "
            "dropped and will be re-established on the next call"
        )

    # ------------------------------------------------------------------ acks and links

    def _send_ack(self, force: bool = False) -> None:
        if self._committed <= self._ack_sent or not self._welcomed or self._sock is None:
            return
        if not force and self._committed - self._ack_sent < self._ack_every:
            return
        self._out.append(fr.encode_ack(self._committed))
        self._ack_sent = self._committed
        self._write_out()

    def _write_out(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            self._out.write(sock)
        except OSError as err:
            self._lose(f"write to producer {self._peer} failed: {err.strerror or err}")

    def _await_producer(self, pause: float) -> None:
        """Between two connection attempts: wait for the registry to name a producer end
        newer than the one that failed, and try it at once when it does."""
        if pause <= 0:
            return
        try:
            newer = self._resolver.wait_newer(self.name, self._tried_generation, pause)
        except DpmigrateError:
            time.sleep(pause)  # the registry itself is away: plain back-off
            return
        if newer is not None:
            self._next_attempt = 0.0
            self._backoff = _BACKOFF_MIN

    def _connect(self) -> None:
        """One connection attempt if the back-off allows; RingBroken past the bound."""
        now = time.monotonic()
        if self._down_since is not None and now - self._down_since > self.reconnect_timeout:
            raise RingBroken(
                f"ring {self.name!r}: lost the producer {now - self._down_since:.2f} s ago "
                f"({self._down_reason}) and could not reconnect within {self.reconnect_timeout} "
                f"s; {self._next_expected} messages were delivered; is the producer alive?"
            )
        if now < self._next_attempt:
            return
        if self._had_producer and self.before_reconnect is not None:
            self.before_reconnect()  # may raise: then this end connects nowhere
        sock = None
        try:
            endpoint = self._resolver.lookup(self.name, timeout=0)
            self._tried_generation = endpoint.generation
            if endpoint.transport != TRANSPORT:
                raise ConfigError(
                    f"ring {self.name!r} is now served over {endpoint.transport!r}, not tcp"
                )
            host, port = _parse_address(self.name, endpoint.address)
            wait = max(0.05, min(1.0, self.reconnect_timeout))
            sock = socket.create_connection((host, port), timeout=wait)
            if self._key is None and self._tls is None:  # HELLO at once (see _on_challenge)
                sock.sendall(fr.encode_hello(self.name, self._cursor, self.generation))
            _tune(sock, self._sockbuf, self.reconnect_timeout)
            if self._tls is not None:  # handshake driven by the receive loop (_advance_tls)
                sock = _wrap_tls(sock, self._tls, server_side=False)
                self._tls_done = False
                with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    sock.do_handshake()  # the ClientHello leaves now
        except (RingTimeout, ConfigError, OSError) as err:
            if sock is not None:
                sock.close()
            self._down_reason = f"connect failed: {err}"
            if self._down_since is None:
                self._down_since = now
            self._next_attempt = now + self._backoff
            self._backoff = min(_BACKOFF_MAX, self._backoff * 2)
            return
        self._sock = sock
        self._peer = f"{host}:{port}"
        self._sock_since = now
        self._heard_at = now
        self._welcomed = False
        self._reader.set_allowed(_CHALLENGE_ALLOWED)  # HELLO goes out in answer to it
        self._poller.register(sock.fileno(), select.POLLIN)

    def _drop_sock(self, abort: bool) -> None:
        sock = self._sock
        if sock is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._poller.unregister(sock.fileno())
        if abort:
            _abort(sock)
        else:
            sock.close()
        self._sock = None
        self._welcomed = False
        self._out.clear()
        self._reader.start = self._reader.end = 0

    def _lose(self, reason: str, abort: bool = False) -> None:
        self._drop_sock(abort)
        self._down_reason = reason
        if self._down_since is None:
            self._down_since = time.monotonic()
        self._next_attempt = 0.0


def tls_context(ca: str, cert: str, key: str, *, server_side: bool) -> ssl.SSLContext:
    """A ring end's TLS context: TLS 1.3 only, the peer's certificate verified against the
    cluster's CA on both sides (mutual). Host names are not checked: ring addresses move
    with their stages, and a certificate of the cluster's CA is what a member proves; the
    ring key then proves it is this ring's end."""
    ctx = _verifying_context(server_side)
    try:
        ctx.load_verify_locations(cafile=ca)
        ctx.load_cert_chain(certfile=cert, keyfile=key)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(
            f"ring TLS: cannot load the CA {ca}, certificate {cert} or key {key}: {err}; "
            "`dpmigrate cluster up` writes them (ring_tls setting)"
        ) from err
    return ctx


def tls_context_from_pem(ca: str, cert: str, key: str, *, server_side: bool) -> ssl.SSLContext:
    """The same context from PEM text (a stage gets it from its agent): the certificate and
    key go through an anonymous memory file, never a file a checkpoint or another user
    could read."""
    ctx = _verifying_context(server_side)
    fd = os.memfd_create("dpmigrate-ring-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, (cert.rstrip() + "\n" + key.rstrip() + "\n").encode())
        ctx.load_verify_locations(cadata=ca)
        ctx.load_cert_chain(certfile=f"/proc/self/fd/{fd}")
    except (OSError, ssl.SSLError, ValueError) as err:
        raise ConfigError(
            f"ring TLS: the agent's CA, certificate or key is unusable: {err}"
        ) from err
    finally:
        os.close(fd)
    return ctx


def _verifying_context(server_side: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if not server_side:
        ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def open_sender(
    name: str,
    *,
    resolver: Resolver,
    capacity: int = DEFAULT_CAPACITY,
    max_message: int = MAX_MESSAGE,
    reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
    **opts: Any,
) -> TcpSender:
    """Listen on ``host:port`` (default 127.0.0.1, a free port) and register the ring.

    Options: ``host``, ``port``, ``generation`` (default: the registered one + 1, else 0),
    ``sockbuf`` (fixed SO_SNDBUF/SO_RCVBUF in bytes; default: kernel autotuning),
    ``next_seq`` (seq of the first message, for a producer resumed from a persisted point),
    ``key`` (``bytes | None``: the ring credential, at least 32 bytes; a consumer is adopted
    only after it proves the same key, see :mod:`~dpmigrate.transports.frames`; None, the
    default, leaves the ring unauthenticated, for library use only: the runtime always
    passes the key the agents derived for the ring), ``tls`` (``ssl.SSLContext | None``:
    TLS on the link, for networks you do not trust; the context must verify the peer, see
    :func:`tls_context`). Does not wait for a consumer.
    """
    o = _split_opts(
        name,
        opts,
        {"host": "127.0.0.1", "port": 0, "generation": None, "sockbuf": None, "next_seq": 0,
         "key": None, "tls": None},
    )  # fmt: skip
    return TcpSender(
        name,
        resolver,
        capacity,
        max_message,
        reconnect_timeout,
        o["host"],
        o["port"],
        o["generation"],
        o["sockbuf"],
        int(o["next_seq"]),
        key=o["key"],
        tls=o["tls"],
    )


def open_receiver(
    name: str,
    *,
    resolver: Resolver,
    auto_commit: bool = True,
    next_expected: int = 0,
    reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
    connect_timeout: float = 10.0,
    **opts: Any,
) -> TcpReceiver:
    """Resolve ``name`` (waiting up to connect_timeout), connect and say HELLO.

    Options: ``max_message`` (largest DATA accepted before the producer's WELCOME says its
    own), ``generation`` (this consumer's generation, default 0), ``sockbuf``,
    ``before_reconnect`` (called before each new connection after the first: an owner that
    may have been replaced while it was paused checks here, and raises, before it connects),
    ``key`` (``bytes | None``: the ring credential; with it, DATA is taken only from a
    producer that proves the same key; None: unauthenticated, library use only), ``tls``
    (as for the producer; both ends must use it).
    Does not wait for the producer's CHALLENGE and WELCOME: the handshake completes inside
    the first recv call.
    """
    known = {"max_message": MAX_MESSAGE, "generation": 0, "sockbuf": None,
             "before_reconnect": None, "key": None, "tls": None}  # fmt: skip
    o = _split_opts(name, opts, known)
    receiver = TcpReceiver(
        name,
        resolver,
        auto_commit,
        next_expected,
        reconnect_timeout,
        connect_timeout,
        o["max_message"],
        o["generation"],
        o["sockbuf"],
        key=o["key"],
        tls=o["tls"],
    )
    receiver.before_reconnect = o["before_reconnect"]
    return receiver


__all__ = [
    "TRANSPORT",
    "TcpReceiver",
    "TcpSender",
    "open_receiver",
    "open_sender",
    "tls_context",
    "tls_context_from_pem",
]
