"""The tcp ring's wire format, and what both tcp ends do with malformed or hostile input.

The cross-transport behaviour (order, backpressure, close, peer death) is covered by the
conformance kit; here are the byte-level checks only tcp has: the frame layout, the reader's
validation, and real ring ends facing a fake peer that speaks raw bytes.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
import time

import pytest

from dpmigrate.errors import ProtocolError, RingBroken
from dpmigrate.transports import frames as fr
from dpmigrate.transports import tcp
from dpmigrate.transports.resolver import Endpoint, MemoryResolver

ALL_TYPES = frozenset(fr.TYPE_NAMES)
V = fr.VERSION
CONSUMER_SIDE = frozenset({fr.WELCOME, fr.DATA, fr.CLOSE, fr.PING, fr.ERROR})


def reader(allowed: frozenset[int] = ALL_TYPES, limit: int = 1024) -> fr.FrameReader:
    return fr.FrameReader(allowed, limit, size=8192)


def raw_header(magic: bytes, version: int, ftype: int, seq: int, length: int) -> bytes:
    return magic + bytes([version, ftype]) + struct.pack("!QI", seq, length)


# --- layout and round trips ---------------------------------------------------------------


def test_header_layout_is_fixed_and_big_endian() -> None:
    frame = fr.encode_data(0x0102030405060708, b"abc")
    assert fr.HEADER_SIZE == 16
    assert frame == b"DR\x02\x03" + bytes.fromhex("0102030405060708") + b"\x00\x00\x00\x03abc"


@pytest.mark.parametrize(
    "frame, expected",
    [
        (fr.encode_ack(77), (fr.ACK, 77, b"")),
        (fr.encode_close(9), (fr.CLOSE, 9, b"")),
        (fr.encode_ping(), (fr.PING, 0, b"")),
        (fr.encode_data(5, b""), (fr.DATA, 5, b"")),
        (fr.encode_error("no"), (fr.ERROR, 0, b"no")),
    ],
)
def test_simple_frames_round_trip(frame: bytes, expected: tuple[int, int, bytes]) -> None:
    r = reader()
    r.feed(frame)
    assert r.next_frame() == expected
    assert r.next_frame() is None and r.pending == 0


def test_hello_and_welcome_round_trip() -> None:
    nonce, proof = os.urandom(fr.NONCE_SIZE), os.urandom(fr.PROOF_SIZE)
    r = reader()
    r.feed(
        fr.encode_challenge(nonce)
        + fr.encode_hello("ring-a.1", 42, 3, nonce, proof)
        + fr.encode_welcome(10, 7, 64, 1 << 20, 50, proof)
    )
    ftype, seq, payload = r.next_frame()
    assert (ftype, seq, fr.decode_challenge(payload)) == (fr.CHALLENGE, 0, nonce)
    ftype, seq, payload = r.next_frame()
    assert (ftype, seq, fr.decode_hello(payload)) == (fr.HELLO, 42, (3, nonce, proof, "ring-a.1"))
    ftype, seq, payload = r.next_frame()
    assert (ftype, seq, fr.decode_welcome(payload)) == (
        fr.WELCOME,
        10,
        (7, 64, 1 << 20, 50, proof),
    )


def test_proofs_depend_on_every_bound_field() -> None:
    key, pn, cn = b"k" * 32, b"p" * 16, b"c" * 16
    base = fr.consumer_proof(key, "r", pn, cn, 1, 2)
    assert base == fr.consumer_proof(key, "r", pn, cn, 1, 2)
    variants = [
        fr.consumer_proof(b"K" * 32, "r", pn, cn, 1, 2),
        fr.consumer_proof(key, "s", pn, cn, 1, 2),
        fr.consumer_proof(key, "r", cn, pn, 1, 2),
        fr.consumer_proof(key, "r", pn, cn, 2, 2),
        fr.consumer_proof(key, "r", pn, cn, 1, 3),
    ]
    welcome = fr.Welcome(1, 8, 1024, 2, b"")
    producer = fr.producer_proof(key, "r", pn, cn, 1, 2, 0, welcome)
    variants += [
        producer,
        fr.producer_proof(key, "r", pn, cn, 1, 2, 0, welcome._replace(capacity=9)),
    ]
    assert len({base, *variants}) == len(variants) + 1, "a field change must change the proof"


def test_reader_waits_for_a_frame_fed_byte_by_byte() -> None:
    frame = fr.encode_data(0, b"x" * 100)
    r = reader()
    for byte in frame[:-1]:
        r.feed(bytes([byte]))
        assert r.next_frame() is None
    r.feed(frame[-1:])
    assert r.next_frame() == (fr.DATA, 0, b"x" * 100)


def test_take_data_delivers_in_order_and_drops_duplicates() -> None:
    r = reader()
    for seq in (3, 4, 3, 4, 5):
        r.feed(fr.encode_data(seq, b"m%d" % seq))
    r.feed(fr.encode_close(6))
    out: list[bytes] = []
    assert r.take_data(out, 3) == (6, 2)
    assert out == [b"m3", b"m4", b"m5"]
    assert r.next_frame() == (fr.CLOSE, 6, b""), "take_data must stop at a control frame"


def test_write_data_writes_the_frames_encode_data_would() -> None:
    a, b = socket.socketpair()
    try:
        payloads = [b"x", b"", b"yz" * 100]
        sent = fr.write_data(a.fileno(), 7, payloads)
        expected = b"".join(fr.encode_data(7 + i, p) for i, p in enumerate(payloads))
        assert sent == len(expected) == 3 * fr.HEADER_SIZE + 201
        assert b.recv(4096) == expected
    finally:
        a.close()
        b.close()


def test_write_data_takes_what_the_socket_takes_and_checks_its_arguments() -> None:
    a, b = socket.socketpair()
    try:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        big = [bytes([i]) * 4096 for i in range(64)]
        sent = fr.write_data(a.fileno(), 0, big)
        assert 0 < sent < 64 * (4096 + fr.HEADER_SIZE), "a full socket takes part of a burst"
        with pytest.raises(BlockingIOError):
            fr.write_data(a.fileno(), 64, big)
        with pytest.raises(ValueError, match="at most"):
            fr.write_data(a.fileno(), 0, [b"x"] * (fr.WRITE_MAX + 1))
        with pytest.raises(TypeError, match="payload 1 is not bytes"):
            fr.write_data(a.fileno(), 0, [b"x", bytearray(b"y")])
    finally:
        a.close()
        b.close()
    with pytest.raises(OSError) as err:
        fr.write_data(1 << 20, 0, [b"x"])  # no such descriptor
    assert err.value.errno == errno.EBADF


def test_a_partly_written_burst_is_queued_and_arrives_whole(
    resolver: MemoryResolver, monkeypatch: pytest.MonkeyPatch
) -> None:
    returned: list[tuple[int, int]] = []
    real = fr.write_data

    def recording(fd: int, seq: int, payloads: list[bytes]) -> int:
        sent = real(fd, seq, payloads)
        returned.append((sent, sum(map(len, payloads)) + fr.HEADER_SIZE * len(payloads)))
        return sent

    monkeypatch.setattr(fr, "write_data", recording)
    tx = tcp.open_sender("partial", resolver=resolver, capacity=1024, sockbuf=16384)
    rx = consumer(resolver, "partial")
    try:
        assert rx.recv_burst(1, timeout=0.05) == []  # HELLO on its way
        deadline = time.monotonic() + 10
        while not tx.statistics().extra.get("connected") and time.monotonic() < deadline:
            tx.service(0.01)
        sent = [bytes([i % 251]) * 4096 + i.to_bytes(4, "big") for i in range(256)]
        for i in range(0, 256, 32):  # the consumer reads nothing meanwhile
            assert tx.send_burst(sent[i : i + 32], timeout=1) == 32
        assert any(0 <= got < want for got, want in returned), "no direct write was partial"
        got: list[bytes] = []
        while len(got) < 256 and time.monotonic() < deadline:
            tx.service(0)
            got += [bytes(v) for v in rx.recv_views(64, timeout=0.05)]
        assert got == sent
    finally:
        rx.close()
        tx.close()


def test_take_views_cuts_views_of_the_buffer_and_stops_after_max_n() -> None:
    r = reader()
    for seq in range(5):
        r.feed(fr.encode_data(seq, b"v%d" % seq))
    out: list[memoryview] = []
    assert r.take_views(out, 0, 3) == (3, 0, 6)
    assert [bytes(v) for v in out] == [b"v0", b"v1", b"v2"]
    assert all(v.readonly and v.obj is r.buf for v in out), "views of the buffer, not copies"
    for v in out:
        v.release()
    out = []
    assert r.take_views(out, 3, 10) == (5, 0, 4)
    assert [bytes(v) for v in out] == [b"v3", b"v4"]


def test_the_c_cutter_checks_its_range_and_its_arguments() -> None:
    from dpmigrate.native import _frames

    buf = bytearray(fr.encode_data(0, b"x"))
    with pytest.raises(ValueError, match="bad range"):
        _frames.cut_data(buf, None, 0, len(buf) + 1, 0, 1, 64, fr.DATA_WORD, [])
    with pytest.raises(ValueError, match="bad range"):
        _frames.cut_data(buf, None, 5, 4, 0, 1, 64, fr.DATA_WORD, [])
    with pytest.raises(TypeError):
        _frames.cut_data(buf, None, 0, len(buf), 0, 1, 64, fr.DATA_WORD, ())  # not a list
    out: list[bytes] = []
    assert _frames.cut_data(buf, None, 0, len(buf), 0, 0, 64, fr.DATA_WORD, out)[:4] == (0, 0, 0, 0)
    assert out == [], "max_n=0 cuts nothing"


def test_a_failing_cut_leaves_the_output_and_the_position_as_they_were() -> None:
    """A payload that cannot be cut midway (its slice fails) must not leave half a batch in
    the caller's list: the position did not move, so those frames would be cut twice."""
    from dpmigrate.native import _frames

    buf = bytearray(b"".join(fr.encode_data(seq, b"m%d" % seq) for seq in range(3)))

    class FailsOnTheSecondSlice:
        calls = 0

        def __getitem__(self, where: slice) -> bytes:
            self.calls += 1
            if self.calls == 2:
                raise MemoryError("injected")
            return bytes(buf[where])

    src = FailsOnTheSecondSlice()
    out: list = ["earlier"]
    with pytest.raises(MemoryError, match="injected"):
        _frames.cut_data(buf, src, 0, len(buf), 0, 8, 64, fr.DATA_WORD, out)
    assert src.calls == 2, "the fault must have hit after one payload was cut"
    assert out == ["earlier"]


