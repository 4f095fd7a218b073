"""Authenticated tcp rings: the probe's findings reproduced, then refused.

The probe (3 nodes, flows app) found: (1) a client that reaches a producer's port and sends a
HELLO with a large generation was adopted as the consumer, received real messages and acked
them away, and the real consumer was refused as "older"; (2) a HELLO with an out-of-window
next_expected made the producer raise, and refusals told a stranger the window, the next seq
and the ring's name. Each test first shows its fault happened (the stranger's bytes reached
the producer and were answered), then that the keyed ring refused it and kept serving the
real consumer, every message once and in order. Real TCP on loopback only.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Callable

import pytest

from dpmigrate.errors import ProtocolError
from dpmigrate.transports import frames as fr
from dpmigrate.transports import tcp
from dpmigrate.transports.resolver import Endpoint, MemoryResolver

BOUND_S = 20.0
KEY = os.urandom(fr.KEY_SIZE)
OTHER_KEY = os.urandom(fr.KEY_SIZE)
CHALLENGE_SIZE = fr.HEADER_SIZE + fr.NONCE_SIZE
REFUSAL = fr.encode_error(fr.REFUSED_TEXT)


def msg(i: int) -> bytes:
    return b"m%08d" % i


class Producer(threading.Thread):
    """Owns the TcpSender (it is not thread-safe): sends ``count`` messages, calling
    ``hook(i)`` after each, then keeps serving until stopped. Records any exception."""

    def __init__(
        self, tx: tcp.TcpSender, count: int, hook: Callable[[int], None] | None = None
    ) -> None:
        super().__init__(daemon=True)
        self.tx, self.count, self.hook = tx, count, hook
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for i in range(self.count):
                self.tx.send(msg(i), timeout=BOUND_S)
                if self.hook is not None:
                    self.hook(i)
            while not self.stop.is_set():
                self.tx.service(0.005)
        except BaseException as err:  # reported by finish()
            self.error = err

    def finish(self) -> None:
        self.stop.set()
        self.join(BOUND_S)
        assert not self.is_alive(), "the producer thread did not stop"
        assert self.error is None, f"the producer raised: {self.error!r}"


def receive(rx: tcp.TcpReceiver, count: int, got: list[bytes] | None = None) -> list[bytes]:
    got = [] if got is None else got
    deadline = time.monotonic() + BOUND_S
    while len(got) < count:
        assert time.monotonic() < deadline, f"only {len(got)} of {count} messages arrived"
        got += rx.recv_burst(256, timeout=0.5)
    return got


def port_of(tx: tcp.TcpSender) -> int:
    return int(tx.address.rsplit(":", 1)[1])


def read_until_eof(s: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = s.recv(65536)
        except (TimeoutError, ConnectionError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def recv_exact(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def stranger(port: int, answer: Callable[[bytes], bytes]) -> tuple[bytes, bytes]:
    """Connect, read the CHALLENGE, send ``answer(producer nonce)``; return the CHALLENGE
    and everything the producer said after it, up to its hang-up."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.settimeout(5)
        challenge = recv_exact(s, CHALLENGE_SIZE)
        assert challenge[:16] == fr.header(fr.CHALLENGE, 0, fr.NONCE_SIZE), challenge
        s.sendall(answer(challenge[16:]))
        return challenge, read_until_eof(s)


def frames_of(data: bytes) -> list[tuple[int, int, bytes]]:
    r = fr.FrameReader(frozenset(fr.TYPE_NAMES), 1 << 20, size=1 << 21)
    r.feed(data)
    out = []
    while (frame := r.next_frame()) is not None:
        out.append(frame)
    return out


@pytest.fixture
def resolver() -> MemoryResolver:
    return MemoryResolver()


def keyed_pair(
    resolver: MemoryResolver, ring: str, capacity: int = 64, **rx_kw
) -> tuple[tcp.TcpSender, tcp.TcpReceiver]:
    tx = tcp.open_sender(ring, resolver=resolver, capacity=capacity, reconnect_timeout=5.0,
                         key=KEY)  # fmt: skip
    rx_kw.setdefault("key", KEY)
    rx = tcp.open_receiver(ring, resolver=resolver, reconnect_timeout=5.0, connect_timeout=5.0,
                           **rx_kw)  # fmt: skip
    return tx, rx


# --- finding 1: ring hijack --------------------------------------------------------------


def forged_hello(ring: str, next_expected: int) -> Callable[[bytes], bytes]:
    """The probe's HELLO: a huge generation, an in-window next_expected, no key."""
    return lambda _nonce: fr.encode_hello(ring, next_expected, 1 << 40, os.urandom(16),
                                          os.urandom(32))  # fmt: skip


