"""The replica side of state synchronization: follows a primary stage's State.

A :class:`StateReceiver` has no thread of its own: the caller's loop calls :meth:`step`, which
connects when needed (asking ``connect()`` for the primary's current address on every
attempt, with a bounded back-off), reads what arrived, applies it and acknowledges it.

What it holds is always a complete state at some point, or nothing yet: a snapshot is
gathered into a separate dict and swapped in as a fresh :class:`State` only once its last
chunk arrived and every count matched; a point is applied only if its delta follows the
state's version. A primary that marks safe points (its outputs go to rings) has a point (or a
snapshot) applied only once the point is marked — every output up to it acknowledged
downstream — and held back, unapplied, until then; so a replica that takes over never
starts past what its consumers hold (the dead primary's unacknowledged outputs are produced
again, from inputs upstream still retains). What is held back is dropped with the connection
and sent again. Everything else is refused without being applied:

* a point already held is ignored (idempotent);
* a delta that does not follow (a *gap*: the histories differ) is counted and NACKed, and the
  primary answers with a snapshot;
* a frame whose body fails its crc32 is counted and NACKed, and the primary sends again from
  what the replica holds (the next point, or the same snapshot from the next item); a
  damaged header loses the framing, so the replica reconnects and resumes instead;
* after a NACK, everything up to the primary's RESTART is discarded;
* anything malformed, or a primary that cannot prove it knows the cluster token, ends the
  connection (with an ERROR frame when the framing allows) and is retried later.

A snapshot interrupted by a disconnection is kept: the next HELLO says its id and how many
items arrived, and a primary that still holds it sends the rest.
"""

from __future__ import annotations

import contextlib
import errno
import secrets
import select
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any, NoReturn

from dpmigrate.errors import ConfigError, DpmigrateError, ProtocolError
from dpmigrate.statesync import wire
from dpmigrate.statesync.point import Point, point_number
from dpmigrate.statesync.state import State

_BACKOFF_MIN = 0.01
_READS_PER_STEP = 64  # recv_into() calls per step() before returning to the caller
_RESUMED_KEPT = 16
_HANDSHAKE_ALLOWED = frozenset({wire.CHALLENGE, wire.ERROR})
_WELCOME_ALLOWED = frozenset({wire.WELCOME, wire.ERROR})
_READY_ALLOWED = wire.TO_REPLICA - {wire.CHALLENGE, wire.WELCOME}


def _noop_log(event: str, /, **fields: Any) -> None:
    return None


class _Drop(Exception):
    """End this connection (the reason is logged); the next step() reconnects."""


class _Partial:
    """A snapshot being received: its point, and the items that arrived so far."""

    def __init__(self, meta: dict[str, Any], requested_at: float) -> None:
        self.id: int = meta["id"]
        self.version: int = meta["version"]
        self.seq: int = meta["seq"]
        self.at: float = meta["at"]
        self.inputs: dict[str, int] = meta["inputs"]
        self.outputs: dict[str, int] = meta["outputs"]
        self.total: int = meta["items"]
        self.data: dict[str, Any] = {}
        self.items = 0
        self.chunks = 0
        self.max_seen = -1  # highest chunk index seen (to count re-sent chunks)
        self.bytes = 0
        self.requested_at = requested_at