# --- malformed input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, words",
    [
        (raw_header(b"GE", V, fr.DATA, 0, 0), "bad magic"),
        (
            raw_header(b"DR", 1, fr.DATA, 0, 0),
            r"unsupported protocol version 1 \(this end speaks 2\)",
        ),
        (raw_header(b"DR", V, 99, 0, 0), "unknown frame type 99"),
        (raw_header(b"DR", V, fr.DATA, 0, 1025), "1025 bytes, above the limit of 1024"),
        (raw_header(b"DR", V, fr.ACK, 0, 1), "ACK frame announces a payload of 1 bytes"),
        (raw_header(b"DR", V, fr.HELLO, 0, 5000), "HELLO frame announces a payload"),
        (raw_header(b"DR", V, fr.CHALLENGE, 0, 17), "CHALLENGE frame announces a payload"),
        (b"GET / HTTP/1.1\r\n", "bad magic"),
    ],
)
def test_bad_headers_are_frame_errors(data: bytes, words: str) -> None:
    r = reader()
    r.feed(data)
    with pytest.raises(fr.FrameError, match=words):
        r.next_frame()


def test_oversized_length_is_refused_before_the_payload_arrives() -> None:
    r = reader(limit=1024)
    r.feed(raw_header(b"DR", V, fr.DATA, 0, 0xFFFFFFFF))  # no payload follows
    with pytest.raises(fr.FrameError, match="above the limit"):
        r.take_data([], 0)


