"""Fuzz tests of the two binary wire decoders: the tcp ring's frames and statesync's wire.

Every decoder that reads bytes from a peer gets arbitrary bytes and mutated valid frames;
each must return or raise its module's one documented error type (frames.FrameError,
wire.WireError), never anything else, and never loop without consuming input. A live keyed
TcpSender is fuzzed at the socket: a stranger's bytes never change its state and never make
it raise. Case counts come from tests/fuzzing.py (2000 each in CI).
"""

from __future__ import annotations

import os
import socket
import struct
import time
import zlib

import msgpack
import pytest
from fuzzing import fuzz
from hypothesis import given
from hypothesis import strategies as st

from dpmigrate.statesync import wire
from dpmigrate.transports import frames as fr
from dpmigrate.transports import tcp
from dpmigrate.transports.resolver import MemoryResolver

# --------------------------------------------------------------------------- strategies

RING = "flows.in"
ALLOWED_SETS = [
    frozenset(fr.TYPE_NAMES),
    frozenset({fr.ACK, fr.CLOSE, fr.PING}),  # what a producer reads
    frozenset({fr.HELLO}),  # a pending connection
    frozenset({fr.CHALLENGE, fr.ERROR, fr.PING}),  # a consumer before its HELLO
    frozenset({fr.DATA, fr.CLOSE, fr.PING, fr.ERROR}),  # a consumer after WELCOME
]

u64 = st.integers(0, (1 << 64) - 1)
u32 = st.integers(0, (1 << 32) - 1)

valid_ring_frame = st.one_of(
    st.builds(fr.encode_challenge, st.binary(min_size=16, max_size=16)),
    st.builds(
        fr.encode_hello,
        st.from_regex(r"\A[A-Za-z0-9_.:\-]{1,128}\Z"),
        u64,
        u64,
        st.binary(min_size=16, max_size=16),
        st.binary(min_size=32, max_size=32),
    ),
    st.builds(fr.encode_welcome, u64, u64, u32, u32, u64, st.binary(min_size=32, max_size=32)),
    st.builds(fr.encode_data, u64, st.binary(max_size=300)),
    st.builds(fr.encode_ack, u64),
    st.builds(fr.encode_close, u64),
    st.builds(fr.encode_ping),
    st.builds(fr.encode_error, st.text(max_size=200)),
)


@st.composite
def mutated(draw: st.DrawFn, frames: st.SearchStrategy[bytes], most: int = 4) -> bytes:
    """A few valid frames joined, then bytes flipped, cut out, inserted, or the end torn."""
    data = bytearray(b"".join(draw(st.lists(frames, min_size=1, max_size=most))))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "delete", "insert", "truncate"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= draw(st.integers(1, 255))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 8))]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[i:]
    return bytes(data)


def drain_ring_reader(data: bytes, allowed: frozenset[int], limit: int) -> None:
    """Cut everything out of ``data``; only FrameError may escape, and every round must
    consume input or stop (no hang)."""
    r = fr.FrameReader(allowed, limit, size=4096)
    try:
        r.feed(data)
    except fr.FrameError as err:
        assert str(err)
        return
    cursor = 0
    for _ in range(len(data) + 2):
        before = r.pending
        try:
            out: list[bytes] = []
            cursor, _dups = r.take_data(out, cursor)
            frame = r.next_frame()
        except fr.FrameError as err:  # GapError included
            assert str(err), "an error must say what is wrong"
            return
        if frame is None:
            if r.pending == before and not out:
                return  # incomplete: waits for more bytes
            continue
        ftype, _seq, payload = frame
        assert ftype in allowed
        decode_ring_payload(ftype, payload)
    raise AssertionError("the reader neither finished nor consumed input")


def decode_ring_payload(ftype: int, payload: bytes) -> None:
    decoder = {
        fr.HELLO: fr.decode_hello,
        fr.WELCOME: fr.decode_welcome,
        fr.CHALLENGE: fr.decode_challenge,
        fr.ERROR: fr.decode_error,
    }.get(ftype)
    if decoder is None:
        return
    try:
        decoder(payload)
    except fr.FrameError as err:
        assert str(err)


# --------------------------------------------------------------------------- ring frames


@fuzz
@given(st.binary(max_size=2048), st.sampled_from(ALLOWED_SETS), st.integers(0, 4096))
def test_ring_reader_on_arbitrary_bytes(data: bytes, allowed: frozenset[int], limit: int):
    drain_ring_reader(data, allowed, limit)


