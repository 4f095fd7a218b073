"""The tcp ring's wire format: fixed 16-byte frame headers, encoders, and a validating reader.

Every frame is a header followed by ``length`` payload bytes. All integers are big-endian::

    offset  size  field
    0       2     magic  b"DR"
    2       1     protocol version (2)
    3       1     frame type (HELLO, WELCOME, DATA, ACK, CLOSE, PING, ERROR, CHALLENGE)
    4       8     sequence number (u64; meaning depends on the type, see below)
    12      4     payload length (u32)

=========  =========  ======================  ==========================================
type       direction  seq                     payload
=========  =========  ======================  ==========================================
CHALLENGE  p -> c     0                       16-byte producer nonce (sent at accept)
HELLO      c -> p     consumer next_expected  u64 consumer generation, 16-byte consumer
                                              nonce, 32-byte consumer proof, ring name
                                              (ASCII)
WELCOME    p -> c     first retained seq      u64 producer generation, u32 capacity,
                                              u32 max_message, u64 next_seq, 32-byte
                                              producer proof
DATA       p -> c     message seq             the message
ACK        c -> p     N: all seq < N commit.  empty
CLOSE      both       p: next_seq; c: commit. empty
PING       both       0                       empty (liveness; ignored by the receiver)
ERROR      p -> c     0                       UTF-8 text: why the producer refused
=========  =========  ======================  ==========================================

The connection handshake (protocol 2): the producer sends CHALLENGE as soon as it accepts;
a consumer with a ring credential (a key shared by both ends, 32 bytes from the agents in
the runtime) answers it with HELLO; the producer answers the HELLO with WELCOME (then
resends DATA from next_expected) or ERROR and hangs up. The two proofs are::

    consumer proof = HMAC-SHA256(key, "dpmigrate-ring-v2" | "consumer->producer" | ring |
                                 producer nonce | consumer nonce | generation | next_expected)
    producer proof = HMAC-SHA256(key, "dpmigrate-ring-v2" | "producer->consumer" | ring |
                                 producer nonce | consumer nonce | generation | next_expected |
                                 first retained | producer generation | capacity |
                                 max_message | next_seq)

The producer checks the consumer's proof before it looks at the generation or the window
(so a stranger learns nothing about the ring, and cannot take the consumer's place by
claiming a large generation), and the consumer checks the producer's before it takes any
DATA. The direction labels keep one side's proof from being replayed as the other's; the
fresh nonces of both sides keep a recorded handshake from being replayed at all; the HELLO
fields (and the WELCOME's) inside the MAC keep them from being altered on the way. Without a
key (``key=None``, library use and older tests only: the runtime always passes one) the
consumer sends its HELLO right behind connect, without waiting for the CHALLENGE (which it
then just reads), the proofs are 32 zero bytes and nobody checks them: such a ring is not
authenticated, and is served by the very producer call that accepts the connection; with a
key the producer serves the consumer in a call after the HELLO arrived (one more round
trip, at connect only). Only the
handshake is authenticated: DATA and ACK frames carry no MAC, so the hot path does no
per-message cryptography (a ring crosses a network the cluster trusts not to be tampered
with, not one it trusts not to hold strangers).

The first four bytes (magic, version, type) are read as one u32 so the hot path validates a
DATA header with a single comparison. Nothing here knows about sockets' peers or rings:
problems are reported as :class:`FrameError` (a short description) and the transport turns
them into a ProtocolError naming the ring and the peer. Every ``decode_*`` function and
:class:`FrameReader` raise nothing but :class:`FrameError` for any input (they are fuzzed).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import struct
from typing import NamedTuple

from dpmigrate.native._frames import HEADER_SIZE as _C_HEADER_SIZE
from dpmigrate.native._frames import SEND_MAX as _SEND_MAX
from dpmigrate.native._frames import STOP_GAP as _STOP_GAP
from dpmigrate.native._frames import STOP_LIMIT as _STOP_LIMIT
from dpmigrate.native._frames import cut_data as _cut_data
from dpmigrate.native._frames import send_data as _send_data

MAGIC = b"DR"
VERSION = 2

HELLO = 1
WELCOME = 2
DATA = 3
ACK = 4
CLOSE = 5
PING = 6
ERROR = 7
CHALLENGE = 8

TYPE_NAMES = {
    HELLO: "HELLO",
    WELCOME: "WELCOME",
    DATA: "DATA",
    ACK: "ACK",
    CLOSE: "CLOSE",
    PING: "PING",
    ERROR: "ERROR",
    CHALLENGE: "CHALLENGE",
}

#: magic, version, type as one u32; sequence number u64; payload length u32.
HEADER = struct.Struct("!IQI")
HEADER_SIZE = HEADER.size  # 16
if _C_HEADER_SIZE != HEADER_SIZE:  # the C cutter reads the same layout (native/_frames.c)
    raise ImportError(f"native/_frames.c reads {_C_HEADER_SIZE}-byte headers, not 16: rebuild")
_PREFIX = (MAGIC[0] << 24) | (MAGIC[1] << 16) | (VERSION << 8)


def type_word(frame_type: int) -> int:
    """The first four header bytes of a frame of ``frame_type`` as the u32 HEADER reads."""
    return _PREFIX | frame_type


DATA_WORD = type_word(DATA)


WRITE_MAX = _SEND_MAX  # payloads per write_data call


def write_data(fd: int, seq: int, payloads: list[bytes]) -> int:
    """Write DATA frames for ``payloads`` (bytes, at most WRITE_MAX; seq, seq+1, ...) to
    the socket ``fd`` with one non-blocking sendmsg; returns the bytes the socket took now
    (the caller queues the rest). OSError as from socket.sendmsg."""
    return _send_data(fd, seq, payloads, DATA_WORD)


NONCE_SIZE = 16
PROOF_SIZE = 32
#: The proof an end without a key sends (and an end with a key never accepts).
NO_PROOF = bytes(PROOF_SIZE)
#: A ring credential's size as the runtime derives it (any length works for HMAC); a shorter
#: key is refused as a likely mistake (a truncated or empty secret).
KEY_SIZE = 32
#: The one text a producer sends when it refuses a peer that has not proved the ring's key:
#: it says nothing about the ring (not its name, window or sequence numbers) to a stranger.
REFUSED_TEXT = "refused"
_HELLO_FIXED = struct.Struct(f"!Q{NONCE_SIZE}s{PROOF_SIZE}s")
_WELCOME = struct.Struct(f"!QIIQ{PROOF_SIZE}s")
_WELCOME_FIELDS = struct.Struct("!QQIIQ")  # first retained + the WELCOME's fixed fields
_HELLO_FIELDS = struct.Struct("!QQ")  # generation, next_expected
_MAC_DOMAIN = b"dpmigrate-ring-v2"
_TO_PRODUCER = b"consumer->producer"
_TO_CONSUMER = b"producer->consumer"
MAX_NAME = 128
MAX_ERROR_TEXT = 1024
#: Largest max_message a WELCOME may announce (sanity bound on a peer's claim).
MAX_ANNOUNCED_MESSAGE = 1 << 30
_NAME_BYTES_RE = re.compile(rb"^[A-Za-z0-9_.:\-]{1,128}$")

#: Largest payload of each control frame type; DATA is bounded by the ring's max_message.
CONTROL_LIMITS = {
    CHALLENGE: NONCE_SIZE,
    HELLO: _HELLO_FIXED.size + MAX_NAME,
    WELCOME: _WELCOME.size,
    ACK: 0,
    CLOSE: 0,
    PING: 0,
    ERROR: MAX_ERROR_TEXT,
}


#: A leftover partial frame up to this size is moved to the buffer's front before a recv.
SMALL_MOVE = 64 << 10
#: take_data cuts every complete DATA frame there is (the buffer bounds the count).
_NO_MAX = 1 << 62


class FrameError(ValueError):
    """A received byte sequence is not a valid frame; the text says what is wrong."""


class GapError(FrameError):
    """A DATA frame skipped ahead of the expected sequence number."""

    def __init__(self, text: str, cursor: int, dups: int) -> None:
        super().__init__(text)
        self.cursor = cursor
        self.dups = dups


def header(frame_type: int, seq: int, length: int) -> bytes:
    return HEADER.pack(_PREFIX | frame_type, seq, length)


class Hello(NamedTuple):
    """A decoded HELLO payload (next_expected travels in the header's seq)."""

    generation: int
    nonce: bytes
    proof: bytes
    ring: str


class Welcome(NamedTuple):
    """A decoded WELCOME payload (first retained seq travels in the header's seq)."""

    generation: int
    capacity: int
    max_message: int
    next_seq: int
    proof: bytes


def encode_challenge(nonce: bytes) -> bytes:
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"a CHALLENGE nonce is {NONCE_SIZE} bytes, got {len(nonce)}")
    return header(CHALLENGE, 0, NONCE_SIZE) + nonce