def test_a_type_not_allowed_in_this_direction_is_refused() -> None:
    r = reader(allowed=CONSUMER_SIDE)
    r.feed(fr.encode_ack(1))
    with pytest.raises(fr.FrameError, match="unexpected ACK frame"):
        r.next_frame()


def test_a_data_gap_is_an_error_that_keeps_what_came_before() -> None:
    r = reader()
    r.feed(fr.encode_data(0, b"a") + fr.encode_data(2, b"c"))
    out: list[bytes] = []
    with pytest.raises(fr.GapError, match="gap of 1 messages") as info:
        r.take_data(out, 0)
    assert out == [b"a"] and info.value.cursor == 1


HELLO_FIXED = struct.pack("!Q16s32s", 0, b"", b"")


@pytest.mark.parametrize(
    "payload, words",
    [
        (HELLO_FIXED, "too short"),
        (HELLO_FIXED + b"../etc/passwd", "invalid ring name"),
        (HELLO_FIXED + b"a\x00b", "invalid ring name"),
        (HELLO_FIXED + b"x" * 129, "invalid ring name"),
    ],
)
def test_bad_hello_payloads(payload: bytes, words: str) -> None:
    with pytest.raises(fr.FrameError, match=words):
        fr.decode_hello(payload)


@pytest.mark.parametrize(
    "payload, words",
    [
        (b"\x00" * 10, "expected 56"),
        (struct.pack("!QIIQ32s", 0, 0, 10, 0, b""), "capacity of 0"),
        (struct.pack("!QIIQ32s", 0, 8, 0xFFFFFFFF, 0, b""), "above the sane bound"),
    ],
)
def test_bad_welcome_payloads(payload: bytes, words: str) -> None:
    with pytest.raises(fr.FrameError, match=words):
        fr.decode_welcome(payload)


