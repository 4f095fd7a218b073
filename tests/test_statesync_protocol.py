"""The state-synchronization protocol over real TCP on 127.0.0.1: snapshot and deltas,
resumption after a cut, damaged frames, gaps and re-syncs, hostile input, an impostor
primary, bounded memory, ack and lag bookkeeping, and a clean close.

Faults are injected by a small forwarding proxy (it cuts a connection after N bytes, or flips
one byte in a chosen frame) or by raw sockets; each test first checks that its fault really
happened. No mocks, no sleeps as synchronisation: every loop is bounded in rounds and time,
and every socket and thread is closed by a finalizer, also when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dpmigrate.errors import DpmigrateError
from dpmigrate.statesync import wire
from dpmigrate.statesync.point import Point
from dpmigrate.statesync.receiver import StateReceiver
from dpmigrate.statesync.sender import StateSender
from dpmigrate.statesync.state import State, pack

STAGE = "app/counter"
TOKEN = "cluster-token-for-tests"
_LINGER_RST = struct.pack("ii", 1, 0)


# --------------------------------------------------------------------------- fixtures


class Closers:
    """Everything a test opens, closed in reverse order at teardown (errors re-raised after
    everything was closed)."""

    def __init__(self) -> None:
        self._items: list[Callable[[], object]] = []

    def add(self, close: Callable[[], object]) -> None:
        self._items.append(close)

    def close_all(self) -> None:
        errors = []
        while self._items:
            try:
                self._items.pop()()
            except Exception as err:  # keep closing the rest; report below
                errors.append(err)
        if errors:
            raise errors[0]


@pytest.fixture
def closers() -> Iterator[Closers]:
    kept = Closers()
    try:
        yield kept
    finally:
        kept.close_all()


class Primary:
    """A primary stage: a State that commits deterministic batches, and its StateSender."""

    def __init__(
        self,
        closers: Closers,
        keys: int = 200,
        value_size: int = 256,
        restart: Primary | None = None,
        **kw: Any,
    ) -> None:
        self.keys = keys
        self.value_size = value_size
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.state = State()
        for k in range(keys):
            self.state[f"k{k}"] = self.value(k)
        self.state.commit()
        self.inputs = {"in": 0}
        self.outputs = {"out": 0}
        self.i = 0
        self.published: list[int] = []
        self.point = Point(self.state.version, None, dict(self.inputs), dict(self.outputs), at=1e6)
        if restart is not None:  # restarted from what ``restart`` saved with save()
            self.state, self.i, self.point, self.inputs, self.outputs = restart.saved
        kw.setdefault("chunk_bytes", 16 << 10)
        self.sender = StateSender(STAGE, TOKEN, self.state, self.point, log=self.log, **kw)
        closers.add(self.sender.close)

    def log(self, event: str, level: str = "info", **fields: Any) -> None:
        self.events.append((event, level, fields))

    def save(self) -> None:
        """Keep the current point as a journal would (for a restart from it)."""
        state = State.adopt(self.state.committed_copy(), self.state.version)
        self.saved = (state, self.i, self.point, dict(self.inputs), dict(self.outputs))

    def value(self, i: int) -> bytes:
        return (b"%08d" % i) * (self.value_size // 8)

    def commit(self, k: int = 1) -> None:
        """k batches: each sets one key, every 7th deletes one, consumes and emits."""
        for _ in range(k):
            self.i += 1
            i = self.i
            self.state[f"k{i % (self.keys + 20)}"] = self.value(i)
            if i % 7 == 0:
                self.state.pop(f"k{(i * 3) % self.keys}", None)
            self.inputs["in"] += 1
            self.outputs["out"] += 2
            delta = self.state.commit()
            self.point = Point(
                self.state.version, delta, dict(self.inputs), dict(self.outputs), at=1e6 + i
            )
            self.published.append(self.point.n)
            self.sender.publish(self.point, self.state)


def make_replica(
    closers: Closers, connect: Callable[[], tuple[str, int]], **kw: Any
) -> StateReceiver:
    kw.setdefault("node", "replica-1")
    node = kw.pop("node")
    replica = StateReceiver(STAGE, kw.pop("token", TOKEN), node, connect, **kw)
    closers.add(replica.close)
    return replica


def converged(primary: Primary, replica: StateReceiver) -> bool:
    p = replica.point
    return (
        replica.synced
        and p is not None
        and p.n == primary.point.n
        and replica.state.version == primary.state.version
        and replica.state.digest() == primary.state.digest()
    )


def drive(
    primary: Primary,
    replica: StateReceiver,
    until: Callable[[], bool],
    *,
    commit: bool = False,
    rounds: int = 5000,
    seconds: float = 15.0,
    step: float = 0.005,
) -> int:
    """Run the primary's loop (a commit per round when ``commit``, else poll) and the
    replica's until ``until()``; returns the rounds used. Bounded in rounds and time."""
    deadline = time.monotonic() + seconds
    for i in range(rounds):
        if until():
            return i
        if commit:
            primary.commit()
        else:
            primary.sender.poll(primary.state)
        replica.step(step)
        if time.monotonic() > deadline:
            break
    if until():
        return rounds
    raise AssertionError(
        f"condition not reached: replica {replica.stats()}, point "
        f"{replica.point and replica.point.n} vs head {primary.point.n}; sender "
        f"{primary.sender.replicas()} {primary.sender.stats()}"
    )


