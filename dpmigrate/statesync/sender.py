"""The primary side of state synchronization: ships a stage's State to its replicas.

The stage's own thread calls :meth:`StateSender.publish` after every commit (and
:meth:`~StateSender.poll` when idle); everything else happens on the sender's threads: one
accepts connections, and one per connection authenticates the peer and then serves it. Those
threads never touch the live State: what they send is either a pre-encoded POINT frame from
the *backlog* (the last ``backlog_bytes`` of published points, shared by all replicas) or a
*snapshot*, a shallow copy of the committed dict taken by the stage's thread at a published
point. Values are never changed in place (the State contract), so the copy stays exactly at
its point while the stage runs on, and costs pointers, not bytes.

Per replica, a HELLO (or a NACK) says what the replica holds, and the connection's thread
picks the cheapest way to bring it to the head (:meth:`_Link._plan`):

* a snapshot in progress that the sender still holds: resume it at the next item;
* a point of this primary's history (same n *and* version) that the backlog still follows,
  or one ahead of the head (this primary restarted from an older journal point and
  regenerates the same points; if it does not, the first delta is a gap): stream the points
  after it;
* otherwise: a snapshot (reusing the one held if the backlog follows its point), then
  stream. A NACK for a gap always gets a snapshot (the histories differ); a NACK for a
  damaged frame gets the same data again from what the replica holds.

Flow control is by bytes: at most ``window_bytes`` of frames are unacknowledged per replica
(one frame larger than the window goes alone). Memory is bounded whatever the state's size:
the backlog by ``backlog_bytes``, each connection's queue by the window, one snapshot chunk
by about ``2 * chunk_bytes``; the snapshot is never packed as a whole.

Nothing a peer sends can reach the State or another replica: a stranger's bytes end its own
connection (with an ERROR frame when the framing allows), at most ``max_pending``
connections may be unauthenticated at a time, each for at most ``handshake_timeout``.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import math
import os
import secrets
import select
import socket
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, NamedTuple

import msgpack

from dpmigrate.errors import ConfigError, DpmigrateError, ProtocolError
from dpmigrate.statesync import wire
from dpmigrate.statesync.point import Point
from dpmigrate.statesync.state import State

_LISTEN_BACKLOG = 16
_MAX_REPLICAS = 64  # distinct replica nodes remembered by one sender
_POLL_IN = select.POLLIN | select.POLLHUP | select.POLLERR
_FIRST_GUESS = 16  # items in the first chunk of a snapshot (then adapted to the sizes seen)
_JOIN_TIMEOUT = 10.0
_HEAD_EVERY = 0.05  # at most this often a HEAD frame while the replica is behind
_SAFE_EVERY = 0.002  # at most this often a HEAD frame that only moves the safe mark
_HEAD_SIZE = 512  # room that a small control frame (HEAD, SNAP_BEGIN) needs at most
_ZERO_COPY_MIN = 4096  # bytes values at least this large are sent without being copied


def _noop_log(event: str, /, **fields: Any) -> None:
    return None


def _poll_ms(wait: float | None) -> int | None:
    """poll() takes milliseconds; round up so a short wait never becomes a busy spin."""
    if wait is None:
        return None
    return 0 if wait <= 0 else math.ceil(wait * 1000)


class SnapshotError(DpmigrateError):
    """A snapshot cannot be shipped (a value too large for one frame, or not serialisable)."""


class _Entry(NamedTuple):
    """One published point in the backlog, already encoded as a POINT frame."""

    n: int
    version: int
    seq: int
    at: float
    parts: list[bytes | memoryview]
    nbytes: int


class _Snapshot:
    """A shallow copy of the committed data at one published point."""

    def __init__(self, point: Point, seq: int, data: dict[str, Any]) -> None:
        self.id = secrets.randbits(62) + 1
        self.point = point
        self.n = point.n
        self.seq = seq
        self.data = data
        self.items = len(data)
        self.valid = True  # False once the backlog no longer covers the points after it


class _Replica:
    """What the sender knows about one replica node, kept across its reconnections."""

    def __init__(self, node: str, role: str) -> None:
        self.node = node
        self.role = role
        self.link: _Link | None = None
        self.peer = ""
        self.acked_n: int | None = None
        self.acked_version: int | None = None
        self.acked_seq: int | None = None
        self.acked_at = 0.0
        self.partial_snap: int | None = None  # snapshot id it holds a part of (last ack)
        self.sent_chunk_max: tuple[int, int] = (0, -1)  # (snapshot id, highest chunk sent)
        self.sent_point_max = -1  # highest point n ever sent to it
        self.connections = 0
        self.snapshots_sent = 0
        self.snapshot_resumes = 0
        self.resyncs = 0
        self.resent_chunks = 0
        self.resent_points = 0
        self.gaps = 0
        self.crc_nacks = 0
        self.bytes_sent = 0
        self.inflight_high_water = 0
        self.max_frame_bytes = 0
        self.last_error = ""


class _Chunker:
    """Cuts a snapshot's items, from an item offset on, into msgpack maps of about
    ``chunk_bytes``. The number of items per chunk adapts to the sizes seen, and a slice that
    came out above twice the target is split again; see :meth:`_pack` for how few copies a
    chunk costs."""

    def __init__(self, data: dict[str, Any], first: int, chunk_bytes: int) -> None:
        self._it = itertools.islice(iter(data.items()), first, None)
        self._carry: list[tuple[str, Any]] = []
        self._k = _FIRST_GUESS
        self._target = chunk_bytes
        self._limit = min(2 * chunk_bytes, wire.MAX_PAYLOAD)

    def next(self) -> tuple[int, list[bytes | memoryview], int] | None:
        """(item count, the packed map as buffers, its size) of the next chunk, or None when
        all items are out."""
        k = self._k
        if self._carry:
            part, self._carry = self._carry[:k], self._carry[k:]
            if len(part) < k:
                part.extend(itertools.islice(self._it, k - len(part)))
        else:
            part = list(itertools.islice(self._it, k))
        if not part:
            return None
        self._cut_at_target(part)
        while True:
            body, size = self._pack(part)
            if size <= self._limit or len(part) == 1:
                break
            cut = max(1, len(part) * self._target // size)
            self._carry[:0] = part[cut:]
            del part[cut:]
        if size > wire.MAX_PAYLOAD:
            raise SnapshotError(
                f"state key {part[0][0]!r} holds {size} bytes, more than one frame carries "
                f"({wire.MAX_PAYLOAD}); split it into smaller values"
            )
        self._k = max(1, min(1 << 20, round(len(part) * self._target / max(size, 1))))
        return len(part), body, size

    def _cut_at_target(self, part: list[tuple[str, Any]]) -> None:
        """Carry over the items past ``chunk_bytes`` of string and bytes values, before
        anything is packed: after a run of small items the guess ``k`` is large, and packing
        k large values first (to cut the chunk afterwards) held the GIL for most of a second
        with a GiB of state, starving the stage's own thread."""
        total, target = 0, self._target
        for i, (_key, value) in enumerate(part):
            if type(value) in (bytes, str, bytearray):
                total += len(value)
                if total > target and i > 0:
                    self._carry[:0] = part[i:]
                    del part[i:]
                    return

    @staticmethod
    def _pack(part: list[tuple[str, Any]]) -> tuple[list[bytes | memoryview], int]:
        """The items as one msgpack map, in buffers for a gathering send.

        Large ``bytes`` values are not copied at all: only the map header, the keys and the
        values' bin headers are packed, and the values themselves go to the kernel as they
        are (they are immutable). Other items are packed in one C call per run.
        """
        try:
            first = part[0][1]
            if type(first) is not bytes or len(first) < _ZERO_COPY_MIN:
                # autoreset=False + getbuffer(): no second copy into a bytes object; the view
                # keeps this packer (its only user) alive until written
                packer = msgpack.Packer(use_bin_type=True, autoreset=False)
                packer.pack_map_pairs(part)
                view = packer.getbuffer()
                return [view], len(view)
            packer = msgpack.Packer(use_bin_type=True)
            head = bytearray(packer.pack_map_header(len(part)))
            out: list[bytes | memoryview] = []
            size = 0
            for key, value in part:
                head += packer.pack(key)
                if type(value) is bytes and len(value) >= _ZERO_COPY_MIN:
                    head += _bin_header(len(value))
                    out.append(bytes(head))
                    out.append(value)
                    size += len(head) + len(value)
                    head.clear()
                else:
                    head += packer.pack(value)
            if head:
                out.append(bytes(head))
                size += len(head)
            return out, size
        except (TypeError, ValueError, OverflowError) as err:
            raise SnapshotError(f"a state value cannot be serialised: {err}") from err