def test_without_a_key_a_forged_hello_takes_the_ring(resolver: MemoryResolver) -> None:
    """The fault, reproduced on an unauthenticated (key=None) ring: the stranger is adopted
    and receives the real messages. This is why the runtime always passes a key."""
    tx = tcp.open_sender("open", resolver=resolver, capacity=64, reconnect_timeout=5.0)
    rx = tcp.open_receiver("open", resolver=resolver, reconnect_timeout=5.0, connect_timeout=5.0)
    producer = Producer(tx, 10)
    producer.start()
    try:
        assert receive(rx, 10) == [msg(i) for i in range(10)]
        tx_next_seq = 10  # whatever was acked so far, 10 is inside the window
        with socket.create_connection(("127.0.0.1", port_of(tx)), timeout=5) as s:
            s.settimeout(5)
            s.sendall(forged_hello("open", tx_next_seq)(b""))
            reply = recv_exact(s, CHALLENGE_SIZE + fr.HEADER_SIZE + fr.CONTROL_LIMITS[fr.WELCOME])
            reply = reply[CHALLENGE_SIZE:]
    except BaseException:
        producer.stop.set()
        raise
    finally:
        rx.detach()
    producer.finish()
    frames = frames_of(reply)
    assert frames[0][0] == fr.WELCOME, f"the forged HELLO was not adopted: {frames}"
    assert tx.statistics().extra["peer"] != rx.statistics().extra["peer"], "not hijacked"
    tx.detach()  # unacked messages: close() would wait for acks


def test_forged_hello_is_refused_and_the_consumer_keeps_every_message(
    resolver: MemoryResolver,
) -> None:
    tx, rx = keyed_pair(resolver, "flows.in")
    count = 3000
    halfway = threading.Event()
    producer = Producer(tx, count, hook=lambda i: i == count // 2 and halfway.set())
    got: list[bytes] = []
    consumer = threading.Thread(target=receive, args=(rx, count, got), daemon=True)
    producer.start()
    consumer.start()
    try:
        assert halfway.wait(BOUND_S)
        before = tx.statistics().extra["rejected_connections"]
        challenge, reply = stranger(port_of(tx), forged_hello("flows.in", len(got)))
        consumer.join(BOUND_S)
    finally:
        producer.finish()
    # The fault happened: the forged HELLO reached the producer and was answered...
    assert len(challenge) == CHALLENGE_SIZE
    stats = tx.statistics()
    assert stats.extra["rejected_connections"] == before + 1
    # ...with nothing but the generic refusal: no WELCOME, no DATA, nothing about the ring.
    assert reply == REFUSAL, reply[:80]
    # The real consumer kept its link and received every message exactly once, in order.
    assert got == [msg(i) for i in range(count)]
    assert stats.reconnects == 0 and stats.extra["connected"], "the consumer was dropped"
    assert rx.statistics().reconnects == 0 and rx.statistics().duplicates_dropped == 0
    rx.close()
    tx.close()


# --- finding 2: out-of-window HELLO, and what refusals tell ------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        forged_hello("flows.in", 10**9),  # far out of the window
        forged_hello("flows.in", 0),  # below the window (acked moved past 0)
        forged_hello("other.ring", 3),  # a wrong ring name
        lambda _n: fr.encode_hello("flows.in", 10**9, 0),  # no key at all (zero proof)
        lambda _n: b"\xff" * 40,  # garbage
    ],
    ids=["above-window", "below-window", "wrong-ring", "zero-proof", "garbage"],
)
def test_a_strangers_hello_never_raises_and_the_refusal_says_nothing(
    resolver: MemoryResolver, answer: Callable[[bytes], bytes]
) -> None:
    tx, rx = keyed_pair(resolver, "flows.in", capacity=16)
    producer = Producer(tx, 40)
    producer.start()
    try:
        got = receive(rx, 30)  # the window is now ~30 .. 39: both HELLO seqs are outside
        rx.commit()
        deadline = time.monotonic() + BOUND_S
        while rx.statistics().extra["acked_to_producer"] < 30:
            assert time.monotonic() < deadline
            got += rx.recv_burst(8, timeout=0.05)
        challenge, reply = stranger(port_of(tx), answer)
        got = receive(rx, 40, got)
    finally:
        producer.finish()
    stats = tx.statistics()
    assert stats.extra["rejected_connections"] == 1, "the stranger was not seen"
    assert reply == REFUSAL, reply
    for secret in (b"flows.in", b"flows", str(stats.acked).encode(), str(tx.next_seq).encode()):
        assert secret not in challenge[16:] + reply
    assert stats.extra["refused_consumers"] == 0 and stats.extra["last_refusal"] == ""
    assert got == [msg(i) for i in range(40)]
    tx.send(b"after", timeout=5)  # the producer never raised and still serves
    assert rx.recv(timeout=5) == b"after"
    rx.close()
    tx.close()