def sync(primary: Primary, replica: StateReceiver, **kw: Any) -> None:
    drive(primary, replica, lambda: converged(primary, replica), **kw)


def state_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("statesync-")]


# --------------------------------------------------------------------------- fault proxy


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class Proxy:
    """Forwards connections to ``target``; reads the primary -> replica direction frame by
    frame so that it can, once each: cut the connection after ``cut_after`` more bytes, flip
    one byte in the payload of the ``flip_chunk``-th CHUNK frame, or flip one byte in the
    header of the ``flip_point_header``-th POINT frame. ``blocked`` refuses connections."""

    def __init__(self, closers: Closers, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self.lock = threading.Lock()
        self.cut_after: int | None = None
        self.flip_chunk: int | None = None
        self.flip_point_header: int | None = None
        self.blocked = False
        self.flowing = threading.Event()  # cleared: primary -> replica bytes are held back
        self.flowing.set()
        self.cuts = 0
        self.flips = 0
        self.header_flips = 0
        self.connections = 0
        self.chunks_seen = 0
        self.points_seen = 0
        self.stopping = False
        self.socks: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self._spawn(self._accept_loop)
        closers.add(self.close)

    def _spawn(self, fn: Callable[..., None], *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, name="test-proxy", daemon=True)
        self.threads.append(t)
        t.start()

    def cut_all(self) -> None:
        """Reset every open connection (as a crash or a cable pull would)."""
        with self.lock:
            socks = list(self.socks)
        for s in socks:
            self._reset(s)

    @staticmethod
    def _reset(s: socket.socket) -> None:
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)

    def _accept_loop(self) -> None:
        while not self.stopping:
            try:
                down, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            if self.blocked:
                down.close()
                continue
            try:
                up = socket.create_connection(self.target, timeout=2)
            except OSError:
                down.close()
                continue
            up.settimeout(None)
            down.settimeout(None)
            with self.lock:
                self.socks += [up, down]
                self.connections += 1
            self._spawn(self._pump_up, down, up)
            self._spawn(self._pump_down, up, down)

    def _pump_up(self, down: socket.socket, up: socket.socket) -> None:
        try:
            while True:
                data = down.recv(65536)
                if not data:
                    break
                up.sendall(data)
        except OSError:
            pass  # the other pump or a cut closed the pair
        finally:
            self._reset(up)
            self._reset(down)

    def _pump_down(self, up: socket.socket, down: socket.socket) -> None:
        try:
            while True:
                head = bytearray(_recv_exact(up, wire.HEADER_SIZE))
                _, _, ftype, meta_len, payload_len, _, _ = wire.HEADER.unpack(head)
                body = bytearray(_recv_exact(up, meta_len + payload_len))
                while not self.flowing.wait(0.05) and not self.stopping:
                    pass  # stalled: the replica hears nothing (a frozen primary, a dead link)
                with self.lock:
                    if ftype == wire.CHUNK:
                        if self.flip_chunk == self.chunks_seen and payload_len:
                            body[meta_len + payload_len // 2] ^= 0xFF
                            self.flips += 1
                            self.flip_chunk = None
                        self.chunks_seen += 1
                    if ftype == wire.POINT:
                        if self.flip_point_header == self.points_seen:
                            head[9] ^= 0x01  # payload length: the header crc catches it
                            self.header_flips += 1
                            self.flip_point_header = None
                        self.points_seen += 1
                    data = bytes(head + body)
                    cut = None
                    if self.cut_after is not None:
                        if len(data) >= self.cut_after:
                            cut, self.cut_after = self.cut_after, None
                            self.cuts += 1
                        else:
                            self.cut_after -= len(data)
                if cut is not None:
                    down.sendall(data[:cut])
                    break
                down.sendall(data)
        except (OSError, EOFError):
            pass  # a cut, or one end closed
        finally:
            self._reset(up)
            self._reset(down)

    def close(self) -> None:
        self.stopping = True
        self.cut_all()
        for t in self.threads:
            t.join(5)
        with self.lock:
            for s in self.socks:
                s.close()
        self.listener.close()
        alive = [t for t in self.threads if t.is_alive()]
        assert not alive, "proxy threads did not stop"


# --------------------------------------------------------------------------- raw peers


def raw_frame(
    ftype: int,
    meta: bytes,
    payload: bytes = b"",
    *,
    magic: int = wire.MAGIC,
    version: int = wire.VERSION,
    meta_len: int | None = None,
) -> bytes:
    """A frame with valid checksums around whatever contents a test wants."""
    body = meta + payload
    head = struct.pack(
        "!HBBIII",
        magic,
        version,
        ftype,
        len(meta) if meta_len is None else meta_len,
        len(payload),
        zlib.crc32(body),
    )
    return head + struct.pack("!I", zlib.crc32(head)) + body


def hello_meta(
    nonce: bytes, *, token: str = TOKEN, stage: str = STAGE, node: str = "intruder"
) -> dict[str, Any]:
    mine = os.urandom(wire.NONCE_SIZE)
    return {
        "stage": stage,
        "node": node,
        "role": "standby",
        "nonce": mine,
        "proof": wire.replica_proof(token, stage, "standby", node, nonce, mine),
        "n": None,
        "version": None,
        "snap": None,
        "items": 0,
        "chunks": 0,
    }


def raw_session(
    address: tuple[str, int], make: Callable[[bytes], bytes]
) -> tuple[dict[str, Any] | None, bool]:
    """Connect as a stranger, read the CHALLENGE, send ``make(nonce)``; return the ERROR
    frame's metadata the primary answered with (or None) and whether it then hung up."""
    with socket.create_connection(address, timeout=3) as sock:
        reader = wire.FrameReader(wire.TO_REPLICA)
        sock.settimeout(3)
        challenge = None
        while challenge is None:
            if reader.recv_from(sock) == 0:
                raise AssertionError("primary hung up before its CHALLENGE")
            challenge = reader.next()
        assert challenge.type == wire.CHALLENGE
        sock.sendall(make(challenge.meta["nonce"]))
        error = None
        for _ in range(100):
            frame = reader.next()
            if frame is not None:
                assert frame.type == wire.ERROR, wire.TYPE_NAMES[frame.type]
                error = frame.meta
                continue
            try:
                if reader.recv_from(sock) == 0:
                    return error, True
            except (ConnectionResetError, TimeoutError):
                return error, True
        return error, False


class Impostor:
    """A 'primary' that does not know the token. ``mode``: "bad_proof" answers the HELLO with a
    WELCOME proven with another token, "no_welcome" skips the WELCOME; both then push a
    bogus snapshot."""

    def __init__(self, closers: Closers, mode: str) -> None:
        self.mode = mode
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.address = self.listener.getsockname()[:2]
        self.stopping = False
        self.sessions = 0
        self.errors: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self._serve, name="test-impostor", daemon=True)
        self.thread.start()
        closers.add(self.close)

    def _serve(self) -> None:
        while not self.stopping:
            try:
                sock, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            with sock:
                sock.settimeout(1)
                # the replica hangs up on us, as it should
                with contextlib.suppress(OSError, EOFError, wire.WireError):
                    self._session(sock)
            self.sessions += 1

    def _session(self, sock: socket.socket) -> None:
        nonce = os.urandom(wire.NONCE_SIZE)
        sock.sendall(wire.encode_bytes(wire.CHALLENGE, {"stage": STAGE, "nonce": nonce}))
        reader = wire.FrameReader(wire.TO_PRIMARY)
        hello = None
        while hello is None:
            if reader.recv_from(sock) == 0:
                raise EOFError
            hello = reader.next()
        m = hello.meta
        frames = b""
        if self.mode == "bad_proof":
            proof = wire.primary_proof("not-the-token", STAGE, m["node"], nonce, m["nonce"])
            welcome = {"proof": proof, "mode": "snapshot", "head_n": 1, "head_seq": 0,
                       "head_at": 1.0, "seq": None, "window": 1 << 20, "max_frame": wire.MAX_FRAME,
                       "safe": None}  # fmt: skip
            frames += wire.encode_bytes(wire.WELCOME, welcome)
        items = pack({"evil": b"bad"})
        frames += wire.encode_bytes(wire.SNAP_BEGIN, {"id": 7, "version": 1, "seq": 0, "at": 1.0,
                                    "inputs": {}, "outputs": {}, "items": 1, "first": 0, "chunk": 0})  # fmt: skip
        frames += wire.encode_bytes(wire.CHUNK, {"id": 7, "i": 0, "first": 0, "count": 1}, [items])
        frames += wire.encode_bytes(wire.SNAP_END, {"id": 7, "chunks": 1, "items": 1})
        sock.sendall(frames)
        for _ in range(50):
            frame = reader.next()
            if frame is not None:
                if frame.type == wire.ERROR:
                    self.errors.append(frame.meta)
                continue
            if reader.recv_from(sock) == 0:
                return

    def close(self) -> None:
        self.stopping = True
        self.thread.join(5)
        self.listener.close()
        assert not self.thread.is_alive()