def test_error_text_from_a_peer_is_made_printable() -> None:
    assert fr.decode_error(b"bad\x1b[2Jthing\xff") == "bad?[2Jthing\ufffd"


# --- real ends facing raw bytes -----------------------------------------------------------


class FakeProducer:
    """A listening socket registered as a tcp ring's producer that replies with raw bytes
    (after a CHALLENGE, which a consumer waits for before it says HELLO)."""

    def __init__(self, resolver: MemoryResolver, ring: str, replies: list[bytes]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        host, port = self.listener.getsockname()
        resolver.register(ring, Endpoint("tcp", f"{host}:{port}", 0))
        self.hellos: list[tuple[int, int, str]] = []
        self.replies = list(replies)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        """Answer one connection per scripted reply: read HELLO, send the reply, close."""
        for reply in self.replies:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                conn.sendall(fr.encode_challenge(os.urandom(fr.NONCE_SIZE)))
                r = fr.FrameReader(frozenset({fr.HELLO}), 0)
                frame = None
                while frame is None:
                    if r.recv_from(conn) == 0:
                        break
                    frame = r.next_frame()
                if frame is not None:
                    hello = fr.decode_hello(frame[2])
                    self.hellos.append((frame[1], hello.generation, hello.ring))
                conn.sendall(reply)
                time.sleep(0.05)  # let the consumer read before our close

    def close(self) -> None:
        self.listener.close()
        self.thread.join(10)


def welcome(first: int = 0, next_seq: int = 100, max_message: int = 1024) -> bytes:
    return fr.encode_welcome(first, 1, 16, max_message, next_seq)


@pytest.fixture
def resolver() -> MemoryResolver:
    return MemoryResolver()


def consumer(resolver: MemoryResolver, ring: str, **kw) -> tcp.TcpReceiver:
    kw.setdefault("reconnect_timeout", 2.0)
    return tcp.open_receiver(ring, resolver=resolver, connect_timeout=5.0, **kw)


@pytest.mark.parametrize(
    "reply, words",
    [
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "bad magic"),
        (welcome() + raw_header(b"DR", 7, fr.DATA, 0, 0), "unsupported protocol version 7"),
        (welcome() + raw_header(b"DR", V, 42, 0, 0), "unknown frame type 42"),
        (welcome() + raw_header(b"DR", V, fr.DATA, 0, 1025), "above the limit of 1024"),
        (welcome() + fr.encode_data(0, b"a") + fr.encode_data(5, b"f"), "gap of 4"),
        (fr.encode_data(0, b"early"), "unexpected DATA frame"),
        (welcome(first=0, next_seq=0) + fr.encode_close(3), "CLOSE after seq 2"),
        (welcome(first=5, next_seq=9), "gap that cannot be resent"),
        (welcome(max_message=2 << 20), "open the receiver with max_message=2097152"),
        (fr.encode_error("go away"), "refused this consumer: ring"),
    ],
)
def test_consumer_raises_protocol_error_naming_ring_and_peer(
    resolver: MemoryResolver, reply: bytes, words: str
) -> None:
    fake = FakeProducer(resolver, "victim", [reply])
    rx = consumer(resolver, "victim")
    try:
        with pytest.raises(ProtocolError) as info:
            for _ in range(50):
                rx.recv_burst(8, timeout=0.2)
        text = str(info.value)
        assert "'victim'" in text and "127.0.0.1:" in text, text
        assert words in text or (words == "refused this consumer: ring" and "go away" in text)
    finally:
        rx.close()
        fake.close()