def encode_hello(
    ring: str,
    next_expected: int,
    generation: int,
    nonce: bytes = bytes(NONCE_SIZE),
    proof: bytes = NO_PROOF,
) -> bytes:
    name = ring.encode("ascii")
    payload = _HELLO_FIXED.pack(generation, nonce, proof) + name
    return header(HELLO, next_expected, len(payload)) + payload


def encode_welcome(
    first_retained: int,
    generation: int,
    capacity: int,
    max_message: int,
    next_seq: int,
    proof: bytes = NO_PROOF,
) -> bytes:
    payload = _WELCOME.pack(generation, capacity, max_message, next_seq, proof)
    return header(WELCOME, first_retained, len(payload)) + payload


def encode_ack(upto: int) -> bytes:
    return header(ACK, upto, 0)


def encode_close(seq: int) -> bytes:
    return header(CLOSE, seq, 0)


def encode_ping() -> bytes:
    return header(PING, 0, 0)


def encode_error(text: str) -> bytes:
    payload = text.encode("utf-8", "replace")[:MAX_ERROR_TEXT]
    return header(ERROR, 0, len(payload)) + payload


def encode_data(seq: int, payload: bytes) -> bytes:
    return header(DATA, seq, len(payload)) + payload


def decode_challenge(payload: bytes) -> bytes:
    """Return the producer's nonce from a CHALLENGE payload."""
    if len(payload) != NONCE_SIZE:
        raise FrameError(f"CHALLENGE payload is {len(payload)} bytes, expected {NONCE_SIZE}")
    return bytes(payload)