class StateReceiver:
    """Replica side; driven by the caller's single-threaded loop (no threads of its own)."""

    def __init__(
        self,
        stage: str,
        token: str,
        node: str,
        connect: Callable[[], tuple[str, int]],
        *,
        role: str = "standby",
        state: State | None = None,
        point: Point | None = None,
        log: Callable[..., object] | None = None,
        ack_every_s: float = 0.0,
        handshake_timeout: float = 5.0,
        silence_timeout: float = 5.0,
        backoff_max: float = 0.5,
        dead_after_s: float = 10.0,
        recv_bytes: int = 4 << 20,
        on_snapshot: Callable[[State, Point], object] | None = None,
        on_point: Callable[[Point], object] | None = None,
    ) -> None:
        try:
            wire.check_name("stage", stage)
            wire.check_name("node", node)
            wire.check_name("role", role)
        except ProtocolError as err:
            raise ConfigError(f"StateReceiver: {err}") from err
        if not token:
            raise ConfigError("StateReceiver needs the cluster token (DPMIGRATE_TOKEN)")
        if (state is None) != (point is None):
            raise ConfigError(
                f"stage {stage}: a replica resumes from a state *and* its point; pass both or "
                "neither"
            )
        if state is not None and point is not None and state.version != point.version:
            raise ConfigError(
                f"stage {stage}: the replica's state is at version {state.version} but its "
                f"point at version {point.version}"
            )
        self.stage = stage
        self.node = node
        self.role = role
        self._token = token
        self._connect = connect
        self._log = log or _noop_log
        self._snapshot_callback = on_snapshot
        self._point_callback = on_point
        self.ack_every_s = ack_every_s
        self.handshake_timeout = handshake_timeout
        self.silence_timeout = silence_timeout
        self.backoff_max = backoff_max
        self.dead_after_s = dead_after_s
        self.recv_bytes = recv_bytes

        self.state: State = state if state is not None else State()
        self.point: Point | None = point
        self._synced = point is not None
        self._seq: int | None = None  # the applied point's seq at the current primary
        self._partial: _Partial | None = None
        #: The primary's newest safe point (None: it marks none; apply every point at once).
        self._safe: int | None = None
        #: Received but not yet safe, in stream order: a completed snapshot (state, point,
        #: seq), and points with their seq. Never applied, never acknowledged, until safe.
        self._held: tuple[State, Point, int] | None = None
        self._pending: deque[tuple[Point, int]] = deque()

        self._sock: socket.socket | None = None
        self._poller: select.poll | None = None
        self._phase = "idle"  # "connecting" | "challenge" | "welcome" | "ready"
        self._peer = ""
        self._deadline = 0.0  # of the handshake
        # one receive buffer for the receiver's life, faulted in now rather than on the
        # first reads of a snapshot; each connection starts it afresh
        self._reader = wire.FrameReader(
            _HANDSHAKE_ALLOWED,
            max_meta=wire.MAX_HANDSHAKE_META,
            max_payload=0,
            size=2 * recv_bytes,
            prefault=True,
        )
        self._out = wire.OutQueue()
        self._nonce = b""
        self._server_nonce = b""
        self._consumed = 0  # frame bytes consumed since WELCOME
        self._acked = 0  # ... as last acknowledged
        self._last_ack = 0.0
        self._dirty = False  # something was consumed since the last ack
        self._window = 16 << 20
        self._nacks = 0
        self._awaiting: int | None = None  # NACK whose RESTART has not arrived
        self._requested_at = 0.0
        self._last_rx = 0.0
        self._next_attempt = 0.0
        self._backoff = 0.0
        self._closed = False
        self._head = (point.n if point else 0, 0, point.at if point else 0.0)  # n, seq, at

        self._stats: dict[str, Any] = {
            "connections": 0,
            "reconnects": 0,
            "connect_attempts": 0,
            "auth_failures": 0,
            "errors_received": 0,
            "frames_rejected": 0,
            "crc_errors": 0,
            "gaps": 0,
            "nacks": 0,
            "acks_sent": 0,
            "resyncs": 0,
            "snapshots": 0,
            "snapshot_resumes": 0,
            "snapshot_resumed_at": [],
            "chunks": 0,
            "resent": 0,
            "discarded": 0,
            "duplicates": 0,
            "points_applied": 0,
            "snapshot_bytes": 0,
            "snapshot_chunks": 0,
            "snapshot_seconds": 0.0,
            "snapshot_mb_s": 0.0,
            "snapshot_bytes_total": 0,
            "bytes_received": 0,
            "last_error": "",
        }

    # ------------------------------------------------------------------ public API

    @property
    def synced(self) -> bool:
        """Holds a complete state at some point (a snapshot done at least once, or resumed)."""
        return self._synced

    @property
    def connected(self) -> bool:
        """Authenticated to a primary right now."""
        return self._phase == "ready"

    def step(self, timeout: float) -> bool:
        """Connect if needed (back-off, bounded by ``timeout``), read what arrived, apply,
        ack; True if anything was applied (a point, or a completed snapshot)."""
        if self._closed:
            raise DpmigrateError(f"stage {self.stage}: replica {self.node} was closed")
        deadline = time.monotonic() + max(0.0, timeout)
        applied = False
        while True:
            now = time.monotonic()
            if self._sock is None:
                if now < self._next_attempt:
                    wait = min(self._next_attempt, deadline) - now
                    if wait > 0:
                        time.sleep(wait)
                    if time.monotonic() >= deadline:
                        return applied
                self._open()
                if self._sock is None:
                    if time.monotonic() >= deadline:
                        return applied
                    continue
            try:
                applied |= self._once(deadline)
            except _Drop as why:
                self._drop(str(why))
            if applied or time.monotonic() >= deadline:
                return applied

    def lag(self) -> dict[str, Any]:
        """lag_points and lag_s relative to the primary's head as last announced (None before
        anything is held or known)."""
        head_n, head_seq, head_at = self._head
        p = self.point
        if p is None:
            return {"lag_points": None, "lag_s": None, "head_n": head_n, "n": None}
        if p.n >= head_n:
            return {"lag_points": 0, "lag_s": 0.0, "head_n": head_n, "n": p.n}
        points = None if self._seq is None else max(0, head_seq - self._seq)
        return {
            "lag_points": points,
            "lag_s": max(0.0, head_at - p.at),
            "head_n": head_n,
            "n": p.n,
        }

    def stats(self) -> dict[str, Any]:
        """Counters since creation (see the module docstring for what each event means)."""
        out = dict(self._stats)
        out["snapshot_resumed_at"] = list(self._stats["snapshot_resumed_at"])
        out["connected"] = self.connected
        out["synced"] = self._synced
        out["buffer_peak"] = self._reader.peak
        out["held_points"] = len(self._pending)  # received, waiting for their safe mark
        out["held_snapshot"] = self._held is not None
        out["safe_n"] = self._safe
        out["received_n"] = self._tail()[0] if self._synced or self._held else None
        partial = self._partial
        out["snapshot_in_progress"] = (
            None
            if partial is None
            else {
                "id": partial.id,
                "items": partial.items,
                "of": partial.total,
                "chunks": partial.chunks,
            }
        )
        return out

    def close(self) -> None:
        """Hang up (the state and point stay readable); the receiver cannot step again."""
        if self._sock is not None:
            self._hang_up()
        self._closed = True

    def __enter__(self) -> StateReceiver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ connection

    def _open(self) -> None:
        """Start a non-blocking connection to where ``connect()`` says the primary is."""
        self._stats["connect_attempts"] += 1
        try:
            host, port = self._connect()
        except DpmigrateError as err:
            self._retry_later(f"no primary address yet: {err}")
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            wire.tune_socket(sock, self.dead_after_s)
            code = sock.connect_ex((host, port))
        except OSError as err:
            sock.close()
            self._retry_later(f"cannot connect to {host}:{port}: {err}")
            return
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self._retry_later(f"cannot connect to {host}:{port}: {errno.errorcode.get(code, code)}")
            return
        self._sock = sock
        self._peer = f"{host}:{port}"
        self._phase = "connecting"
        self._deadline = time.monotonic() + self.handshake_timeout
        self._reader.reset(_HANDSHAKE_ALLOWED, wire.MAX_HANDSHAKE_META, 0)
        self._out = wire.OutQueue()
        self._awaiting = None
        self._nacks = 0
        # flow-control counts are per connection: nothing of the last one may leak into this
        self._consumed = self._acked = 0
        self._dirty = False
        self._poller = select.poll()
        self._poller.register(sock.fileno(), select.POLLOUT)

    def _retry_later(self, reason: str) -> None:
        self._backoff = min(self.backoff_max, max(_BACKOFF_MIN, self._backoff * 2))
        self._next_attempt = time.monotonic() + self._backoff
        self._stats["last_error"] = reason[:300]
        self._log(
            "statesync.replica_retry",
            level="debug",
            stage=self.stage,
            node=self.node,
            reason=reason,
            retry_in=round(self._backoff, 3),
        )

    def _drop(self, reason: str) -> None:
        was = self._phase
        self._hang_up()
        level = "warning" if was == "ready" else "info"
        self._log(
            "statesync.replica_disconnected",
            level=level,
            stage=self.stage,
            node=self.node,
            peer=self._peer,
            reason=reason,
        )
        self._retry_later(reason)

    def _hang_up(self) -> None:
        assert self._sock is not None
        self._sock.close()
        self._sock = None
        self._poller = None
        self._phase = "idle"
        self._out = wire.OutQueue()
        self._forget_unsafe()  # the next primary sends again from what we applied

    def _forget_unsafe(self) -> None:
        self._held = None
        self._pending.clear()

    def _refuse(self, err: wire.WireError) -> NoReturn:
        """Tell the primary why we hang up (best effort), then drop."""
        if self._sock is not None and not self._out:
            with contextlib.suppress(OSError):  # gone already; the drop below says why we left
                self._sock.send(wire.encode_error(err.code, str(err)))
        raise _Drop(str(err)) from err

    # ------------------------------------------------------------------ one round

    def _once(self, deadline: float) -> bool:
        """One poll() and what follows it; True if something was applied."""
        sock, poller = self._sock, self._poller
        assert sock is not None and poller is not None
        now = time.monotonic()
        wake = deadline
        if self._phase != "ready":
            wake = min(wake, self._deadline)
        else:
            wake = min(wake, self._last_rx + self.silence_timeout)
            if self._dirty and self.ack_every_s > 0:
                wake = min(wake, self._last_ack + self.ack_every_s)
        events = select.POLLIN
        if self._phase == "connecting" or self._out:
            events |= select.POLLOUT
        poller.modify(sock.fileno(), events)
        wait = max(0.0, wake - now)
        ready = poller.poll(0 if wait == 0 else max(1, int(wait * 1000 + 0.999)))
        applied = False
        if ready:
            ev = ready[0][1]
            if self._phase == "connecting":
                if not ev & (select.POLLOUT | select.POLLERR | select.POLLHUP):
                    return False
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    raise _Drop(
                        f"cannot connect to {self._peer}: {errno.errorcode.get(code, code)}"
                    )
                self._phase = "challenge"
            if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                applied = self._receive()
            if self._out and self._sock is not None:
                self._flush()
        now = time.monotonic()
        if self._phase == "ready":
            self._maybe_ack(now)
            if now - self._last_rx > self.silence_timeout:
                raise _Drop(f"primary silent for {self.silence_timeout} s")
        elif now > self._deadline:
            raise _Drop(f"no handshake with {self._peer} within {self.handshake_timeout} s")
        return applied

    def _receive(self) -> bool:
        """Read (several times, while bytes keep coming) and handle every complete frame.

        Acks are coalesced: one when the socket runs dry (sent by the caller, _once), and
        one whenever a quarter of the primary's window is unacknowledged, so a burst never
        stalls on the window. An ACK per chunk cost about a tenth of a snapshot's time.
        """
        sock = self._sock
        assert sock is not None
        applied = False
        for _ in range(_READS_PER_STEP):
            try:
                n = self._reader.recv_from(sock, self.recv_bytes)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as err:
                raise _Drop(f"connection lost: {err}") from err
            if n == 0:
                raise _Drop("primary closed the connection")
            self._stats["bytes_received"] += n
            self._last_rx = time.monotonic()
            applied |= self._handle_frames()
            if (
                self._dirty
                and self._phase == "ready"
                and self._consumed - self._acked >= self._window // 4
            ):
                self._ack(self._last_rx)
            if applied or self._sock is None:
                break
        return applied

    def _handle_frames(self) -> bool:
        applied = False
        reader = self._reader
        while True:
            try:
                frame = reader.next()
            except wire.ChecksumError as err:
                self._stats["crc_errors"] += 1
                if self._phase != "ready":
                    raise _Drop(f"damaged handshake frame: {err}") from err
                self._consumed += err.size
                self._dirty = True
                self._damaged(err)
                continue
            except wire.FramingError as err:
                if err.damaged:
                    self._stats["crc_errors"] += 1
                    raise _Drop(f"framing lost: {err}; reconnecting to resume") from err
                self._stats["frames_rejected"] += 1
                self._refuse(err)
            except wire.WireError as err:
                self._stats["frames_rejected"] += 1
                self._refuse(err)
            if frame is None:
                return applied
            if self._phase == "ready":
                self._consumed += frame.size
                self._dirty = True
                try:
                    applied |= self._on_frame(frame)
                except wire.WireError as err:
                    self._stats["frames_rejected"] += 1
                    self._refuse(err)
            elif frame.type == wire.ERROR:
                self._on_error(frame.meta)
            elif self._phase == "challenge":
                self._on_challenge(frame.meta)
            else:
                self._on_welcome(frame.meta)

    # ------------------------------------------------------------------ handshake

    def _on_challenge(self, meta: dict[str, Any]) -> None:
        if meta["stage"] != self.stage:
            self._refuse(
                wire.WireError(
                    f"the primary at {self._peer} serves stage {meta['stage']!r}, not "
                    f"{self.stage!r}; the registry entry is stale",
                    "stage",
                )
            )
        self._server_nonce = meta["nonce"]
        self._nonce = secrets.token_bytes(wire.NONCE_SIZE)
        proof = wire.replica_proof(
            self._token, self.stage, self.role, self.node, self._server_nonce, self._nonce
        )
        hello = {
            "stage": self.stage,
            "node": self.node,
            "role": self.role,
            "nonce": self._nonce,
            "proof": proof,
            **self._progress(),
        }
        self._send(wire.encode(wire.HELLO, hello))
        self._requested_at = time.monotonic()
        self._phase = "welcome"
        self._reader.allowed = _WELCOME_ALLOWED

    def _on_welcome(self, meta: dict[str, Any]) -> None:
        expected = wire.primary_proof(
            self._token, self.stage, self.node, self._server_nonce, self._nonce
        )
        if not wire.proofs_equal(meta["proof"], expected):
            self._stats["auth_failures"] += 1
            self._log(
                "statesync.impostor",
                level="warning",
                stage=self.stage,
                node=self.node,
                peer=self._peer,
            )
            self._refuse(
                wire.WireError(
                    f"the primary at {self._peer} did not prove it knows the cluster token; "
                    "refusing its state (check DPMIGRATE_TOKEN on both nodes)",
                    "auth",
                )
            )
        self._phase = "ready"
        # new limits, same buffer: frames that came in the WELCOME's read are still in it
        self._reader.allowed = _READY_ALLOWED
        self._reader.max_meta = wire.MAX_META
        self._reader.max_payload = wire.MAX_PAYLOAD
        self._consumed = self._acked = 0
        self._last_rx = time.monotonic()
        self._window = meta["window"]
        self._backoff = 0.0
        self._stats["connections"] += 1
        self._stats["reconnects"] = max(0, self._stats["connections"] - 1)
        self._head = (meta["head_n"], meta["head_seq"], meta["head_at"])
        self._seq = meta["seq"]
        self._safe = meta["safe"]
        self._forget_unsafe()
        if meta["mode"] == "stream":
            self._partial = None
        self._log(
            "statesync.replica_connected",
            level="info",
            stage=self.stage,
            node=self.node,
            peer=self._peer,
            mode=meta["mode"],
            n=None if self.point is None else self.point.n,
            head_n=meta["head_n"],
        )
        self._ack(time.monotonic())

    def _on_error(self, meta: dict[str, Any]) -> None:
        self._stats["errors_received"] += 1
        if meta["code"] == "auth":
            self._stats["auth_failures"] += 1
        raise _Drop(f"the primary refused us ({meta['code']}): {meta['error']}")

    # ------------------------------------------------------------------ streaming

    def _on_frame(self, frame: wire.Frame) -> bool:
        t, meta = frame.type, frame.meta
        if t == wire.POINT:
            return self._on_point(meta, frame.payload)
        if t == wire.CHUNK:
            self._on_chunk(meta, frame.payload)
            return False
        if t == wire.HEAD:
            self._head = (meta["n"], meta["seq"], meta["at"])
            safe = meta["safe"]
            if safe is None or self._safe is None or safe > self._safe:
                self._safe = safe
            return self._apply_safe()
        if t == wire.SNAP_BEGIN:
            self._on_begin(meta)
            return False
        if t == wire.SNAP_END:
            return self._on_end(meta)
        if t == wire.RESTART:
            if meta["k"] == self._awaiting:
                self._awaiting = None
                if meta["mode"] == "stream":
                    self._partial = None
            return False
        self._on_error(meta)  # ERROR
        return False

    def _on_point(self, meta: dict[str, Any], payload: memoryview) -> bool:
        if self._awaiting is not None:
            self._stats["discarded"] += 1
            return False
        if (not self._synced and self._held is None) or self._partial is not None:
            raise wire.WireError("POINT while no complete state is held (a snapshot is due)")
        n = point_number(meta["version"], meta["inputs"], meta["outputs"])
        if meta["seq"] > self._head[1] or n > self._head[0]:
            self._head = (n, meta["seq"], meta["at"])
        tail_n, tail_version = self._tail()
        if n <= tail_n:
            self._stats["duplicates"] += 1
            return False
        expected = tail_version + 1 if meta["delta"] else tail_version
        if meta["version"] != expected:
            self._stats["gaps"] += 1
            self._log(
                "statesync.gap",
                level="warning",
                stage=self.stage,
                node=self.node,
                n=n,
                version=meta["version"],
                have=tail_version,
            )
            self._nack("gap")
            return False
        self._pending.append((wire.decode_point(meta, payload), meta["seq"]))
        return self._apply_safe()

    def _tail(self) -> tuple[int, int]:
        """(n, version) of the newest point received, applied or held back."""
        if self._pending:
            point = self._pending[-1][0]
            return point.n, point.version
        if self._held is not None:
            return self._held[1].n, self._held[1].version
        assert self.point is not None
        return self.point.n, self.state.version

    def _is_safe(self, point: Point) -> bool:
        return self._safe is None or point.n <= self._safe

    def _apply_safe(self) -> bool:
        """Apply, in order, what is held back and now safe; True if anything was."""
        applied = False
        if self._held is not None:
            state, point, seq = self._held
            if not self._is_safe(point):
                return False
            self._held = None
            self._install(state, point, seq)
            applied = True
        while self._pending and self._is_safe(self._pending[0][0]):
            point, seq = self._pending.popleft()
            if self._point_callback is not None:
                self._deliver(self._point_callback, point)
            if point.delta is not None:
                self.state.apply(point.delta)
            self.point = point
            self._seq = seq
            self._stats["points_applied"] += 1
            applied = True
        return applied

    def _on_begin(self, meta: dict[str, Any]) -> None:
        if self._awaiting is not None:
            self._stats["discarded"] += 1
            return
        partial = self._partial
        if meta["first"] == 0:
            if meta["chunk"] != 0:
                raise wire.WireError("SNAP_BEGIN at item 0 must start at chunk 0")
            if self._synced:
                self._stats["resyncs"] += 1
            self._forget_unsafe()  # the snapshot is newer than anything held back
            self._partial = _Partial(meta, self._requested_at)
            return
        if (
            partial is None
            or partial.id != meta["id"]
            or partial.items != meta["first"]
            or partial.chunks != meta["chunk"]
        ):
            raise wire.WireError(
                f"SNAP_BEGIN resumes snapshot {meta['id']} at item {meta['first']}, chunk "
                f"{meta['chunk']}, which is not what this replica holds"
            )
        self._stats["snapshot_resumes"] += 1
        kept = self._stats["snapshot_resumed_at"]
        kept.append(meta["chunk"])
        del kept[:-_RESUMED_KEPT]

    def _on_chunk(self, meta: dict[str, Any], payload: memoryview) -> None:
        partial = self._partial
        if self._awaiting is not None:
            if partial is not None and partial.id == meta["id"]:
                partial.max_seen = max(partial.max_seen, meta["i"])
            self._stats["discarded"] += 1
            return
        if partial is None or partial.id != meta["id"]:
            raise wire.WireError(f"CHUNK of snapshot {meta['id']}, which was not begun")
        if meta["i"] != partial.chunks or meta["first"] != partial.items:
            raise wire.WireError(
                f"CHUNK {meta['i']} at item {meta['first']} arrived; chunk {partial.chunks} "
                f"at item {partial.items} was expected"
            )
        if partial.items + meta["count"] > partial.total:
            raise wire.WireError(f"snapshot {partial.id} grows beyond its {partial.total} items")
        items = wire.decode_items(payload, meta["count"])
        before = len(partial.data)
        partial.data.update(items)
        if len(partial.data) != before + meta["count"]:
            raise wire.WireError(f"CHUNK {meta['i']} repeats keys of earlier chunks")
        if meta["i"] <= partial.max_seen:
            self._stats["resent"] += 1
        partial.max_seen = max(partial.max_seen, meta["i"])
        partial.items += meta["count"]
        partial.chunks += 1
        partial.bytes += len(payload)
        self._stats["chunks"] += 1

    def _on_end(self, meta: dict[str, Any]) -> bool:
        if self._awaiting is not None:
            self._stats["discarded"] += 1
            return False
        partial = self._partial
        if (
            partial is None
            or partial.id != meta["id"]
            or partial.items != meta["items"]
            or partial.items != partial.total
            or partial.chunks != meta["chunks"]
        ):
            raise wire.WireError(
                f"SNAP_END of snapshot {meta['id']} ({meta['items']} items, {meta['chunks']} "
                "chunks) does not match what arrived"
            )
        state = State.adopt(partial.data, partial.version)
        point = Point(partial.version, None, partial.inputs, partial.outputs, partial.at)
        self._partial = None
        self._forget_unsafe()
        self._held = (state, point, partial.seq)
        seconds = max(time.monotonic() - partial.requested_at, 1e-9)
        st = self._stats
        st["snapshots"] += 1
        st["snapshot_bytes"] = partial.bytes
        st["snapshot_chunks"] = partial.chunks
        st["snapshot_seconds"] = seconds
        st["snapshot_mb_s"] = partial.bytes / seconds / 1e6
        st["snapshot_bytes_total"] += partial.bytes
        self._log(
            "statesync.snapshot_received",
            level="info",
            stage=self.stage,
            node=self.node,
            n=point.n,
            items=partial.items,
            bytes=partial.bytes,
            seconds=round(seconds, 4),
            safe=self._is_safe(point),
        )
        return self._apply_safe()

    def _install(self, state: State, point: Point, seq: int) -> None:
        """A completed snapshot, now safe, becomes the state (after the caller's journal)."""
        if self._snapshot_callback is not None:
            self._deliver(self._snapshot_callback, state, point)
        self.state = state
        self.point = point
        self._seq = seq
        self._synced = True

    def _deliver(self, callback: Callable[..., object], *args: Any) -> None:
        """Hand a point or a completed snapshot to the caller (its journal) before applying
        and acknowledging it: an ACK then means "applied and handed over". If the callback
        raises, nothing is applied; the connection is dropped (the stream after this point
        assumed it), so the primary resends from what this replica really holds; the
        exception goes to the caller of step()."""
        try:
            callback(*args)
        except BaseException as err:
            self._hang_up()
            name = getattr(callback, "__name__", "callback")
            self._retry_later(f"{name} failed: {err!r}; reconnecting to be sent it again")
            raise

    def _damaged(self, err: wire.ChecksumError) -> None:
        """A frame failed its crc32 (its header was intact): NACK, discard until RESTART."""
        self._log(
            "statesync.crc_error",
            level="warning",
            stage=self.stage,
            node=self.node,
            frame=wire.TYPE_NAMES.get(err.frame_type, "?"),
        )
        partial = self._partial
        if partial is not None and err.frame_type == wire.CHUNK:
            partial.max_seen = max(partial.max_seen, partial.chunks)
        if self._awaiting is None:
            self._nack("crc")

    # ------------------------------------------------------------------ acks

    def _progress(self) -> dict[str, Any]:
        p = self._partial
        return {
            "n": None if self.point is None else self.point.n,
            "version": None if self.point is None else self.state.version,
            "snap": None if p is None else p.id,
            "items": 0 if p is None else p.items,
            "chunks": 0 if p is None else p.chunks,
        }

    def _nack(self, reason: str) -> None:
        self._nacks += 1
        self._awaiting = self._nacks
        self._stats["nacks"] += 1
        self._requested_at = time.monotonic()
        self._forget_unsafe()  # the primary answers from what we applied
        meta = {"k": self._nacks, "reason": reason, "bytes": self._consumed, **self._progress()}
        self._send(wire.encode(wire.NACK, meta))
        self._acked = self._consumed
        self._dirty = False
        self._last_ack = time.monotonic()

    def _maybe_ack(self, now: float) -> None:
        if not self._dirty or self._phase != "ready":
            return
        if (
            self.ack_every_s <= 0
            or now - self._last_ack >= self.ack_every_s
            or self._consumed - self._acked >= self._window // 2
        ):
            self._ack(now)

    def _ack(self, now: float) -> None:
        if self._phase != "ready":
            return  # byte counts mean something only to the primary that sent the bytes
        self._send(wire.encode(wire.ACK, {"bytes": self._consumed, **self._progress()}))
        self._stats["acks_sent"] += 1
        self._acked = self._consumed
        self._dirty = False
        self._last_ack = now

    def _send(self, parts: list[bytes | memoryview]) -> None:
        self._out.extend(parts, wire.frame_size(parts))
        self._flush()

    def _flush(self) -> None:
        sock = self._sock
        assert sock is not None
        try:
            self._out.write(sock)
        except OSError as err:
            raise _Drop(f"connection lost: {err}") from err