@fuzz
@given(mutated(valid_ring_frame), st.sampled_from(ALLOWED_SETS), st.integers(0, 4096))
def test_ring_reader_on_mutated_frames(data: bytes, allowed: frozenset[int], limit: int):
    drain_ring_reader(data, allowed, limit)


@fuzz
@given(st.binary(max_size=400))
def test_ring_payload_decoders_on_arbitrary_bytes(payload: bytes) -> None:
    for ftype in (fr.HELLO, fr.WELCOME, fr.CHALLENGE, fr.ERROR):
        decode_ring_payload(ftype, payload)
    text = fr.decode_error(payload)
    assert all(ch.isprintable() for ch in text), "a peer's text must be made printable"


@fuzz
@given(mutated(valid_ring_frame))
def test_ring_payload_decoders_on_mutated_payloads(data: bytes) -> None:
    payload = data[fr.HEADER_SIZE :]
    for ftype in (fr.HELLO, fr.WELCOME, fr.CHALLENGE, fr.ERROR):
        decode_ring_payload(ftype, payload)


# --------------------------------------------------------------------------- statesync wire

scalar = (
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=12)
    | st.binary(max_size=40)
)
# Small on purpose: generating deep values, not decoding them, is what costs time here.
msgpack_value = st.recursive(
    scalar,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=4,
)
#: A field value: mostly a scalar, sometimes a positions-like map (what SCHEMAS expects).
field_value = scalar | st.dictionaries(st.text(max_size=6), st.integers(-1, 1 << 63), max_size=3)


def meta_for(ftype: int) -> st.SearchStrategy[dict]:
    """Maps with the schema's keys (so the field checks run) or arbitrary keys."""
    keys = list(wire.SCHEMAS[ftype])
    return st.fixed_dictionaries({k: field_value for k in keys}) | st.dictionaries(
        st.sampled_from([*keys, "extra"]), field_value, max_size=len(keys) + 1
    )


@st.composite
def wire_frame(draw: st.DrawFn) -> bytes:
    """A frame with intact checksums around arbitrary metadata and payload: the reader gets
    past the crc checks to the msgpack and schema decoding."""
    ftype = draw(st.sampled_from(sorted(wire.TYPE_NAMES)))
    if draw(st.booleans()):
        meta = msgpack.packb(draw(meta_for(ftype)), use_bin_type=True)
    else:
        meta = draw(st.binary(max_size=200))
    payload = draw(st.binary(max_size=200)) if ftype in wire.WITH_PAYLOAD else b""
    body = meta + payload
    head = struct.pack("!HBBIII", wire.MAGIC, wire.VERSION, ftype, len(meta), len(payload),
                       zlib.crc32(body))  # fmt: skip
    return head + struct.pack("!I", zlib.crc32(head)) + body


def drain_wire_reader(data: bytes, allowed: frozenset[int]) -> None:
    r = wire.FrameReader(allowed, max_meta=4096, max_payload=4096, size=4096)
    r.feed(data)
    for _ in range(len(data) + 2):
        before = r.pending
        try:
            frame = r.next()
        except wire.FramingError as err:
            assert str(err)
            return  # the framing is lost: the connection would be dropped
        except wire.WireError as err:  # ChecksumError or bad contents: the frame was skipped
            assert str(err)
            assert r.pending < before, "a skipped frame must be consumed"
            continue
        if frame is None:
            return
        assert frame.type in allowed
        decode_wire_payload(frame)
    raise AssertionError("the reader neither finished nor consumed input")


def decode_wire_payload(frame: wire.Frame) -> None:
    try:
        if frame.type == wire.CHUNK:
            wire.decode_items(frame.payload, frame.meta["count"])
        elif frame.type == wire.POINT:
            wire.decode_point(frame.meta, frame.payload)
    except wire.WireError as err:
        assert str(err)


WIRE_SETS = [frozenset(wire.TYPE_NAMES), wire.TO_REPLICA, wire.TO_PRIMARY]


@fuzz
@given(st.binary(max_size=2048), st.sampled_from(WIRE_SETS))
def test_wire_reader_on_arbitrary_bytes(data: bytes, allowed: frozenset[int]) -> None:
    drain_wire_reader(data, allowed)


@fuzz
@given(st.lists(wire_frame(), min_size=1, max_size=2), st.sampled_from(WIRE_SETS))
def test_wire_reader_on_checksummed_arbitrary_frames(parts: list[bytes], allowed) -> None:
    drain_wire_reader(b"".join(parts), allowed)