def decode_hello(payload: bytes) -> Hello:
    """Return (consumer generation, nonce, proof, ring name) from a HELLO payload."""
    if len(payload) <= _HELLO_FIXED.size:
        raise FrameError(f"HELLO payload of {len(payload)} bytes is too short to hold a ring name")
    generation, nonce, proof = _HELLO_FIXED.unpack_from(payload)
    name = bytes(payload[_HELLO_FIXED.size :])
    if not _NAME_BYTES_RE.match(name):
        raise FrameError(f"HELLO carries an invalid ring name {name[:40]!r}")
    return Hello(generation, nonce, proof, name.decode("ascii"))


def decode_welcome(payload: bytes) -> Welcome:
    """Return (producer generation, capacity, max_message, next_seq, proof) from a WELCOME."""
    if len(payload) != _WELCOME.size:
        raise FrameError(f"WELCOME payload is {len(payload)} bytes, expected {_WELCOME.size}")
    generation, capacity, max_message, next_seq, proof = _WELCOME.unpack(payload)
    if capacity < 1:
        raise FrameError("WELCOME announces a capacity of 0 messages")
    if max_message > MAX_ANNOUNCED_MESSAGE:
        raise FrameError(
            f"WELCOME announces max_message={max_message}, above the sane bound "
            f"{MAX_ANNOUNCED_MESSAGE}"
        )
    return Welcome(generation, capacity, max_message, next_seq, proof)


# ----------------------------------------------------------------------- handshake proofs
# The ring name matches _NAME_BYTES_RE (no NUL), nonces and integers have fixed sizes, so
# the NUL-joined message is unambiguous.


def _mac(key: bytes, direction: bytes, ring: str, parts: bytes) -> bytes:
    msg = b"\0".join((_MAC_DOMAIN, direction, ring.encode("ascii"), parts))
    return hmac.new(key, msg, hashlib.sha256).digest()


def consumer_proof(
    key: bytes,
    ring: str,
    producer_nonce: bytes,
    consumer_nonce: bytes,
    generation: int,
    next_expected: int,
) -> bytes:
    """What a consumer puts in its HELLO to prove it holds the ring's key: bound to the ring,
    both nonces and the HELLO's fields, so it can be neither replayed nor altered."""
    fields = _HELLO_FIELDS.pack(generation, next_expected)
    return _mac(key, _TO_PRODUCER, ring, producer_nonce + consumer_nonce + fields)


def producer_proof(
    key: bytes,
    ring: str,
    producer_nonce: bytes,
    consumer_nonce: bytes,
    generation: int,
    next_expected: int,
    first_retained: int,
    welcome: Welcome,
) -> bytes:
    """What a producer puts in its WELCOME: the consumer's HELLO fields and the WELCOME's own
    fields under the key, with the other direction label (a consumer's proof is no answer)."""
    hello = _HELLO_FIELDS.pack(generation, next_expected)
    mine = _WELCOME_FIELDS.pack(
        first_retained, welcome.generation, welcome.capacity, welcome.max_message,
        welcome.next_seq,
    )  # fmt: skip
    return _mac(key, _TO_CONSUMER, ring, producer_nonce + consumer_nonce + hello + mine)