def _bin_header(n: int) -> bytes:
    """The msgpack bin 8/16/32 header of an n-byte value (as Packer(use_bin_type) writes)."""
    if n < 1 << 8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


class StateSender:
    """Primary side: listens; one thread accepts, one thread per replica connection."""

    def __init__(
        self,
        stage: str,
        token: str,
        state: State,
        start: Point,
        *,
        host: str = "127.0.0.1",
        window_bytes: int = 16 << 20,
        backlog_bytes: int = 64 << 20,
        chunk_bytes: int = 1 << 20,
        log: Callable[..., object] | None = None,
        port: int = 0,
        handshake_timeout: float = 5.0,
        max_pending: int = 8,
        heartbeat_s: float = 1.0,
        dead_after_s: float = 10.0,
        marks_safe: bool = False,
    ) -> None:
        """``marks_safe``: this primary's outputs go to rings, and it calls :meth:`mark_safe`
        as downstream acknowledges them; its replicas then apply a point only once it is
        marked (the module docstring of :mod:`~dpmigrate.statesync.wire` says why)."""
        try:
            wire.check_name("stage", stage)
        except ProtocolError as err:
            raise ConfigError(f"StateSender: {err}") from err
        if not token:
            raise ConfigError("StateSender needs the cluster token (DPMIGRATE_TOKEN)")
        if window_bytes < 4096:
            raise ConfigError(f"stage {stage}: window_bytes {window_bytes} must be >= 4096")
        if not 4096 <= chunk_bytes <= wire.MAX_PAYLOAD // 2:
            raise ConfigError(
                f"stage {stage}: chunk_bytes {chunk_bytes} must be 4096 .. {wire.MAX_PAYLOAD // 2}"
            )
        if backlog_bytes < 0 or max_pending < 1 or handshake_timeout <= 0 or heartbeat_s <= 0:
            raise ConfigError(
                f"stage {stage}: backlog_bytes >= 0, max_pending >= 1, handshake_timeout > 0 "
                "and heartbeat_s > 0 are required"
            )
        if state.version != start.version:
            raise ConfigError(
                f"stage {stage}: the state is at version {state.version} but the start point "
                f"at version {start.version}; pass the point the state is at"
            )
        self.stage = stage
        self._token = token
        self.window_bytes = window_bytes
        self.backlog_bytes = backlog_bytes
        self.chunk_bytes = chunk_bytes
        self.handshake_timeout = handshake_timeout
        self.max_pending = max_pending
        self.heartbeat_s = heartbeat_s
        self.dead_after_s = dead_after_s
        self._log = log or _noop_log

        self._lock = threading.Lock()
        self._acked_cond = threading.Condition(self._lock)
        self._head = start
        self._head_seq = 0
        #: The newest point whose outputs downstream acknowledged (None: points are not
        #: marked, a replica applies each at once). The start point's outputs are: a primary
        #: starts from a persisted point, or a replica's safe one.
        self._safe_n: int | None = start.n if marks_safe else None
        self._entries: list[_Entry | None] = []
        self._ns: list[int] = []
        self._first = 0  # index of the oldest retained entry
        self._retained_bytes = 0
        # (n, seq, at, version) of the newest point no longer retained (at first: the start)
        self._floor = (start.n, 0, start.at, start.version)
        self._snapshot: _Snapshot | None = None
        self._snapshot_wanted = False
        self._replicas: dict[str, _Replica] = {}
        self._links: set[_Link] = set()
        self._threads: list[threading.Thread] = []  # every connection thread not yet joined
        self._pending = 0
        self._closing = False
        self._closed = False
        self._rejected = 0
        self._dropped_publishes = 0
        self._snapshots_taken = 0
        self._stuck_threads: list[str] = []

        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
            listener.listen(_LISTEN_BACKLOG)
            listener.setblocking(False)
        except OSError as err:
            listener.close()
            raise ConfigError(
                f"stage {stage}: cannot listen for replicas on {host}:{port}: {err}; choose "
                "another address (port 0 picks a free one)"
            ) from err
        self._listener = listener
        self._address: tuple[str, int] = listener.getsockname()[:2]
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"statesync-accept:{stage}", daemon=True
        )
        self._acceptor.start()
        self._log("statesync.listening", level="info", stage=stage, address=list(self._address))

    # ------------------------------------------------------------------ public API

    @property
    def address(self) -> tuple[str, int]:
        return self._address

    def publish(self, point: Point, state: State) -> None:
        """Called by the stage's own thread right after each commit (state is exactly at
        ``point``). Encodes the point once for every replica (cost: the delta's size); takes
        the snapshot a replica waits for, if any (cost: one dict copy of pointers). A point
        whose n does not exceed the head's is dropped (and counted)."""
        if state.version != point.version:
            raise ConfigError(
                f"stage {self.stage}: publish of a point at version {point.version} with the "
                f"state at version {state.version}; publish right after commit()"
            )
        n = point.n
        with self._lock:
            if self._closing:
                return
            if n <= self._head.n:
                self._dropped_publishes += 1
                self._log(
                    "statesync.publish_dropped",
                    level="debug",
                    stage=self.stage,
                    n=n,
                    head=self._head.n,
                )
                return
            seq = self._head_seq + 1
        try:
            parts: list[bytes | memoryview] | None = wire.encode_point(point, seq)
        except ProtocolError as err:
            # A delta larger than one frame: it cannot be streamed, so the backlog restarts
            # after it and a replica behind it re-syncs from a snapshot (cut into chunks).
            parts = None
            self._log(
                "statesync.point_not_streamed",
                level="warning",
                stage=self.stage,
                n=n,
                error=str(err),
                next="replicas behind this point re-sync from a snapshot",
            )
        data = state.committed_copy() if self._snapshot_wanted else None
        with self._lock:
            if parts is None:
                self._drop_retained(upto=len(self._entries))
                self._floor = (n, seq, point.at, point.version)
            else:
                size = wire.frame_size(parts)
                self._entries.append(_Entry(n, point.version, seq, point.at, parts, size))
                self._ns.append(n)
                self._retained_bytes += self._entries[-1].nbytes  # type: ignore[union-attr]
            self._head = point
            self._head_seq = seq
            self._trim()
            if data is not None:
                self._install_snapshot(data)
            for link in self._links:
                if link.sleeping:
                    link.wake()

    def mark_safe(self, n: int) -> None:
        """Called by the stage's thread: every output of the points up to ``n`` has been
        acknowledged downstream. Ignored unless the sender was made with ``marks_safe``."""
        with self._lock:
            if self._safe_n is None or n <= self._safe_n or self._closing:
                return
            self._safe_n = n
            for link in self._links:
                if link.sleeping:
                    link.wake()

    def poll(self, state: State) -> None:
        """Called by the stage's thread when idle (no commit): serve a pending snapshot
        request at the last published point."""
        if not self._snapshot_wanted or self._closing:
            return
        if state.version != self._head.version:
            raise ConfigError(
                f"stage {self.stage}: poll() with the state at version {state.version} but the "
                f"last published point at version {self._head.version}; publish every commit"
            )
        data = state.committed_copy()
        with self._lock:
            if self._snapshot_wanted and not self._closing:
                self._install_snapshot(data)

    def acked(self, node: str) -> int | None:
        """Point number (Point.n) the replica on ``node`` last acknowledged as applied, kept
        across its reconnects; None if never."""
        with self._lock:
            rec = self._replicas.get(node)
            return None if rec is None else rec.acked_n

    def wait_acked(self, node: str, n: int, timeout: float) -> bool:
        """Wait until the replica on ``node`` acknowledged a point >= ``n``; False on timeout."""

        def done() -> bool:
            rec = self._replicas.get(node)
            return rec is not None and rec.acked_n is not None and rec.acked_n >= n

        with self._acked_cond:
            return self._acked_cond.wait_for(done, timeout)

    def replicas(self) -> list[dict[str, Any]]:
        """One dict per replica ever seen (see the keys below). ``lag_points`` counts the
        points published after the acknowledged one (None before any ack), ``lag_s`` is the
        primary-clock time between the head's commit and the acknowledged point's (0 when
        caught up)."""
        with self._lock:
            head_n, head_seq, head_at = self._head.n, self._head_seq, self._head.at
            out = []
            for rec in self._replicas.values():
                link = rec.link
                if link is None:
                    phase = "disconnected"
                elif link.mode in ("snapshot", "await_snapshot"):
                    phase = "snapshot"
                else:
                    phase = "streaming"
                if rec.acked_n is None or rec.acked_seq is None:
                    lag_points: int | None = None
                    lag_s: float | None = None
                elif rec.acked_n >= head_n:
                    lag_points, lag_s = 0, 0.0
                else:
                    lag_points = max(0, head_seq - rec.acked_seq)
                    lag_s = max(0.0, head_at - rec.acked_at) if lag_points else 0.0
                out.append(
                    {
                        "node": rec.node,
                        "role": rec.role,
                        "connected": link is not None,
                        "peer": rec.peer,
                        "phase": phase,
                        "acked_n": rec.acked_n,
                        "acked_version": rec.acked_version,
                        "lag_points": lag_points,
                        "lag_s": lag_s,
                        "snapshots_sent": rec.snapshots_sent,
                        "snapshot_resumes": rec.snapshot_resumes,
                        "resyncs": rec.resyncs,
                        "resent_chunks": rec.resent_chunks,
                        "resent_points": rec.resent_points,
                        "gaps": rec.gaps,
                        "crc_nacks": rec.crc_nacks,
                        "bytes_sent": rec.bytes_sent,
                        "connections": rec.connections,
                        "inflight_bytes": 0 if link is None else link.inflight,
                        "inflight_high_water": rec.inflight_high_water,
                        "max_frame_bytes": rec.max_frame_bytes,
                        "last_error": rec.last_error,
                    }
                )
            return out

    def stats(self) -> dict[str, Any]:
        """The sender as a whole: head, backlog, held snapshot, refused connections."""
        with self._lock:
            return {
                "address": f"{self._address[0]}:{self._address[1]}",
                "head_n": self._head.n,
                "head_seq": self._head_seq,
                "backlog_points": len(self._entries) - self._first,
                "backlog_bytes": self._retained_bytes,
                "backlog_floor_n": self._floor[0],
                "snapshot_held": self._snapshot is not None,
                "snapshots_taken": self._snapshots_taken,
                "rejected_connections": self._rejected,
                "pending_connections": self._pending,
                "dropped_publishes": self._dropped_publishes,
                "threads": [link.thread.name for link in self._links],
                "stuck_threads": list(self._stuck_threads),
            }

    def close(self) -> None:
        """Close every socket and join every thread: afterwards the process holds nothing of
        the sender (it may be checkpointed by CRIU). Idempotent."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        os.eventfd_write(self._stop_fd, 1)
        self._acceptor.join(_JOIN_TIMEOUT)
        with self._lock:
            links = list(self._links)
            threads = list(self._threads)
            for link in links:
                link.stop = True
                link.wake()
                # under the lock: a link closes its socket under it too, so this cannot hit
                # a reused descriptor
                with contextlib.suppress(OSError):  # not connected any more: nothing to cut
                    link.sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(_JOIN_TIMEOUT)
        stuck = [t.name for t in [self._acceptor, *threads] if t.is_alive()]
        self._listener.close()
        os.close(self._stop_fd)
        with self._lock:
            self._stuck_threads = stuck
            self._snapshot = None
            self._entries.clear()
            self._ns.clear()
            self._closed = True
            self._acked_cond.notify_all()
        if stuck:
            self._log("statesync.threads_stuck", level="error", stage=self.stage, threads=stuck)
            raise DpmigrateError(
                f"stage {self.stage}: statesync threads {stuck} did not stop within "
                f"{_JOIN_TIMEOUT} s; do not checkpoint this process"
            )
        self._log("statesync.closed", level="info", stage=self.stage)

    def __enter__(self) -> StateSender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ backlog (locked)

    def _trim(self) -> None:
        """Drop the oldest points beyond backlog_bytes; invalidate a snapshot whose point the
        backlog no longer follows."""
        upto = self._first
        retained = self._retained_bytes
        entries = self._entries
        while retained > self.backlog_bytes and upto < len(entries):
            retained -= entries[upto].nbytes  # type: ignore[union-attr]
            upto += 1
        if upto > self._first:
            self._drop_retained(upto)

    def _drop_retained(self, upto: int) -> None:
        entries = self._entries
        for i in range(self._first, upto):
            e = entries[i]
            assert e is not None
            self._retained_bytes -= e.nbytes
            self._floor = (e.n, e.seq, e.at, e.version)
            entries[i] = None
        self._first = upto
        if upto > 1024 and upto * 2 > len(entries):
            del entries[:upto]
            del self._ns[:upto]
            self._first = 0
        snap = self._snapshot
        if snap is not None and snap.n < self._floor[0]:
            snap.valid = False
            self._snapshot = None

    def _covers(self, n: int) -> bool:
        """Whether every point after ``n`` is retained (or ``n`` is at/after the head)."""
        return n >= self._floor[0]

    def _knows(self, n: int, version: int | None) -> bool:
        """Whether the replica's (n, version) is a point of this primary's history that it can
        stream after: the head, the floor or a retained point, with the same version. A point
        ahead of the head is taken on trust (this primary restarted from an older journal
        point and regenerates the same points; if not, the first delta is a gap)."""
        if version is None:
            return False
        head = self._head
        if n > head.n:
            return True
        if n == head.n:
            return version == head.version
        floor_n, _, _, floor_version = self._floor
        if n == floor_n:
            return version == floor_version
        if n < floor_n:
            return False
        i = bisect.bisect_left(self._ns, n, self._first)
        if i >= len(self._ns) or self._ns[i] != n:
            return False
        e = self._entries[i]
        return e is not None and e.version == version

    def _seq_of(self, n: int) -> tuple[int, float]:
        """(seq, commit time) of the newest point at or before ``n`` that this primary knows."""
        if n >= self._head.n:
            return self._head_seq, self._head.at
        i = bisect.bisect_right(self._ns, n, self._first) - 1
        if i >= self._first:
            e = self._entries[i]
            assert e is not None
            return e.seq, e.at
        return self._floor[1], self._floor[2]

    def _entries_after(self, n: int, room: int, alone: bool) -> tuple[list[_Entry], int]:
        """Retained points after ``n`` totalling at most ``room`` bytes (at least one when
        ``alone``: nothing is in flight, so one frame larger than the window may go), and
        the size of the next one that did not fit (0: none is left)."""
        i = bisect.bisect_right(self._ns, n, self._first)
        out: list[_Entry] = []
        entries = self._entries
        for j in range(i, min(len(entries), i + 4096)):
            e = entries[j]
            assert e is not None
            if e.nbytes > room and not (alone and not out):
                return out, e.nbytes
            out.append(e)
            room -= e.nbytes
        return out, 0

    def _usable_snapshot(self) -> _Snapshot | None:
        snap = self._snapshot
        return snap if snap is not None and snap.valid else None

    def _install_snapshot(self, data: dict[str, Any]) -> None:
        self._snapshot = _Snapshot(self._head, self._head_seq, data)
        self._snapshot_wanted = False
        self._snapshots_taken += 1
        self._log(
            "statesync.snapshot_taken",
            level="info",
            stage=self.stage,
            n=self._head.n,
            version=self._head.version,
            items=len(data),
        )
        for link in self._links:
            if link.mode == "await_snapshot":
                link.wake()

    def _maybe_release_snapshot(self) -> None:
        """Forget the held snapshot once no connection sends it and no replica holds part of
        it (a replica that comes back mid-snapshot could still resume it)."""
        snap = self._snapshot
        if snap is None:
            return
        if any(link.snap is snap for link in self._links):
            return
        if any(rec.partial_snap == snap.id for rec in self._replicas.values()):
            return
        self._snapshot = None

    # ------------------------------------------------------------------ accepting

    def _accept_loop(self) -> None:
        poller = select.poll()
        poller.register(self._listener.fileno(), select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        while not self._closing:
            try:
                events = poller.poll(None)
            except InterruptedError:
                continue
            if any(fd == self._stop_fd for fd, _ in events):
                return
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as err:  # EMFILE and friends: tell, wait a little, go on
                self._log(
                    "statesync.accept_failed", level="warning", stage=self.stage, error=str(err)
                )
                poller.poll(100)
                continue
            self._admit(sock, f"{addr[0]}:{addr[1]}")

    def _admit(self, sock: socket.socket, peer: str) -> None:
        """Give an accepted connection its thread, or refuse it (too many authenticating, or
        no descriptor or thread to spare): the acceptor itself never fails on a peer."""
        reason = ""
        try:
            wire.tune_socket(sock, self.dead_after_s)
            with self._lock:
                if self._closing:
                    reason = "the primary is closing"
                elif self._pending >= self.max_pending:
                    reason = f"{self.max_pending} connections are already authenticating"
                else:
                    link = _Link(self, sock, peer)
                    self._pending += 1
                    self._links.add(link)
                    self._threads = [t for t in self._threads if t.is_alive()]
                    self._threads.append(link.thread)
        except OSError as err:  # EMFILE for the eventfd, a socket option on a dead socket
            reason = f"cannot serve it: {err}"
        if not reason:
            try:
                link.thread.start()
                return
            except RuntimeError as err:  # no thread to spare
                reason = f"cannot serve it: {err}"
                with self._lock:
                    self._pending -= 1
                    self._links.discard(link)
                    self._threads.remove(link.thread)
                    os.close(link.wake_fd)
        with self._lock:
            self._rejected += 1
        self._log("statesync.refused", level="warning", stage=self.stage, peer=peer, reason=reason)
        with contextlib.suppress(OSError):  # best effort: the peer may be gone already
            sock.send(wire.encode_error("busy", f"{reason}; retry"))
        sock.close()


class _Link:
    """One replica connection and its thread: handshake, then the serve loop."""

    def __init__(self, sender: StateSender, sock: socket.socket, peer: str) -> None:
        self.s = sender
        self.sock = sock
        self.peer = peer
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.sleeping = False
        self.stop = False
        self.record: _Replica | None = None
        self.mode = "handshake"  # then "await_snapshot" | "snapshot" | "stream"
        self.thread = threading.Thread(
            target=self._run, name=f"statesync-link:{sender.stage}:{peer}", daemon=True
        )
        self.reader = wire.FrameReader(
            frozenset({wire.HELLO, wire.ERROR}),
            max_meta=wire.MAX_HANDSHAKE_META,
            max_payload=0,
            size=4096,
        )
        self.out = wire.OutQueue()
        self.control: list[list[bytes | memoryview]] = []  # RESTART frames to send first
        self.queued = 0  # frame bytes queued since WELCOME
        self.acked_bytes = 0
        self.last_nack = 0
        self.last_tx = time.monotonic()
        self.announced_seq = -1
        self.announced_at = 0.0
        self.announced_safe: int | None = None  # set by the WELCOME
        self.safe_at = 0.0
        # snapshot transfer
        self.snap: _Snapshot | None = None
        self.chunker: _Chunker | None = None
        self.begin: list[bytes | memoryview] | None = None  # SNAP_BEGIN not yet queued
        self.next_item = 0
        self.next_chunk = 0
        self.ready: tuple[list[bytes | memoryview], int, int, bool] | None = None
        # streaming
        self.cursor_n = 0
        self.seen_seq = 0
        self.blocked = 0  # size of the next point when it did not fit in the window
        self.resync = False  # the next snapshot replaces a state the replica holds

    @property
    def inflight(self) -> int:
        return self.queued - self.acked_bytes

    def wake(self) -> None:
        """Interrupt the thread's poll(); called with the sender's lock held only, so the fd
        cannot be closed (and its number reused) meanwhile."""
        os.eventfd_write(self.wake_fd, 1)

    # ------------------------------------------------------------------ thread

    def _run(self) -> None:
        s = self.s
        hello: dict[str, Any] | None = None
        try:
            try:
                hello = self._handshake()
            finally:
                with s._lock:
                    s._pending -= 1
            self._serve(hello)
        except wire.WireError as err:
            self._fail(err, err.code, "warning" if hello is None else "error")
        except SnapshotError as err:
            self._fail(err, "snapshot", "error")
        except (OSError, EOFError, TimeoutError) as err:
            if not self.stop:
                self._note(f"connection lost: {err}")
                s._log(
                    "statesync.replica_lost",
                    level="warning",
                    stage=s.stage,
                    peer=self.peer,
                    node=None if hello is None else hello["node"],
                    error=str(err),
                )
        except Exception as err:  # a bug here must not take the stage down with it
            self._fail(err, "internal", "error", traceback.format_exc(limit=8))
        finally:
            self._teardown()

    def _fail(self, err: Exception, code: str, level: str, trace: str = "") -> None:
        """Tell the peer why (ERROR frame, best effort) and log it (with the traceback of an
        internal error)."""
        s = self.s
        self._note(str(err))
        extra = {"traceback": trace} if trace else {}
        s._log(
            "statesync.refused" if self.record is None else "statesync.replica_error",
            level=level,
            stage=s.stage,
            peer=self.peer,
            code=code,
            error=str(err) or type(err).__name__,
            **extra,
        )
        if self.record is None:
            with s._lock:
                s._rejected += 1
        if self.out:
            return  # a partly written frame is queued: an ERROR now would be cut into it
        with contextlib.suppress(OSError):
            self.sock.setblocking(True)
            self.sock.settimeout(0.2)
            self.sock.sendall(wire.encode_error(code, str(err)))

    def _note(self, text: str) -> None:
        if self.record is not None:
            with self.s._lock:
                self.record.last_error = text[:300]

    def _teardown(self) -> None:
        s = self.s
        with s._lock:
            s._links.discard(self)
            rec = self.record
            if rec is not None and rec.link is self:
                rec.link = None
            self.snap = None
            s._maybe_release_snapshot()
            os.close(self.wake_fd)
            self.sock.close()
            s._acked_cond.notify_all()

    # ------------------------------------------------------------------ handshake

    def _handshake(self) -> dict[str, Any]:
        s = self.s
        deadline = time.monotonic() + s.handshake_timeout
        nonce = secrets.token_bytes(wire.NONCE_SIZE)
        self._send_now(wire.encode(wire.CHALLENGE, {"stage": s.stage, "nonce": nonce}), deadline)
        frame = self._read_one(deadline)
        if frame.type == wire.ERROR:
            raise EOFError(f"peer refused the handshake: {frame.meta['error']}")
        hello = frame.meta
        if hello["stage"] != s.stage:
            raise wire.WireError(
                f"this primary serves stage {s.stage!r}, not {hello['stage']!r}; look the "
                "stage's primary up again",
                "stage",
            )
        proof = wire.replica_proof(
            s._token, s.stage, hello["role"], hello["node"], nonce, hello["nonce"]
        )
        if not wire.proofs_equal(hello["proof"], proof):
            raise wire.WireError(
                "authentication failed: wrong or missing cluster token (DPMIGRATE_TOKEN)", "auth"
            )
        self._attach(hello)
        mode = self._plan(hello, force_snapshot=False)
        with s._lock:
            seq = s._seq_of(hello["n"])[0] if hello["n"] is not None else None
            head, head_seq = s._head, s._head_seq
        welcome = {
            "proof": wire.primary_proof(s._token, s.stage, hello["node"], nonce, hello["nonce"]),
            "mode": mode,
            "head_n": head.n,
            "head_seq": head_seq,
            "head_at": float(head.at),
            "seq": seq,
            "window": s.window_bytes,
            "max_frame": wire.MAX_FRAME,
            "safe": s._safe_n,
        }
        self._send_now(wire.encode(wire.WELCOME, welcome), deadline)
        self.announced_safe = welcome["safe"]
        s._log(
            "statesync.replica_connected",
            level="info",
            stage=s.stage,
            node=hello["node"],
            role=hello["role"],
            peer=self.peer,
            mode=mode,
            n=hello["n"],
            head_n=head.n,
        )
        return hello

    def _attach(self, hello: dict[str, Any]) -> None:
        """Bind this connection to the replica's record; a previous connection of the same
        node (not yet noticed dead) is told to stop."""
        s = self.s
        node = hello["node"]
        with s._lock:
            if s._closing:
                raise EOFError("sender closing")
            rec = s._replicas.get(node)
            if rec is None:
                if len(s._replicas) >= _MAX_REPLICAS:
                    raise wire.WireError(
                        f"this primary already serves {_MAX_REPLICAS} replica nodes", "busy"
                    )
                rec = s._replicas[node] = _Replica(node, hello["role"])
            old = rec.link
            if old is not None:
                old.stop = True
                old.wake()
                with contextlib.suppress(OSError):
                    old.sock.shutdown(socket.SHUT_RDWR)
            rec.link = self
            rec.role = hello["role"]
            rec.peer = self.peer
            rec.connections += 1
            rec.partial_snap = hello["snap"] if hello["items"] else None
            self.record = rec

    def _send_now(self, parts: list[bytes | memoryview], deadline: float) -> None:
        self.out.extend(parts, wire.frame_size(parts))
        while self.out:
            self.out.write(self.sock)
            if not self.out:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("replica does not read its handshake frames")
            self._wait(select.POLLOUT, left)

    def _wait(self, events: int, timeout: float) -> None:
        poller = select.poll()
        poller.register(self.sock.fileno(), events)
        poller.register(self.wake_fd, select.POLLIN)
        poller.poll(_poll_ms(timeout))
        if self.stop:
            raise EOFError("sender closing")

    def _read_one(self, deadline: float) -> wire.Frame:
        while True:
            frame = self.reader.next()
            if frame is not None:
                return frame
            left = deadline - time.monotonic()
            if left <= 0:
                raise wire.WireError(
                    f"no valid HELLO within {self.s.handshake_timeout} s", "timeout"
                )
            self._wait(select.POLLIN, left)
            try:
                n = self.reader.recv_from(self.sock, 4096)
            except (BlockingIOError, InterruptedError):
                continue
            if n == 0:
                raise EOFError("peer hung up during the handshake")

    # ------------------------------------------------------------------ planning

    def _plan(self, info: dict[str, Any], force_snapshot: bool) -> str:
        """Choose how to bring the replica from what ``info`` says it holds to the head:
        "resume" a snapshot, "stream" points, or a fresh "snapshot"."""
        s = self.s
        rec = self.record
        assert rec is not None
        with s._lock:
            snap = s._usable_snapshot()
            n = info["n"]
            if snap is not None and info["snap"] == snap.id and 0 < info["items"] <= snap.items:
                self._start_snapshot(snap, info["items"], info["chunks"])
                rec.snapshot_resumes += 1
                return "resume"
            self.snap = None
            if not force_snapshot and n is not None and s._knows(n, info["version"]):
                self.mode = "stream"
                self.cursor_n = n
                self.seen_seq = s._seq_of(n)[0]
                return "stream"
            self.resync = n is not None
            if snap is not None:
                self._start_snapshot(snap, 0, 0)
            else:
                self.mode = "await_snapshot"
                s._snapshot_wanted = True
            return "snapshot"

    def _start_snapshot(self, snap: _Snapshot, first: int, chunk: int) -> None:
        self.mode = "snapshot"
        self.snap = snap
        self.chunker = _Chunker(snap.data, first, self.s.chunk_bytes)
        p = snap.point
        meta = {
            "id": snap.id,
            "version": p.version,
            "seq": snap.seq,
            "at": float(p.at),
            "inputs": dict(p.inputs),
            "outputs": dict(p.outputs),
            "items": snap.items,
            "first": first,
            "chunk": chunk,
        }
        self.begin = wire.encode(wire.SNAP_BEGIN, meta)
        self.next_item = first
        self.next_chunk = chunk
        self.ready = None

    # ------------------------------------------------------------------ serving

    def _serve(self, hello: dict[str, Any]) -> None:
        s = self.s
        self.reader.allowed = frozenset({wire.ACK, wire.NACK, wire.ERROR})
        self.queued = self.acked_bytes = 0
        poller = select.poll()
        fd = self.sock.fileno()
        poller.register(fd, _POLL_IN)
        poller.register(self.wake_fd, select.POLLIN)
        while not self.stop:
            self._fill()
            if self.out:
                self._write()
            wait = self._wait_time()
            poller.modify(fd, _POLL_IN | (select.POLLOUT if self.out else 0))
            if wait != 0:
                self.sleeping = True
                if self._can_fill():
                    wait = 0
                elif self._safe_waiting():  # marked meanwhile (mark_safe saw us awake)
                    wait = min(wait, max(0.0, self.safe_at + _SAFE_EVERY - time.monotonic()))
            try:
                events = poller.poll(_poll_ms(wait))
            finally:
                self.sleeping = False
            for efd, ev in events:
                if efd == self.wake_fd:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self.wake_fd)
                elif ev & _POLL_IN:
                    self._read()
        raise EOFError("sender closing" if s._closing else "replaced by a newer connection")

    def _write(self) -> None:
        n = self.out.write(self.sock)
        if n:
            self.last_tx = time.monotonic()
            rec = self.record
            assert rec is not None
            rec.bytes_sent += n

    def _room(self, size: int) -> bool:
        inflight = self.queued - self.acked_bytes
        return inflight == 0 or inflight + size <= self.s.window_bytes

    def _queue(self, parts: list[bytes | memoryview], size: int) -> None:
        self.out.extend(parts, size)
        self.queued += size
        rec = self.record
        assert rec is not None
        inflight = self.queued - self.acked_bytes
        if inflight > rec.inflight_high_water:
            rec.inflight_high_water = inflight
        if size > rec.max_frame_bytes:
            rec.max_frame_bytes = size

    def _wait_time(self) -> float:
        """0 when more can be queued at once; otherwise until the next heartbeat is due (or a
        heartbeat's time when the window is full: the replica then has bytes to read)."""
        if self.out:
            return self.s.heartbeat_s
        if self._can_fill():
            return 0
        now = time.monotonic()
        due = self.last_tx + self.s.heartbeat_s - now
        if self._safe_waiting():
            due = min(due, self.safe_at + _SAFE_EVERY - now)
        if due > 0:
            return due
        return 0 if self._room(_HEAD_SIZE) else self.s.heartbeat_s

    def _can_fill(self) -> bool:
        """Whether _fill() would queue something now (read without the lock: a stale answer
        only costs one more loop)."""
        if self.control:
            return self._room(wire.frame_size(self.control[0]))
        if self.mode == "await_snapshot":
            return self.s._usable_snapshot() is not None
        if self.mode == "snapshot":
            if self.begin is not None:
                return self._room(wire.frame_size(self.begin))
            return self.ready is None or self._room(self.ready[1])
        if self.mode == "stream":
            return self.s._head_seq > self.seen_seq and self._room(self.blocked or 1)
        return False

    def _safe_waiting(self) -> bool:
        """A newer safe mark than the replica was told, and room in the window for it."""
        return self.s._safe_n != self.announced_safe and self._room(_HEAD_SIZE)

    def _safe_news(self, now: float) -> bool:
        """A newer safe mark than the replica was told, and _SAFE_EVERY since the last."""
        return self.s._safe_n != self.announced_safe and now - self.safe_at >= _SAFE_EVERY

    def _fill(self) -> None:
        """Queue what the window allows: pending RESTARTs, then snapshot frames or points."""
        while self.control:
            parts = self.control[0]
            size = wire.frame_size(parts)
            if not self._room(size):
                return
            self._queue(parts, size)
            self.control.pop(0)
        if self.mode == "await_snapshot":
            with self.s._lock:
                snap = self.s._usable_snapshot()
                if snap is None:
                    self.s._snapshot_wanted = True
                    return
                self._start_snapshot(snap, 0, 0)
        if self.mode == "snapshot":
            self._fill_snapshot()
        elif self.mode == "stream":
            self._fill_stream()
        self._announce()

    def _announce(self) -> None:
        """A HEAD frame: the primary's newest point when the replica cannot learn it from the
        points themselves (during a snapshot, behind a full window), at most every
        _HEAD_EVERY; a newer safe mark, at most every _SAFE_EVERY (a replica applies
        nothing beyond it); and as the heartbeat of an idle link."""
        s = self.s
        now = time.monotonic()
        head_seq = s._head_seq
        news = (
            head_seq != self.announced_seq
            and now - self.announced_at >= _HEAD_EVERY
            and not (self.mode == "stream" and self.seen_seq == head_seq)
        )
        idle = not self.out and now - self.last_tx >= s.heartbeat_s
        safe = self._safe_news(now)
        if not (news or idle or safe):
            return
        with s._lock:
            head = {
                "n": s._head.n,
                "seq": s._head_seq,
                "at": float(s._head.at),
                "safe": s._safe_n,
            }
        parts = wire.encode(wire.HEAD, head)
        size = wire.frame_size(parts)
        if self._room(size):
            self._queue(parts, size)
            self.announced_seq = head["seq"]
            self.announced_at = now
            self.announced_safe = head["safe"]
            self.safe_at = now
            self.last_tx = now

    def _fill_snapshot(self) -> None:
        snap = self.snap
        rec = self.record
        assert snap is not None and rec is not None and self.chunker is not None
        if not snap.valid:
            # the backlog dropped points after the snapshot's point while it was in transfer
            with self.s._lock:
                self.resync = True
                self.snap = None
                self.mode = "await_snapshot"
                self.s._snapshot_wanted = True
            self.s._log(
                "statesync.resync",
                level="warning",
                stage=self.s.stage,
                node=rec.node,
                reason="the backlog overflowed during the snapshot; a newer one is sent",
            )
            return
        if self.begin is not None:
            size = wire.frame_size(self.begin)
            if not self._room(size):
                return
            self._queue(self.begin, size)
            self.begin = None
            if self.resync and self.next_item == 0:
                rec.resyncs += 1  # counted when sent: a decision on a dead link is not one
            self.resync = False
        if self.ready is None:
            self.ready = self._next_snapshot_frame(snap)
        parts, size, index, last = self.ready
        if not self._room(size):
            return
        self.ready = None
        self._queue(parts, size)
        if last:
            with self.s._lock:
                rec.snapshots_sent += 1
                self.mode = "stream"
                self.cursor_n = snap.n
                self.seen_seq = snap.seq
                self.snap = None
                self.chunker = None
            self.s._log(
                "statesync.snapshot_sent",
                level="info",
                stage=self.s.stage,
                node=rec.node,
                n=snap.n,
                items=snap.items,
                chunks=self.next_chunk,
            )
            return
        sid, top = rec.sent_chunk_max
        if sid == snap.id and index <= top:
            rec.resent_chunks += 1
        elif sid != snap.id or index > top:
            rec.sent_chunk_max = (snap.id, index)

    def _next_snapshot_frame(
        self, snap: _Snapshot
    ) -> tuple[list[bytes | memoryview], int, int, bool]:
        """(frame parts, size, chunk index, is the SNAP_END) of the next snapshot frame."""
        assert self.chunker is not None
        got = self.chunker.next()
        if got is None:
            if self.next_item != snap.items:
                raise SnapshotError(
                    f"snapshot {snap.id} ended after {self.next_item} of {snap.items} items"
                )
            meta = {"id": snap.id, "chunks": self.next_chunk, "items": snap.items}
            parts = wire.encode(wire.SNAP_END, meta)
            return parts, wire.frame_size(parts), self.next_chunk, True
        count, body, _ = got
        index = self.next_chunk
        meta = {"id": snap.id, "i": index, "first": self.next_item, "count": count}
        parts = wire.encode(wire.CHUNK, meta, body)
        self.next_item += count
        self.next_chunk += 1
        return parts, wire.frame_size(parts), index, False

    def _fill_stream(self) -> None:
        s = self.s
        rec = self.record
        assert rec is not None
        with s._lock:
            head_n, head_seq = s._head.n, s._head_seq
            if self.cursor_n < head_n and not s._covers(self.cursor_n):
                self.resync = True
                snap = s._usable_snapshot()
                if snap is not None:
                    self._start_snapshot(snap, 0, 0)
                else:
                    self.mode = "await_snapshot"
                    s._snapshot_wanted = True
                resync = True
            else:
                resync = False
                room = s.window_bytes - self.inflight
                batch, self.blocked = s._entries_after(
                    self.cursor_n, room, alone=self.inflight == 0
                )
                if not batch and not self.blocked:
                    self.seen_seq = head_seq  # nothing after the cursor (or only regenerated
                    # points the replica already has)
        if resync:
            s._log(
                "statesync.resync",
                level="warning",
                stage=s.stage,
                node=rec.node,
                n=self.cursor_n,
                reason="the replica is behind the backlog; a snapshot is sent",
            )
            return
        for e in batch:
            self._queue(e.parts, e.nbytes)
            if e.n <= rec.sent_point_max:
                rec.resent_points += 1
            else:
                rec.sent_point_max = e.n
            self.cursor_n = e.n
            self.seen_seq = e.seq

    # ------------------------------------------------------------------ replies

    def _read(self) -> None:
        try:
            n = self.reader.recv_from(self.sock, 65536)
        except (BlockingIOError, InterruptedError):
            return
        if n == 0:
            raise EOFError("replica closed the connection")
        while True:
            try:
                frame = self.reader.next()
            except wire.ChecksumError as err:
                raise wire.WireError(f"damaged frame from the replica: {err}") from err
            if frame is None:
                return
            if frame.type == wire.ACK:
                self._on_progress(frame.meta)
            elif frame.type == wire.NACK:
                self._on_nack(frame.meta)
            else:  # ERROR
                raise EOFError(f"replica refused us: {frame.meta['error']}")

    def _on_progress(self, meta: dict[str, Any]) -> None:
        """Take in what an ACK (or NACK) says: consumed bytes, applied point, snapshot part."""
        consumed = meta["bytes"]
        if not self.acked_bytes <= consumed <= self.queued:
            raise wire.WireError(
                f"replica acknowledges {consumed} bytes; {self.acked_bytes}..{self.queued} "
                "is possible"
            )
        self.acked_bytes = consumed
        s = self.s
        rec = self.record
        assert rec is not None
        with s._lock:
            n = meta["n"]
            rec.acked_n = n
            rec.acked_version = meta["version"]
            if n is not None:
                rec.acked_seq, rec.acked_at = s._seq_of(n)
            was = rec.partial_snap
            rec.partial_snap = meta["snap"] if meta["items"] else None
            if was is not None and rec.partial_snap != was:
                s._maybe_release_snapshot()
            s._acked_cond.notify_all()

    def _on_nack(self, meta: dict[str, Any]) -> None:
        k = meta["k"]
        if k <= self.last_nack:
            raise wire.WireError(f"NACK {k} after NACK {self.last_nack}")
        self.last_nack = k
        self._on_progress(meta)
        rec = self.record
        assert rec is not None
        gap = meta["reason"] == "gap"
        with self.s._lock:
            if gap:
                rec.gaps += 1
            else:
                rec.crc_nacks += 1
        # The replica discards everything until our RESTART: cut the stream here and answer
        # from what it says it holds (a gap means histories differ: only a snapshot helps).
        self.ready = None
        mode = self._plan(meta, force_snapshot=gap)
        self.control.append(wire.encode(wire.RESTART, {"k": k, "mode": mode}))
        self.s._log(
            "statesync.nack",
            level="warning",
            stage=self.s.stage,
            node=rec.node,
            reason=meta["reason"],
            n=meta["n"],
            answer=mode,
        )