# --------------------------------------------------------------------------- tests


def test_wire_round_trip_and_checks() -> None:
    """Encode/decode every checked path once without sockets: the reader refuses what the
    table does not allow, and a flipped body byte is a ChecksumError that keeps the framing."""
    state = State()
    state["a"] = 1
    point = Point(1, state.commit(), {"in": 4}, {"out": 5}, at=12.5)
    reader = wire.FrameReader(wire.TO_REPLICA)
    frame_bytes = b"".join(wire.encode_point(point, seq=9))
    reader.feed(frame_bytes)
    frame = reader.next()
    assert frame is not None and frame.type == wire.POINT and frame.meta["seq"] == 9
    back = wire.decode_point(frame.meta, frame.payload)
    assert back == point and back.n == point.n
    damaged = bytearray(frame_bytes)
    damaged[-1] ^= 0x20
    reader.feed(bytes(damaged) + frame_bytes)
    with pytest.raises(wire.ChecksumError):
        reader.next()
    assert reader.next() is not None, "the frame after a damaged body must still be read"
    for bad, match in [
        ({"n": -1, "seq": 0, "at": 0.0, "safe": None}, "bad value"),
        ({"n": True, "seq": 0, "at": 0.0, "safe": None}, "bad value"),
        ({"n": 1, "seq": 0, "at": 0.0, "safe": -1}, "bad value"),
        ({"n": 1, "seq": 0, "safe": 1}, "missing"),
        ({"n": 1, "seq": 0, "at": 0.0, "safe": 1, "x": 1}, "unknown"),
    ]:
        with pytest.raises(wire.WireError, match=match):
            wire.check_meta(wire.HEAD, bad)
    with pytest.raises(wire.WireError, match="carry no payload"):
        wire.encode(wire.HEAD, {"n": 1, "seq": 0, "at": 0.0, "safe": None}, [b"x"])
    r = wire.FrameReader(frozenset({wire.HELLO}), max_meta=100, max_payload=0)
    r.feed(raw_frame(wire.HELLO, b"", meta_len=101))
    with pytest.raises(wire.FramingError, match="above the limit"):
        r.next()