@fuzz
@given(mutated(wire_frame(), most=2), st.sampled_from(WIRE_SETS))
def test_wire_reader_on_mutated_frames(data: bytes, allowed: frozenset[int]) -> None:
    drain_wire_reader(data, allowed)


@fuzz
@given(st.sampled_from(sorted(wire.TYPE_NAMES)).flatmap(lambda t: st.tuples(st.just(t),
       meta_for(t) | msgpack_value)))  # fmt: skip
def test_check_meta_on_arbitrary_maps(case: tuple[int, object]) -> None:
    ftype, meta = case
    try:
        wire.check_meta(ftype, meta)
    except wire.WireError as err:
        assert str(err)


@fuzz
@given(st.binary(max_size=600) | msgpack_value.map(lambda v: msgpack.packb(v, use_bin_type=True)),
       st.integers(0, 8))  # fmt: skip
def test_chunk_items_decoder(payload: bytes, count: int) -> None:
    try:
        items = wire.decode_items(memoryview(payload), count)
    except wire.WireError as err:
        assert str(err)
    else:
        assert len(items) == count and all(type(k) is str for k in items)


@fuzz
@given(
    st.binary(max_size=600)
    | msgpack_value.map(lambda v: msgpack.packb(v, use_bin_type=True))
    | st.tuples(st.integers(0, 5), st.dictionaries(st.text(max_size=5), msgpack_value,
                max_size=3), st.lists(msgpack_value, max_size=3)).map(
        lambda t: msgpack.packb(list(t), use_bin_type=True)),
    st.integers(0, 5),
    st.booleans(),
)  # fmt: skip
def test_point_decoder(payload: bytes, version: int, delta: bool) -> None:
    meta = {"version": version, "seq": 1, "at": 1.0, "inputs": {"in": 3}, "outputs": {},
            "delta": delta}  # fmt: skip
    try:
        wire.decode_point(meta, memoryview(payload))
    except wire.WireError as err:
        assert str(err)


# --------------------------------------------------------------------------- a live producer

KEY = os.urandom(fr.KEY_SIZE)


@pytest.fixture(scope="module")
def live_pair():
    """One keyed producer with an adopted consumer and a few unacked messages, shared by
    every example (a fresh pair per example would dominate the run time)."""
    resolver = MemoryResolver()
    tx = tcp.open_sender(RING, resolver=resolver, capacity=64, reconnect_timeout=5.0, key=KEY)
    rx = tcp.open_receiver(RING, resolver=resolver, key=KEY, reconnect_timeout=5.0,
                           connect_timeout=5.0, auto_commit=False)  # fmt: skip
    for i in range(5):
        tx.send(b"m%d" % i, timeout=5)
    deadline = time.monotonic() + 10
    got: list[bytes] = []
    while len(got) < 5:
        assert time.monotonic() < deadline, "the keyed pair did not connect"
        tx.service(0.001)
        got += rx.recv_burst(8, timeout=0.01)
    rx.commit(2)
    while tx.acked < 2:
        assert time.monotonic() < deadline
        tx.service(0.001)
    yield tx, rx
    rx.detach()
    tx.detach()


def _state(tx: tcp.TcpSender) -> tuple[object, ...]:
    return (tx.next_seq, tx._acked, tx._conn, tx._conn_peer, tx._consumer_generation,
            tx._skip, len(tx._retained), tx._error)  # fmt: skip


forged_answer = st.one_of(
    st.binary(max_size=300),
    mutated(valid_ring_frame),
    st.tuples(u64, u64, st.binary(min_size=32, max_size=32)).map(
        lambda t: fr.encode_hello(RING, t[0], t[1], os.urandom(16), t[2])
    ),
)


@fuzz
@given(data=forged_answer)
def test_a_strangers_bytes_never_change_a_live_producer(live_pair, data: bytes) -> None:
    tx, _rx = live_pair
    before = _state(tx)
    rejected = tx.statistics().extra["rejected_connections"]
    host, port = tx.address.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=5)
    try:
        tx.service(0)  # accept and CHALLENGE (the stranger reads it: its close is then a FIN)
        s.settimeout(5)
        challenge = s.recv(64)
        assert challenge.startswith(fr.header(fr.CHALLENGE, 0, fr.NONCE_SIZE))
        if data:
            s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + 5
        while tx.statistics().extra["rejected_connections"] == rejected or tx._pending:
            assert time.monotonic() < deadline, "the stranger's connection was never closed"
            tx.service(0.002)
    finally:
        s.close()
    assert _state(tx) == before
    assert tx.statistics().extra["refused_consumers"] == 0