def test_an_authenticated_consumer_out_of_the_window_is_told_why(
    resolver: MemoryResolver,
) -> None:
    """A consumer that proves the key but asks for a gap is a real bug of that peer: it is
    refused with the window (it may know), the producer counts it and does not raise."""
    tx = tcp.open_sender("gap", resolver=resolver, capacity=8, reconnect_timeout=5.0, key=KEY)
    producer = Producer(tx, 3)
    producer.start()
    rx = tcp.open_receiver("gap", resolver=resolver, key=KEY, next_expected=7,
                           reconnect_timeout=5.0, connect_timeout=5.0)  # fmt: skip
    try:
        with pytest.raises(ProtocolError, match=r"'gap'.*expects seq 7.*retains only 0 .. 2"):
            rx.recv(timeout=5)
    finally:
        rx.close()
        producer.finish()
    extra = tx.statistics().extra
    assert extra["refused_consumers"] == 1 and "expects seq 7" in extra["last_refusal"]
    assert (tx.next_seq, tx.acked) == (3, 0)
    tx.detach()  # unacked messages: close() would wait for acks


# --- wrong keys --------------------------------------------------------------------------


@pytest.mark.parametrize("consumer_key", [OTHER_KEY, None], ids=["wrong-key", "no-key"])
def test_producer_refuses_a_consumer_without_the_key(
    resolver: MemoryResolver, consumer_key: bytes | None
) -> None:
    tx = tcp.open_sender("keyed", resolver=resolver, capacity=8, reconnect_timeout=5.0, key=KEY)
    producer = Producer(tx, 3)
    producer.start()
    rx = tcp.open_receiver("keyed", resolver=resolver, key=consumer_key, reconnect_timeout=5.0,
                           connect_timeout=5.0)  # fmt: skip
    try:
        with pytest.raises(ProtocolError) as info:
            rx.recv(timeout=5)
    finally:
        rx.close()
        producer.finish()
    text = str(info.value)
    assert "'keyed'" in text and "127.0.0.1:" in text and "refused" in text, text
    assert "same ring credential" in text, text
    assert tx.statistics().extra["rejected_connections"] >= 1
    assert rx.statistics().messages == 0
    tx.detach()  # unacked messages: close() would wait for acks


class FakeProducer:
    """A stranger listening at the ring's registered address: CHALLENGE, read HELLO, then
    ``reply(hello bytes)``; records what it was sent."""

    def __init__(self, resolver: MemoryResolver, ring: str, reply: Callable[[bytes], bytes]):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        host, port = self.listener.getsockname()
        resolver.register(ring, Endpoint("tcp", f"{host}:{port}", 5))
        self.reply = reply
        self.hello = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            conn.sendall(fr.encode_challenge(os.urandom(16)))
            head = recv_exact(conn, 16)
            _, _, length = fr.HEADER.unpack(head)
            self.hello = head + recv_exact(conn, length)
            conn.sendall(self.reply(self.hello))
            read_until_eof(conn)

    def close(self) -> None:
        self.listener.close()
        self.thread.join(10)


@pytest.mark.parametrize(
    "proof", [os.urandom(32), fr.NO_PROOF], ids=["forged-proof", "keyless-producer"]
)
def test_consumer_refuses_a_producer_that_cannot_prove_the_key(
    resolver: MemoryResolver, proof: bytes
) -> None:
    data = fr.encode_data(0, b"planted")
    fake = FakeProducer(resolver, "pulled",
                        lambda _h: fr.encode_welcome(0, 9, 8, 1024, 1, proof) + data)  # fmt: skip
    rx = tcp.open_receiver("pulled", resolver=resolver, key=KEY, reconnect_timeout=5.0,
                           connect_timeout=5.0)  # fmt: skip
    try:
        with pytest.raises(ProtocolError) as info:
            rx.recv(timeout=5)
    finally:
        rx.close()
        fake.close()
    assert fake.hello, "the fake producer never got the consumer's HELLO"
    text = str(info.value)
    assert "'pulled'" in text and "127.0.0.1:" in text and "same ring credential" in text, text
    assert rx.statistics().messages == 0, "DATA from an unproven producer was delivered"


# --- replay ------------------------------------------------------------------------------