def test_snapshot_then_deltas_converge_while_the_primary_commits(closers: Closers) -> None:
    primary = Primary(closers, keys=1024, value_size=4096, window_bytes=64 << 10)
    replica = make_replica(closers, lambda: primary.sender.address)
    taken_at: list[int] = []

    def synced() -> bool:
        if not taken_at and primary.sender.stats()["snapshots_taken"]:
            taken_at.append(primary.i)
        return replica.synced

    drive(primary, replica, synced, commit=True, step=0.002)
    assert primary.i - taken_at[0] > 0, "the primary must have committed during the transfer"
    target = primary.i + 50
    drive(primary, replica, lambda: primary.i >= target, commit=True)
    sync(primary, replica)
    assert replica.point is not None
    assert replica.point.inputs == primary.point.inputs
    assert replica.point.outputs == primary.point.outputs
    assert dict(replica.state) == dict(primary.state)
    stats = replica.stats()
    assert stats["snapshots"] == 1 and stats["points_applied"] >= 50
    assert stats["gaps"] == stats["crc_errors"] == stats["frames_rejected"] == 0
    assert primary.sender.wait_acked("replica-1", primary.point.n, 5)
    [info] = primary.sender.replicas()
    assert info["snapshots_sent"] == 1 and info["resyncs"] == 0 and info["phase"] == "streaming"


def test_cut_in_the_middle_of_a_snapshot_resumes_at_a_later_chunk(closers: Closers) -> None:
    primary = Primary(
        closers, keys=512, value_size=8192, window_bytes=256 << 10, chunk_bytes=64 << 10
    )
    proxy = Proxy(closers, primary.sender.address)
    proxy.cut_after = 2 << 20  # about half of the 4 MiB snapshot
    replica = make_replica(closers, lambda: proxy.address)
    sync(primary, replica, commit=False)
    assert proxy.cuts == 1, "the proxy must have cut the connection"
    stats = replica.stats()
    assert stats["reconnects"] == 1 and stats["errors_received"] == 0
    assert stats["snapshot_resumes"] == 1 and stats["snapshot_resumed_at"][0] > 0
    # every chunk arrived exactly once: resumed where it was cut, not restarted
    assert stats["chunks"] == stats["snapshot_chunks"] > stats["snapshot_resumed_at"][0]
    assert stats["snapshots"] == 1
    [info] = primary.sender.replicas()
    assert info["snapshot_resumes"] == 1 and info["snapshots_sent"] == 1
    primary.commit(20)
    sync(primary, replica)


def test_cut_in_the_middle_of_the_deltas_resumes_from_the_last_acked_point(
    closers: Closers,
) -> None:
    primary = Primary(closers, keys=100)
    proxy = Proxy(closers, primary.sender.address)
    replica = make_replica(closers, lambda: proxy.address)
    sync(primary, replica)
    assert replica.stats()["snapshots"] == 1
    assert primary.sender.wait_acked("replica-1", primary.point.n, 5)
    proxy.cut_after = 5000  # some points from now, mid-frame
    drive(primary, replica, lambda: proxy.cuts == 1, commit=True)
    acked_before = primary.sender.acked("replica-1")
    assert acked_before is not None
    drive(primary, replica, lambda: primary.i >= 300 and replica.connected, commit=True)
    sync(primary, replica)
    stats = replica.stats()
    assert stats["reconnects"] >= 1 and stats["snapshots"] == 1 and stats["resyncs"] == 0
    assert stats["errors_received"] == 0, "the primary never had to refuse the replica"
    assert stats["duplicates"] == 0, "streaming resumed after the replica's point"
    assert primary.sender.wait_acked("replica-1", primary.point.n, 5)
    [info] = primary.sender.replicas()
    assert info["snapshots_sent"] == 1 and info["resyncs"] == 0 and info["connections"] >= 2
    assert info["acked_n"] == primary.point.n >= acked_before


def test_a_flipped_byte_in_a_chunk_is_detected_and_sent_again(closers: Closers) -> None:
    primary = Primary(closers, keys=256, value_size=4096, chunk_bytes=32 << 10)
    proxy = Proxy(closers, primary.sender.address)
    proxy.flip_chunk = 5
    replica = make_replica(closers, lambda: proxy.address)
    drive(primary, replica, lambda: replica.synced, commit=True)
    sync(primary, replica)
    assert proxy.flips == 1, "the proxy must have flipped a byte in a chunk"
    stats = replica.stats()
    assert stats["crc_errors"] == 1 and stats["nacks"] == 1
    assert stats["resent"] >= 1 and stats["snapshots"] == 1 and stats["reconnects"] == 0
    [info] = primary.sender.replicas()
    assert info["crc_nacks"] == 1 and info["resent_chunks"] >= 1
    # the damaged bytes never reached the state: it is exactly the primary's
    assert dict(replica.state) == dict(primary.state)