def test_consumer_keeps_raising_while_the_peer_keeps_sending_garbage(
    resolver: MemoryResolver,
) -> None:
    fake = FakeProducer(resolver, "garbage", [b"\xff" * 64] * 3)
    rx = consumer(resolver, "garbage")
    try:
        for _ in range(3):
            with pytest.raises(ProtocolError, match="bad magic"):
                rx.recv(timeout=2.0)
    finally:
        rx.close()
        fake.close()
    assert len(fake.hellos) == 3, "each call must have reconnected and said HELLO again"


def test_truncated_frame_is_a_broken_link_then_a_resend(resolver: MemoryResolver) -> None:
    full = fr.encode_data(0, b"zero") + fr.encode_data(1, b"one")
    fake = FakeProducer(
        resolver,
        "torn",
        [
            welcome() + fr.encode_data(0, b"zero") + fr.encode_data(1, b"one")[:10],
            welcome() + full + fr.encode_data(2, b"two"),  # the resend from next_expected=1
        ],
    )
    rx = consumer(resolver, "torn")
    try:
        got: list[bytes] = []
        deadline = time.monotonic() + 10
        while len(got) < 3 and time.monotonic() < deadline:
            got += rx.recv_burst(8, timeout=0.5)
        assert got == [b"zero", b"one", b"two"]
        stats = rx.statistics()
        assert stats.duplicates_dropped == 1 and stats.reconnects == 1
    finally:
        rx.close()
        fake.close()
    assert [h[0] for h in fake.hellos] == [0, 1], "the second HELLO must say next_expected=1"


def test_consumer_gives_up_with_ring_broken_when_the_producer_vanishes(
    resolver: MemoryResolver,
) -> None:
    fake = FakeProducer(resolver, "gone", [welcome() + fr.encode_data(0, b"only")])
    rx = consumer(resolver, "gone", reconnect_timeout=0.5)
    assert rx.recv(timeout=5) == b"only"
    fake.close()
    start = time.monotonic()
    with pytest.raises(RingBroken, match="'gone'"):
        rx.recv(timeout=None)
    assert time.monotonic() - start < 3
    rx.close()


def _hello_client(port: int, data: bytes) -> bytes:
    """Connect to a producer, send ``data``, return whatever comes back before EOF."""
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        while True:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


REFUSAL = fr.encode_error(fr.REFUSED_TEXT)