def proof_matches(expected: bytes, got: bytes) -> bool:
    """Constant-time comparison (a timing difference must not leak how much was right)."""
    return hmac.compare_digest(expected, got)


def decode_error(payload: bytes) -> str:
    """The producer's refusal text, made printable (the peer is not trusted)."""
    text = bytes(payload).decode("utf-8", "replace")
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def describe_bad_header(word: int, length: int, data_limit: int, allowed: frozenset[int]) -> str:
    """Say what is wrong with a header whose first u32 is ``word`` (for error messages)."""
    magic = bytes(((word >> 24) & 0xFF, (word >> 16) & 0xFF))
    version = (word >> 8) & 0xFF
    ftype = word & 0xFF
    if magic != MAGIC:
        return f"bad magic {magic!r} (expected {MAGIC!r}; is this a dpmigrate tcp ring peer?)"
    if version != VERSION:
        return f"unsupported protocol version {version} (this end speaks {VERSION})"
    if ftype not in TYPE_NAMES:
        return f"unknown frame type {ftype}"
    if ftype not in allowed:
        return f"unexpected {TYPE_NAMES[ftype]} frame in this direction or state"
    limit = data_limit if ftype == DATA else CONTROL_LIMITS[ftype]
    if length > limit:
        return (
            f"{TYPE_NAMES[ftype]} frame announces a payload of {length} bytes, above the "
            f"limit of {limit} bytes"
        )
    return "malformed header"