def test_a_flipped_header_byte_costs_a_reconnection_and_nothing_else(closers: Closers) -> None:
    primary = Primary(closers, keys=50)
    proxy = Proxy(closers, primary.sender.address)
    replica = make_replica(closers, lambda: proxy.address)
    sync(primary, replica)
    proxy.flip_point_header = proxy.points_seen + 3
    drive(primary, replica, lambda: proxy.header_flips == 1 and primary.i > 40, commit=True)
    sync(primary, replica, commit=False)
    stats = replica.stats()
    assert stats["crc_errors"] == 1 and stats["reconnects"] >= 1
    assert stats["snapshots"] == 1, "the replica resumed from its point, no new snapshot"


def test_a_replica_behind_the_backlog_resyncs_from_a_snapshot(closers: Closers) -> None:
    primary = Primary(closers, keys=100, backlog_bytes=8 << 10)
    proxy = Proxy(closers, primary.sender.address)
    replica = make_replica(closers, lambda: proxy.address)
    sync(primary, replica)
    proxy.blocked = True
    proxy.cut_all()
    for _ in range(200):  # the replica is away while the backlog overflows
        primary.commit()
        replica.step(0)
    assert primary.sender.stats()["backlog_floor_n"] > replica.point.n  # type: ignore[union-attr]
    proxy.blocked = False
    sync(primary, replica)
    stats = replica.stats()
    assert stats["snapshots"] == 2 and stats["resyncs"] == 1
    [info] = primary.sender.replicas()
    assert info["resyncs"] == 1 and info["snapshots_sent"] == 2


def test_a_replica_whose_point_the_primary_does_not_know_gets_a_snapshot(
    closers: Closers,
) -> None:
    """A point number the primary never had, or had at another version, is another history:
    streaming deltas onto it would build a wrong state, so the replica gets a snapshot."""
    primary = Primary(closers, keys=100)
    primary.commit(10)
    for version, n_offset in [(1, 1), (primary.state.version - 1, 0)]:
        other = State()
        for v in range(version):
            other["x"] = v
            other.commit()
        outputs = dict(primary.outputs)
        inputs = {"in": primary.point.n - n_offset - other.version - outputs["out"]}
        point = Point(other.version, None, inputs, outputs, at=1.0)
        assert point.n <= primary.point.n
        replica = make_replica(
            closers,
            lambda: primary.sender.address,
            state=other,
            point=point,
            node=f"other-{version}",
        )
        sync(primary, replica)
        stats = replica.stats()
        assert stats["snapshots"] == 1 and stats["resyncs"] == 1 and stats["gaps"] == 0
        replica.close()


def test_a_gap_is_never_applied_and_ends_in_a_snapshot(closers: Closers) -> None:
    """A replica ahead of the primary is taken on trust (the primary may have restarted from
    an older point); when the points that follow do not follow its version, that is a gap."""
    primary = Primary(closers, keys=100)
    other = State({"x": 0})
    point = Point(0, None, {"in": primary.point.n + 5}, {}, at=1.0)
    replica = make_replica(closers, lambda: primary.sender.address, state=other, point=point)
    seen = []

    def watch() -> bool:
        seen.append((replica.state.version, dict(replica.state)))
        return converged(primary, replica)

    drive(primary, replica, watch, commit=True)
    stats = replica.stats()
    assert stats["gaps"] >= 1 and stats["nacks"] >= 1
    assert stats["resyncs"] == 1 and stats["snapshots"] == 1
    assert primary.sender.replicas()[0]["gaps"] >= 1
    # until the snapshot arrived the replica held its own state, untouched
    first = next(i for i, (v, _) in enumerate(seen) if v != 0)
    assert first > 0 and all(data == {"x": 0} for _, data in seen[:first])


def test_malformed_input_is_refused_and_the_sender_keeps_serving(closers: Closers) -> None:
    primary = Primary(closers, keys=100)
    replica = make_replica(closers, lambda: primary.sender.address)
    sync(primary, replica)
    digest = primary.state.digest()
    address = primary.sender.address

    def hello(nonce: bytes, **kw: Any) -> bytes:
        return wire.encode_bytes(wire.HELLO, hello_meta(nonce, **kw))

    good_meta = lambda nonce: pack(hello_meta(nonce))  # noqa: E731
    wrong_types = lambda nonce: pack({**hello_meta(nonce), "node": 5})  # noqa: E731
    cases: dict[str, tuple[Callable[[bytes], bytes], str | None]] = {
        "junk": (lambda nonce: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "protocol"),
        "oversize": (lambda nonce: raw_frame(wire.HELLO, b"", meta_len=1 << 30), "protocol"),
        "bad msgpack": (lambda nonce: raw_frame(wire.HELLO, b"\xc1\xc1\xc1"), "protocol"),
        "not a map": (lambda nonce: raw_frame(wire.HELLO, pack([1, 2, 3])), "protocol"),
        "wrong types": (lambda nonce: raw_frame(wire.HELLO, wrong_types(nonce)), "protocol"),
        "unknown type": (lambda nonce: raw_frame(99, good_meta(nonce)), "protocol"),
        "wrong version": (
            lambda nonce: raw_frame(wire.HELLO, good_meta(nonce), version=wire.VERSION + 1),
            "protocol",
        ),
        "ack first": (lambda nonce: raw_frame(wire.ACK, pack({"bytes": 0})), "protocol"),
        "wrong token": (lambda nonce: hello(nonce, token="guessed"), "auth"),
        "other stage": (lambda nonce: hello(nonce, stage="app/other"), "stage"),
        "payload on hello": (
            lambda nonce: raw_frame(wire.HELLO, good_meta(nonce), b"x" * 10),
            "protocol",
        ),
    }
    for name, (make, code) in cases.items():
        error, hung_up = raw_session(address, make)
        assert hung_up, f"{name}: the primary must hang up"
        assert error is not None and error["code"] == code, f"{name}: got {error}"
        primary.commit(3)  # the legitimate replica is served meanwhile
        replica.step(0.01)
    sync(primary, replica, commit=True, rounds=50)
    sync(primary, replica)
    assert [r["node"] for r in primary.sender.replicas()] == ["replica-1"]
    assert primary.sender.stats()["rejected_connections"] == len(cases)
    stats = replica.stats()
    assert stats["reconnects"] == 0 and stats["frames_rejected"] == 0 and stats["snapshots"] == 1
    assert digest != primary.state.digest()  # it kept committing; the replica kept up