def _serve_until(tx: tcp.TcpSender, done: threading.Event) -> None:
    """The producer only does I/O inside its calls: keep calling while a client talks."""
    while not done.is_set():
        _ = tx.acked
        time.sleep(0.001)


@pytest.mark.parametrize(
    "data, words",
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", REFUSAL),
        (fr.encode_hello("someone-else", 0, 0), REFUSAL),
        (fr.encode_ack(3), REFUSAL),
        (raw_header(b"DR", V, fr.HELLO, 0, 0xFFFFFF), REFUSAL),
        (b"", b""),  # connects and hangs up at once
    ],
)
def test_producer_rejects_bad_clients_and_keeps_serving(
    resolver: MemoryResolver, data: bytes, words: bytes
) -> None:
    tx = tcp.open_sender("served", resolver=resolver, capacity=8, reconnect_timeout=2.0)
    port = int(tx.address.rsplit(":", 1)[1])
    done = threading.Event()
    server = threading.Thread(target=_serve_until, args=(tx, done))
    server.start()
    try:
        reply = _hello_client(port, data)
    finally:
        done.set()
        server.join()
    try:
        assert reply.startswith(fr.header(fr.CHALLENGE, 0, fr.NONCE_SIZE)), reply[:16]
        assert reply[16 + fr.NONCE_SIZE :] == words
        assert b"served" not in reply, "a refusal before the HELLO is accepted names no ring"
        deadline = time.monotonic() + 5
        while tx.statistics().extra["rejected_connections"] < 1:
            assert time.monotonic() < deadline, "the bad client was not counted"
            _ = tx.acked
            time.sleep(0.01)
        # The producer still works for its real consumer.
        rx = consumer(resolver, "served")
        tx.send(b"still here", timeout=5)
        assert rx.recv(timeout=5) == b"still here"
        rx.close()
    finally:
        tx.close()


def test_producer_refuses_a_consumer_asking_for_a_gap_and_carries_on(
    resolver: MemoryResolver,
) -> None:
    """The gap is the consumer's bug: that consumer is told (with the window), the producer
    counts it and does not raise."""
    tx = tcp.open_sender("gappy", resolver=resolver, capacity=8, reconnect_timeout=2.0)
    tx.send(b"a", timeout=1)
    rx = consumer(resolver, "gappy", next_expected=5)
    done = threading.Event()
    server = threading.Thread(target=_serve_until, args=(tx, done))
    server.start()
    try:
        with pytest.raises(ProtocolError, match=r"gappy.*expects seq 5.*retains only 0 .. 0"):
            rx.recv(timeout=5)
    finally:
        done.set()
        server.join()
        rx.close()
    try:
        extra = tx.statistics().extra
        assert extra["refused_consumers"] == 1 and "expects seq 5" in extra["last_refusal"]
        tx.send_burst([b"b"], timeout=0)  # does not raise
        assert (tx.next_seq, tx.acked) == (2, 0)
    finally:
        tx.close()


def test_producer_drops_a_consumer_that_sends_garbage_and_says_so(
    resolver: MemoryResolver,
) -> None:
    tx = tcp.open_sender("noisy", resolver=resolver, capacity=8, reconnect_timeout=2.0)
    rx = consumer(resolver, "noisy")
    try:
        tx.send(b"one", timeout=1)
        assert rx.recv(timeout=5) == b"one"
        assert rx._sock is not None
        rx._sock.send(b"\x00" * 16)  # corrupt the consumer's side of the stream
        with pytest.raises(ProtocolError, match=r"'noisy': consumer 127\.0\.0\.1:\d+ .*bad magic"):
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                tx.send_burst([], timeout=0)
                time.sleep(0.01)
        # The consumer reconnects and nothing is lost.
        tx.send(b"two", timeout=1)
        got = []
        deadline = time.monotonic() + 5
        while len(got) < 1 and time.monotonic() < deadline:
            got += rx.recv_burst(8, timeout=0.2)
            _ = tx.acked
        assert got == [b"two"]
    finally:
        rx.close()
        tx.close()