class Recorder:
    """A relay registered as the ring's address: forwards one connection to the real
    producer and records both directions (a wire capture)."""

    def __init__(self, resolver: MemoryResolver, ring: str, target: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        port = self.listener.getsockname()[1]
        resolver.register(ring, Endpoint("tcp", f"127.0.0.1:{port}", 1 << 20))
        self.target = target
        self.up = bytearray()  # consumer -> producer
        self.down = bytearray()  # producer -> consumer
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._relay, daemon=True)
        self.thread.start()

    def _relay(self) -> None:
        a, _ = self.listener.accept()
        b = socket.create_connection(("127.0.0.1", self.target), timeout=10)
        with a, b:
            ends = {a: (b, self.up), b: (a, self.down)}
            while not self.done.is_set():
                ready, _, _ = select.select([a, b], [], [], 0.05)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    peer, log = ends[s]
                    log += data
                    peer.sendall(data)

    def close(self) -> None:
        self.done.set()
        self.thread.join(10)
        self.listener.close()


def test_a_replayed_handshake_is_refused_by_both_ends(resolver: MemoryResolver) -> None:
    tx = tcp.open_sender("replay", resolver=resolver, capacity=8, reconnect_timeout=5.0,
                         key=KEY)  # fmt: skip
    producer = Producer(tx, 5)
    producer.start()
    relay = Recorder(resolver, "replay", port_of(tx))
    rx = tcp.open_receiver("replay", resolver=resolver, key=KEY, reconnect_timeout=5.0,
                           connect_timeout=5.0)  # fmt: skip
    try:
        assert receive(rx, 5) == [msg(i) for i in range(5)]  # the captured session worked
        rx.detach()
        relay.close()
        captured = bytes(relay.up)
        assert frames_of(captured)[0][0] == fr.HELLO
        hello = captured[: fr.HEADER_SIZE + fr.HEADER.unpack_from(captured)[2]]
        # Replay to the producer: the old HELLO answers an old CHALLENGE.
        _, reply = stranger(port_of(tx), lambda _nonce: hello)
    finally:
        producer.finish()
    assert reply == REFUSAL, reply[:80]
    assert tx.statistics().extra["rejected_connections"] >= 1
    # Replay to a consumer: the producer's recorded WELCOME answers another consumer nonce.
    down = frames_of(bytes(relay.down))
    assert [f[0] for f in down[:2]] == [fr.CHALLENGE, fr.WELCOME]
    welcome_frame = fr.encode_welcome(down[1][1], *fr.decode_welcome(down[1][2]))
    fake = FakeProducer(resolver, "replay", lambda _h: welcome_frame + fr.encode_data(0, b"x"))
    rx2 = tcp.open_receiver("replay", resolver=resolver, key=KEY, reconnect_timeout=5.0,
                            connect_timeout=5.0)  # fmt: skip
    try:
        with pytest.raises(ProtocolError, match="could not prove"):
            rx2.recv(timeout=5)
    finally:
        rx2.close()
        fake.close()
    assert rx2.statistics().messages == 0
    tx.detach()  # unacked messages: close() would wait for acks


# --- floods ------------------------------------------------------------------------------


def test_a_flood_of_strangers_does_not_stop_the_stream(resolver: MemoryResolver) -> None:
    """200 connections (idle ones that hold a slot, garbage ones, forged HELLOs) while a pair
    streams, and the consumer's link is broken once in the middle of the flood: it must
    reconnect past the idle strangers (the oldest pending is evicted, not the newest)."""
    tx, rx = keyed_pair(resolver, "flooded", capacity=64)
    count = 4000
    started = threading.Event()
    flooded = threading.Event()

    def hook(i: int) -> None:
        if i == 200:
            started.set()
        if i == 1000:
            assert flooded.wait(BOUND_S)
            tx._break_connection()  # the producer thread owns tx: break it from there

    producer = Producer(tx, count, hook)
    got: list[bytes] = []
    consumer = threading.Thread(target=receive, args=(rx, count, got), daemon=True)
    producer.start()
    consumer.start()
    socks: list[socket.socket] = []
    try:
        assert started.wait(BOUND_S)
        port = port_of(tx)
        for i in range(200):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            socks.append(s)
            if i % 3 == 1:
                s.sendall(os.urandom(64))
            elif i % 3 == 2:
                s.sendall(fr.encode_hello("flooded", 0, 1 << 40, os.urandom(16), os.urandom(32)))
        flooded.set()
        consumer.join(BOUND_S)
    finally:
        flooded.set()
        producer.finish()
        for s in socks:
            s.close()
    assert got == [msg(i) for i in range(count)], f"{len(got)} messages"
    stats, rstats = tx.statistics(), rx.statistics()
    assert stats.extra["rejected_connections"] >= 100, stats.extra  # the flood was served
    assert stats.reconnects == 1 and rstats.reconnects == 1  # the break happened, once
    assert stats.extra["refused_consumers"] == 0
    rx.close()
    tx.close()