def test_handshakes_are_bounded_in_time_and_number(closers: Closers) -> None:
    primary = Primary(closers, keys=10, handshake_timeout=0.3, max_pending=2)
    idle = [socket.create_connection(primary.sender.address, timeout=3) for _ in range(2)]
    for s in idle:
        closers.add(s.close)
    readers = [wire.FrameReader(wire.TO_REPLICA) for _ in idle]
    for s, reader in zip(idle, readers, strict=True):  # both got a CHALLENGE: both pending
        while (frame := reader.next()) is None:
            assert reader.recv_from(s) > 0
        assert frame.type == wire.CHALLENGE
    with socket.create_connection(primary.sender.address, timeout=3) as third:
        third_reader = wire.FrameReader(wire.TO_REPLICA)
        while (frame := third_reader.next()) is None:
            assert third_reader.recv_from(third) > 0
        assert frame.type == wire.ERROR and frame.meta["code"] == "busy"
    for s, reader in zip(idle, readers, strict=True):  # then both time out
        while (frame := reader.next()) is None:
            assert reader.recv_from(s) > 0
        assert frame.type == wire.ERROR and frame.meta["code"] == "timeout"
    replica = make_replica(closers, lambda: primary.sender.address)
    sync(primary, replica)
    assert primary.sender.stats()["rejected_connections"] == 3


@pytest.mark.parametrize("mode", ["bad_proof", "no_welcome"])
def test_the_replica_refuses_an_impostor_primary(closers: Closers, mode: str) -> None:
    impostor = Impostor(closers, mode)
    replica = make_replica(closers, lambda: impostor.address, backoff_max=0.02)
    deadline = time.monotonic() + 5
    for _ in range(500):
        replica.step(0.01)
        if impostor.sessions >= 3 or time.monotonic() > deadline:
            break
    assert impostor.sessions >= 3
    assert not replica.synced and replica.point is None and len(replica.state) == 0
    stats = replica.stats()
    assert stats["snapshots"] == 0 and stats["chunks"] == 0
    if mode == "bad_proof":
        assert stats["auth_failures"] >= 3
        assert impostor.errors and impostor.errors[0]["code"] == "auth"
    else:
        assert stats["frames_rejected"] >= 3


def test_a_replica_with_the_wrong_token_is_refused_and_told_why(closers: Closers) -> None:
    primary = Primary(closers, keys=10)
    replica = make_replica(closers, lambda: primary.sender.address, token="wrong", backoff_max=0.02)
    drive(primary, replica, lambda: replica.stats()["auth_failures"] >= 2)
    assert not replica.synced and replica.stats()["errors_received"] >= 2
    assert primary.sender.replicas() == []


def test_memory_stays_bounded_for_a_64_mib_state(closers: Closers) -> None:
    window = 1 << 20
    chunk = 256 << 10
    primary = Primary(
        closers, keys=1024, value_size=64 << 10, window_bytes=window, chunk_bytes=chunk
    )
    replica = make_replica(closers, lambda: primary.sender.address)
    drive(primary, replica, lambda: replica.synced, step=0.05, rounds=2000)
    assert replica.state.digest() == primary.state.digest()
    [info] = primary.sender.replicas()
    assert info["bytes_sent"] > 64 << 20
    assert 0 < info["inflight_high_water"] <= window
    assert info["max_frame_bytes"] <= min(wire.MAX_FRAME, 2 * chunk + wire.HEADER_SIZE + 1024)
    # the receive buffer is its configured size (two reads), whatever the state's size
    assert replica.stats()["buffer_peak"] <= 2 * replica.recv_bytes


def test_acked_wait_acked_and_lag(closers: Closers) -> None:
    primary = Primary(closers, keys=20)
    sender = primary.sender
    assert sender.acked("replica-1") is None
    assert not sender.wait_acked("replica-1", 1, 0.05)
    replica = make_replica(closers, lambda: sender.address)
    sync(primary, replica)
    assert sender.wait_acked("replica-1", primary.point.n, 5)
    assert sender.acked("replica-1") == primary.point.n
    [info] = sender.replicas()
    assert info["lag_points"] == 0 and info["lag_s"] == 0
    assert replica.lag()["lag_points"] == 0
    head = primary.point.n
    primary.commit(5)  # the replica does not read: the primary sees it 5 points behind
    [info] = sender.replicas()
    assert info["acked_n"] == head and info["lag_points"] == 5 and info["lag_s"] == 5.0
    assert not sender.wait_acked("replica-1", primary.point.n, 0.05)
    sync(primary, replica)
    assert sender.wait_acked("replica-1", primary.point.n, 5)
    [info] = sender.replicas()
    assert info["lag_points"] == 0 and info["lag_s"] == 0 and info["acked_n"] == primary.point.n
    assert replica.lag() == {
        "lag_points": 0,
        "lag_s": 0.0,
        "head_n": primary.point.n,
        "n": primary.point.n,
    }
    # acked() is kept across the replica's disconnection
    held_state, held_point = replica.state, replica.point
    replica.close()
    deadline = time.monotonic() + 5
    while sender.replicas()[0]["connected"] and time.monotonic() < deadline:
        sender.wait_acked("replica-1", primary.point.n + 1, 0.01)
    assert not sender.replicas()[0]["connected"]
    assert sender.acked("replica-1") == primary.point.n
    # ... and the same node resumes from what it holds, without a snapshot
    primary.commit(3)
    again = make_replica(closers, lambda: sender.address, state=held_state, point=held_point)
    sync(primary, again)
    assert again.stats()["snapshots"] == 0 and sender.replicas()[0]["snapshots_sent"] == 1