class FrameReader:
    """Accumulates received bytes in one reusable buffer and cuts them into frames.

    ``allowed`` is the set of frame types this direction may carry; ``data_limit`` bounds a
    DATA payload (the ring's max_message). Every header is validated before its payload is
    awaited, so a peer can never make the reader wait for or allocate more than one frame.
    """

    __slots__ = (
        "_allowed_words",
        "_mv",
        "_ro",
        "allowed",
        "buf",
        "chunk",
        "data_limit",
        "end",
        "start",
    )

    def __init__(
        self, allowed: frozenset[int], data_limit: int, size: int = 1 << 16, chunk: int = 0
    ) -> None:
        self.data_limit = data_limit
        self.chunk = chunk or size
        self.set_allowed(allowed)
        need = HEADER_SIZE + max(data_limit if DATA in allowed else 0, *CONTROL_LIMITS.values())
        self.buf = bytearray(max(size, 2 * need))
        self._mv = memoryview(self.buf)
        self._ro = self._mv.toreadonly()  # what take_views cuts from: a consumer cannot write
        self.start = 0
        self.end = 0

    def set_allowed(self, allowed: frozenset[int]) -> None:
        """Change which frame types are acceptable (e.g. DATA only after WELCOME)."""
        self.allowed = allowed
        self._allowed_words = {type_word(t): t for t in allowed}

    @property
    def pending(self) -> int:
        """Bytes received but not yet cut into frames (a partial frame at EOF = truncation)."""
        return self.end - self.start

    def set_data_limit(self, limit: int) -> None:
        """Adopt the DATA payload bound the peer announced, growing the buffer if needed."""
        self.data_limit = limit
        need = 2 * (HEADER_SIZE + limit)
        if need > len(self.buf):
            data = bytes(self._mv[self.start : self.end])
            self._ro.release()
            self._mv.release()
            self.buf = bytearray(need)
            self.buf[: len(data)] = data
            self._mv = memoryview(self.buf)
            self._ro = self._mv.toreadonly()
            self.start, self.end = 0, len(data)

    def _make_room(self) -> None:
        """Move the unparsed tail to the front when it is small (the working set then stays
        in the first ``chunk`` bytes, warm in cache) or when the space behind it runs low."""
        start, end = self.start, self.end
        if start == end:
            self.start = self.end = 0
        elif start and (
            end - start <= SMALL_MOVE or len(self.buf) - end < HEADER_SIZE + self.data_limit
        ):
            n = end - start
            # bytearray slice assignment is a memcpy: copy first if the regions overlap
            tail = self._mv[start:end] if n <= start else bytes(self._mv[start:end])
            self.buf[:n] = tail
            self.start, self.end = 0, n

    def recv_from(self, sock) -> int:  # sock: socket.socket
        """One recv_into() of at most ``chunk`` bytes; returns the count (0 means EOF).

        Raises BlockingIOError / OSError as the socket does.
        """
        self._make_room()
        stop = min(len(self.buf), self.end + self.chunk)
        n = sock.recv_into(self._mv[self.end : stop])
        self.end += n
        return n

    def feed(self, data: bytes) -> None:
        """Append ``data`` as if it had been received (tests and in-memory use)."""
        self._make_room()
        n = len(data)
        if n > len(self.buf) - self.end:
            raise FrameError(f"{n} bytes do not fit in the receive buffer")
        self.buf[self.end : self.end + n] = data
        self.end += n

    def _check(self, word: int, length: int) -> int:
        ftype = self._allowed_words.get(word)
        if ftype is None or length > (self.data_limit if ftype == DATA else CONTROL_LIMITS[ftype]):
            raise FrameError(describe_bad_header(word, length, self.data_limit, self.allowed))
        return ftype

    def next_frame(self) -> tuple[int, int, bytes] | None:
        """Return the next complete frame as (type, seq, payload), or None if incomplete."""
        start = self.start
        if self.end - start < HEADER_SIZE:
            return None
        word, seq, length = HEADER.unpack_from(self.buf, start)
        ftype = self._check(word, length)
        stop = start + HEADER_SIZE + length
        if stop > self.end:
            return None
        payload = bytes(self._mv[start + HEADER_SIZE : stop])
        self.start = stop
        return ftype, seq, payload

    def data_ready(self) -> bool:
        """True when a complete DATA frame starts at the parse position (a lazy consumer,
        which leaves DATA in the buffer for :meth:`take_views`, then has something)."""
        start = self.start
        if self.end - start < HEADER_SIZE:
            return False
        word, _seq, length = HEADER.unpack_from(self.buf, start)
        return word == DATA_WORD and start + HEADER_SIZE + length <= self.end

    def at_data(self) -> bool:
        """True when the next header (complete or not yet) is a DATA header."""
        start = self.start
        return (
            self.end - start >= HEADER_SIZE and HEADER.unpack_from(self.buf, start)[0] == DATA_WORD
        )

    def take_views(self, out: list[memoryview], cursor: int, max_n: int) -> tuple[int, int, int]:
        """Like :meth:`take_data`, but append read-only views of the payloads *in this
        buffer* (no copy) and stop after ``max_n``; returns (new cursor, duplicates, payload
        bytes). The views stay valid only until the next :meth:`recv_from` or :meth:`feed`
        (which may move or overwrite them): the caller must expire them before, and
        :meth:`reclaim` then proves nothing still shows this buffer."""
        if DATA not in self.allowed:
            return cursor, 0, 0
        return self._cut(out, cursor, max_n, self._ro)

    def _cut(
        self, out: list, cursor: int, max_n: int, src: memoryview | None
    ) -> tuple[int, int, int]:
        """One pass of the C frame cutter (native/_frames.c) from the parse position; the
        rare stops it reports (a payload above the limit, a gap) become FrameErrors here."""
        pos, cursor, dups, nbytes, stop, seq = _cut_data(
            self.buf, src, self.start, self.end, cursor, max_n, self.data_limit, DATA_WORD, out
        )
        self.start = pos
        if stop == _STOP_LIMIT:
            word, _seq, length = HEADER.unpack_from(self.buf, pos)
            self._check(word, length)
        elif stop == _STOP_GAP:
            raise GapError(
                f"DATA seq {seq} arrived while {cursor} was expected: a gap of "
                f"{seq - cursor} messages",
                cursor,
                dups,
            )
        return cursor, dups, nbytes

    def reclaim(self) -> bool:
        """After the views from :meth:`take_views` were released: True when nothing shows
        this buffer any more (so the next read may overwrite it), False while a slice of a
        view, or a buffer taken from one, is alive. A bytearray refuses to resize while any
        buffer of it is exported; this reader's own view is dropped for the test."""
        self._ro.release()
        self._mv.release()
        try:
            self.buf.append(0)
        except BufferError:
            ok = False
        else:
            del self.buf[-1]
            ok = True
        self._mv = memoryview(self.buf)
        self._ro = self._mv.toreadonly()
        return ok

    def take_data(self, out: list[bytes], cursor: int) -> tuple[int, int]:
        """Cut consecutive DATA frames, appending those with seq == cursor to ``out``.

        Duplicates (seq < cursor) are dropped and counted. Stops at the first non-DATA or
        incomplete frame, leaving it for :meth:`next_frame`. Returns (new cursor, duplicates).
        A DATA seq above the cursor (a gap) raises :class:`GapError`, which carries the cursor
        and duplicate count reached before it. This is the hot path: one header check and one
        copy per message, in C (the Python loop cost about a microsecond per frame).
        """
        if DATA not in self.allowed:
            return cursor, 0
        cursor, dups, _nbytes = self._cut(out, cursor, _NO_MAX, None)
        return cursor, dups