def test_a_primary_restarted_behind_the_replica_streams_only_newer_points(
    closers: Closers,
) -> None:
    first = Primary(closers, keys=50)
    first.commit(10)
    first.save()
    first.commit(10)
    primaries = [first]
    replica = make_replica(closers, lambda: primaries[-1].sender.address)
    sync(first, replica)
    ahead = replica.point.n  # type: ignore[union-attr]
    first.sender.close()
    # the stage restarts from its journal at an older point and regenerates the same points
    second = Primary(closers, keys=50, restart=first)
    primaries.append(second)
    assert second.point.n < ahead
    second.commit(25)
    sync(second, replica)
    stats = replica.stats()
    assert stats["snapshots"] == 1 and stats["gaps"] == 0 and stats["reconnects"] == 1
    assert replica.point.n > ahead  # type: ignore[union-attr]
    assert stats["duplicates"] == 0, "points the replica had were not sent again"
    assert second.sender.replicas()[0]["snapshots_sent"] == 0


def test_acks_are_coalesced_with_ack_every_s(closers: Closers) -> None:
    primary = Primary(closers, keys=20)
    replica = make_replica(closers, lambda: primary.sender.address, ack_every_s=0.05)
    sync(primary, replica)
    before = replica.stats()
    drive(primary, replica, lambda: primary.i >= 300, commit=True, step=0.001)
    sync(primary, replica)
    drive(primary, replica, lambda: primary.sender.acked("replica-1") == primary.point.n)
    stats = replica.stats()
    applied = stats["points_applied"] - before["points_applied"]
    acks = stats["acks_sent"] - before["acks_sent"]
    assert applied == 300 and acks < applied / 4, (acks, applied)


def test_heartbeats_keep_an_idle_link_and_silence_ends_a_dead_one(closers: Closers) -> None:
    primary = Primary(closers, keys=20, heartbeat_s=0.05)
    proxy = Proxy(closers, primary.sender.address)
    replica = make_replica(closers, lambda: proxy.address, silence_timeout=0.4)
    sync(primary, replica)
    idle_until = time.monotonic() + 1.0
    drive(primary, replica, lambda: time.monotonic() > idle_until, step=0.02, rounds=200)
    assert replica.connected and replica.stats()["reconnects"] == 0, "heartbeats kept it"
    proxy.flowing.clear()  # the link goes silent (the primary looks frozen)
    primary.commit(5)
    drive(primary, replica, lambda: not replica.connected, step=0.02, rounds=200)
    assert "silent" in replica.stats()["last_error"]
    proxy.flowing.set()
    sync(primary, replica)
    stats = replica.stats()
    assert stats["reconnects"] >= 1 and stats["snapshots"] == 1


def test_callbacks_run_before_the_ack_and_a_failing_one_is_sent_again(closers: Closers) -> None:
    """on_snapshot / on_point (the replica's journal) see each snapshot and point once, in
    order, before the primary can have it acknowledged; a callback that fails applies
    nothing and costs a reconnection, not a snapshot."""
    primary = Primary(closers, keys=50)
    snapshots: list[int] = []
    journal: list[int] = []
    failed: list[int] = []

    def not_acked_yet(n: int) -> None:
        acked = primary.sender.acked("replica-1")
        assert acked is None or acked < n, f"point {n} acknowledged before it was handed over"

    def on_snapshot(state: State, point: Point) -> None:
        not_acked_yet(point.n)
        assert state.version == point.version
        snapshots.append(point.n)

    def on_point(point: Point) -> None:
        not_acked_yet(point.n)
        if len(journal) == 20 and not failed:
            failed.append(point.n)
            raise OSError("journal disk full")
        journal.append(point.n)

    replica = make_replica(
        closers, lambda: primary.sender.address, on_snapshot=on_snapshot, on_point=on_point
    )
    sync(primary, replica)
    primary.commit(40)
    errors = []
    deadline = time.monotonic() + 10
    for _ in range(4000):
        try:
            replica.step(0.005)
        except OSError as err:
            errors.append(err)
            assert replica.point is not None and replica.point.n < failed[0], "nothing applied"
        primary.sender.poll(primary.state)
        if converged(primary, replica) or time.monotonic() > deadline:
            break
    assert converged(primary, replica)
    assert len(errors) == 1 and snapshots == [snapshots[0]]
    assert journal == [n for n in primary.published if n > snapshots[0]]
    assert failed[0] in journal
    stats = replica.stats()
    assert stats["snapshots"] == 1 and stats["reconnects"] == 1 and stats["gaps"] == 0


def test_publish_drops_a_point_that_does_not_advance(closers: Closers) -> None:
    primary = Primary(closers, keys=10)
    primary.commit(2)
    replica = make_replica(closers, lambda: primary.sender.address)
    sync(primary, replica)
    primary.sender.publish(primary.point, primary.state)  # same n again
    assert primary.sender.stats()["dropped_publishes"] == 1
    primary.commit(2)
    sync(primary, replica)


def test_close_leaves_no_thread_and_no_socket(closers: Closers) -> None:
    def sockets() -> set[str]:
        out = set()
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/self/fd/{fd}")
                if target.startswith("socket:"):
                    out.add(target)
        return out

    before = sockets()
    assert not state_threads()
    primary = Primary(closers, keys=50)
    replica = make_replica(closers, lambda: primary.sender.address)
    sync(primary, replica)
    stranger = socket.create_connection(primary.sender.address, timeout=3)
    closers.add(stranger.close)
    assert stranger.recv(1), "the stranger's connection is being served (its CHALLENGE)"
    assert len(state_threads()) >= 3  # acceptor, the replica's link, the stranger's
    address = primary.sender.address
    primary.sender.close()
    primary.sender.close()  # idempotent
    replica.close()
    stranger.close()
    assert not state_threads(), state_threads()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=1).close()
    assert sockets() <= before
    with pytest.raises(DpmigrateError, match="closed"):
        replica.step(0)


def test_the_chunker_never_packs_far_more_than_a_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a run of small items its guess of items per chunk is large; the large values that
    follow must not all be packed at once (that held the GIL for most of a second with a GiB
    of state, found on a real cluster), only about one chunk's worth."""
    from dpmigrate.statesync import sender as sender_mod

    big = bytes(64 << 10)
    data: dict[str, object] = {f"f:{i}": [i, i, i] for i in range(512)}
    data.update({f"b/{i:05d}": i.to_bytes(8, "little") + big[8:] for i in range(256)})
    packed: list[int] = []
    original = sender_mod._Chunker._pack

    def recording(part: list[tuple[str, object]]) -> tuple[list, int]:
        packed.append(sum(len(v) for _, v in part if isinstance(v, bytes)))
        return original(part)

    monkeypatch.setattr(sender_mod._Chunker, "_pack", staticmethod(recording))
    chunker, items = sender_mod._Chunker(data, 0, 1 << 20), 0
    while (chunk := chunker.next()) is not None:
        items += chunk[0]
    assert items == len(data)
    assert max(packed) <= (1 << 20) + len(big), max(packed)


def test_a_marking_primary_has_nothing_applied_past_its_safe_mark(closers: Closers) -> None:
    """With ``marks_safe`` (a primary whose outputs go to rings) the replica holds a snapshot
    and later points back, unapplied and unacknowledged, until the primary marks them safe;
    what it held back goes with the connection and is sent again. So a replica that takes
    over is never at a point whose outputs the consumers may not have."""
    primary = Primary(closers, keys=50, marks_safe=True)
    start = primary.point.n
    primary.commit(3)  # the snapshot's point: not safe yet
    replica = make_replica(closers, lambda: primary.sender.address)
    drive(primary, replica, lambda: replica.stats()["held_snapshot"], seconds=10)
    assert not replica.synced and replica.point is None
    assert primary.sender.acked("replica-1") is None  # nothing applied, nothing acked
    assert replica.stats()["safe_n"] == start

    primary.sender.mark_safe(primary.published[0])  # older than the snapshot: still held
    for _ in range(20):
        replica.step(0.005)
    assert not replica.synced and replica.stats()["held_snapshot"]

    primary.sender.mark_safe(primary.published[2])  # the snapshot's point
    drive(primary, replica, lambda: replica.synced)
    snapshot_n = primary.published[2]
    assert replica.point is not None and replica.point.n == snapshot_n
    assert primary.sender.wait_acked("replica-1", snapshot_n, 5)

    primary.commit(5)
    drive(primary, replica, lambda: replica.stats()["held_points"] == 5)
    assert replica.point.n == snapshot_n  # received, held back
    primary.sender.mark_safe(primary.published[5])
    drive(
        primary,
        replica,
        lambda: replica.point is not None and replica.point.n == primary.published[5],
    )
    assert replica.stats()["held_points"] == 2
    assert primary.sender.wait_acked("replica-1", primary.published[5], 5)
    assert primary.sender.acked("replica-1") == primary.published[5]  # never past the mark

    # A cut: the held-back points are dropped, and sent again after the reconnection.
    before = replica.stats()["connections"]
    assert replica._sock is not None
    replica._sock.shutdown(socket.SHUT_RDWR)
    drive(primary, replica, lambda: replica.stats()["connections"] > before)
    assert replica.point.n == primary.published[5]
    primary.sender.mark_safe(primary.point.n)
    sync(primary, replica)
    assert replica.stats()["held_points"] == 0 and replica.stats()["snapshots"] == 1
    assert replica.state.digest() == primary.state.digest()


def test_a_primary_that_marks_nothing_has_every_point_applied_at_once(closers: Closers) -> None:
    primary = Primary(closers, keys=20)
    replica = make_replica(closers, lambda: primary.sender.address)
    sync(primary, replica)
    primary.commit(4)
    sync(primary, replica)
    assert replica.stats()["safe_n"] is None and replica.stats()["held_points"] == 0
