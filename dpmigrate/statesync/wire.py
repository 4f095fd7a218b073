"""The state-synchronization wire format: checksummed frames, typed metadata, mutual auth.

A primary stage ships its :class:`~dpmigrate.statesync.state.State` to replicas over TCP
(:mod:`~dpmigrate.statesync.sender`, :mod:`~dpmigrate.statesync.receiver`). Every frame is a
fixed 20-byte header, a msgpack map of metadata, and (CHUNK and POINT only) a payload. All
integers are big-endian::

    offset  size  field
    0       2     magic b"DS"
    2       1     protocol version (2)
    3       1     frame type (see the table)
    4       4     meta length     (<= MAX_META; a msgpack map with str keys)
    8       4     payload length  (<= MAX_PAYLOAD; 0 unless CHUNK or POINT)
    12      4     crc32 of meta + payload
    16      4     crc32 of bytes 0..15

The header has its own checksum so a flipped length is caught before it is trusted: a bad
header means the framing is lost (:class:`FramingError`; the replica reconnects), a bad body
with a good header is one damaged frame (:class:`ChecksumError`; the replica NACKs it and
the primary sends it again). Lengths are bounded before anything is awaited or allocated, and
a connection that has not authenticated yet may send only a small HELLO.

==========  =====  ===============================================================
type        dir    meta (payload)
==========  =====  ===============================================================
CHALLENGE   p->r   stage, nonce (16 bytes)
HELLO       r->p   stage, node, role, nonce (16 bytes), proof (32 bytes), and what
                   the replica holds: n, version (None: nothing), snap, items,
                   chunks (a snapshot in progress: its id and how far it got)
WELCOME     p->r   proof (32 bytes), mode ("stream" | "snapshot" | "resume"),
                   head_n, head_seq, head_at, seq (of the replica's point here, or
                   None), window, max_frame, safe (None: this primary marks no
                   points, apply each at once; else as in HEAD)
ERROR       both   code, error (why; the sender of ERROR then hangs up)
SNAP_BEGIN  p->r   id, version, seq, at, inputs, outputs (the snapshot's point),
                   items (total), first (item offset it starts at), chunk (index)
CHUNK       p->r   id, i, first, count  (payload: msgpack map of ``count`` items)
SNAP_END    p->r   id, chunks, items
POINT       p->r   version, seq, at, inputs, outputs, delta (bool)
                   (payload: Delta.encode() when delta is true, else empty)
HEAD        p->r   n, seq, at (the primary's newest point; also the heartbeat),
                   safe (None, or the newest point whose outputs downstream
                   acknowledged: a replica applies no point beyond it)
ACK         r->p   bytes (frame bytes consumed since WELCOME), n, version, snap,
                   items, chunks
NACK        r->p   k (1, 2, ...), reason ("crc" | "gap"), and the fields of ACK
RESTART     p->r   k (the NACK answered), mode; everything between the NACK and
                   this frame is discarded by the replica
==========  =====  ===============================================================

A primary whose outputs go to rings marks its points *safe* as downstream acknowledges their
outputs: a replica holds a later point (or snapshot) back, unapplied, until it is marked. A
replica's state is then always at a point that a new primary can take over from — its outputs
are all acknowledged downstream, so no consumer expects a message the replica cannot
regenerate — and its ACK's ``n`` means "applied and persisted", never more (DESIGN.md §5).

``seq`` counts the points one primary instance published (its start point is 0); ``n`` is
:attr:`Point.n`, stable across restarts of the primary. Metadata fields are all required,
type-checked on decode, and unknown fields are refused: a new field is a new protocol
version.

Authentication (before any state moves): the primary sends a random nonce; the replica
answers with its own nonce and ``HMAC-SHA256(token, "replica" | both nonces | stage | role |
node)``; the primary checks it and answers with ``HMAC-SHA256(token, "primary" | both nonces
| stage | node)``, so a replica never takes state from a peer that does not know the cluster
token. The labels keep one side's proof from being replayed as the other's; the nonces keep
a recorded exchange from being replayed at all.

msgpack with :func:`dpmigrate.statesync.state.pack`'s options; never pickle, never eval: a
frame from the network is data, and anything that does not fit the table above raises
:class:`WireError` naming what was wrong.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import math
import re
import socket
import struct
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import msgpack

from dpmigrate.errors import ProtocolError
from dpmigrate.statesync.point import Point
from dpmigrate.statesync.state import Delta, pack

MAGIC = 0x4453  # b"DS"
VERSION = 2  # 2: the safe mark (WELCOME, HEAD)

CHALLENGE = 1
HELLO = 2
WELCOME = 3
ERROR = 4
SNAP_BEGIN = 5
CHUNK = 6
SNAP_END = 7
POINT = 8
HEAD = 9
ACK = 10
NACK = 11
RESTART = 12

TYPE_NAMES = {
    CHALLENGE: "CHALLENGE",
    HELLO: "HELLO",
    WELCOME: "WELCOME",
    ERROR: "ERROR",
    SNAP_BEGIN: "SNAP_BEGIN",
    CHUNK: "CHUNK",
    SNAP_END: "SNAP_END",
    POINT: "POINT",
    HEAD: "HEAD",
    ACK: "ACK",
    NACK: "NACK",
    RESTART: "RESTART",
}

#: Frame types each direction may carry.
TO_REPLICA = frozenset(
    {CHALLENGE, WELCOME, ERROR, SNAP_BEGIN, CHUNK, SNAP_END, POINT, HEAD, RESTART}
)
TO_PRIMARY = frozenset({HELLO, ACK, NACK, ERROR})
#: Frame types with a payload; every other type must have an empty one.
WITH_PAYLOAD = frozenset({CHUNK, POINT})

#: magic, version, type, meta length, payload length, body crc32, header crc32
HEADER = struct.Struct("!HBBIIII")
HEADER_SIZE = HEADER.size  # 20
_HEAD16 = struct.Struct("!HBBIII")  # the part the header crc covers

MAX_META = 64 << 10
MAX_PAYLOAD = 64 << 20
MAX_FRAME = HEADER_SIZE + MAX_META + MAX_PAYLOAD
#: An unauthenticated peer may send no more than this (one HELLO).
MAX_HANDSHAKE_META = 2048
MAX_ERROR_TEXT = 1024
MAX_PORTS = 4096
MAX_COUNT = 1 << 62
NONCE_SIZE = 16
PROOF_SIZE = 32

MODES = ("stream", "snapshot", "resume")
NACK_REASONS = ("crc", "gap")

_STAGE_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}/[A-Za-z0-9_.\-]{1,64}$")
_NODE_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")
_ROLE_RE = re.compile(r"^[a-z][a-z0-9_\-]{0,31}$")
_CODE_RE = re.compile(r"^[a-z_]{1,32}$")
MAX_PORT_NAME = 256


class WireError(ProtocolError):
    """A peer sent bytes that are not a valid statesync frame here; the text says what.

    ``code`` is what an ERROR frame answering it carries ("protocol", "auth", "stage", ...).
    """

    def __init__(self, text: str, code: str = "protocol") -> None:
        super().__init__(text)
        self.code = code


class FramingError(WireError):
    """The frame header is damaged or not ours: the byte stream cannot be cut into frames any
    more, so the connection must be dropped (the replica reconnects and resumes).
    ``damaged`` is True when the header failed its own checksum (harm in transit, not a
    peer speaking another protocol)."""

    def __init__(self, text: str, damaged: bool = False) -> None:
        super().__init__(text)
        self.damaged = damaged


class ChecksumError(WireError):
    """A frame's header is intact but its body does not match its crc32 (damaged in transit).
    The framing holds: the frame is skipped and can be asked for again."""

    def __init__(self, text: str, frame_type: int, size: int) -> None:
        super().__init__(text, "checksum")
        self.frame_type = frame_type
        self.size = size


class Frame(NamedTuple):
    """One decoded frame. ``payload`` is a view into the reader's buffer, valid only until
    the reader reads again: decode or copy it first."""

    type: int
    meta: dict[str, Any]
    payload: memoryview
    size: int  # bytes on the wire, header included


# --------------------------------------------------------------------------- names


def check_name(kind: str, value: object) -> str:
    """Validate a stage ("app/stage"), node or role name; ConfigError-free (WireError) so a
    peer's bad name and a caller's bad name are reported the same way."""
    pattern = {"stage": _STAGE_RE, "node": _NODE_RE, "role": _ROLE_RE}[kind]
    if not isinstance(value, str) or not pattern.match(value):
        hint = {
            "stage": "'app/stage', letters, digits, '_', '.', '-'",
            "node": "1-128 letters, digits, '_', '.', ':', '-'",
            "role": "a lower-case word such as 'standby'",
        }[kind]
        raise WireError(f"invalid {kind} name {str(value)[:80]!r}: expected {hint}")
    return value


# --------------------------------------------------------------------------- field checks
# Each check returns True when the value is acceptable. bool is not an int here.


def _count(v: object) -> bool:
    return type(v) is int and 0 <= v <= MAX_COUNT


def _opt_count(v: object) -> bool:
    return v is None or _count(v)


def _time(v: object) -> bool:
    return (type(v) is float or type(v) is int) and math.isfinite(v) and v >= 0


def _flag(v: object) -> bool:
    return type(v) is bool


def _text(limit: int) -> Callable[[object], bool]:
    return lambda v: type(v) is str and len(v) <= limit


def _fixed_bytes(size: int) -> Callable[[object], bool]:
    return lambda v: type(v) is bytes and len(v) == size


def _matching(pattern: re.Pattern[str]) -> Callable[[object], bool]:
    return lambda v: type(v) is str and pattern.match(v) is not None


def _choice(options: Sequence[str]) -> Callable[[object], bool]:
    return lambda v: type(v) is str and v in options


def _positions(v: object) -> bool:
    if type(v) is not dict or len(v) > MAX_PORTS:
        return False
    return all(type(k) is str and len(k) <= MAX_PORT_NAME and _count(x) for k, x in v.items())


_PROGRESS = {
    "n": _opt_count,
    "version": _opt_count,
    "snap": _opt_count,
    "items": _count,
    "chunks": _count,
}

SCHEMAS: dict[int, dict[str, Callable[[object], bool]]] = {
    CHALLENGE: {"stage": _matching(_STAGE_RE), "nonce": _fixed_bytes(NONCE_SIZE)},
    HELLO: {
        "stage": _matching(_STAGE_RE),
        "node": _matching(_NODE_RE),
        "role": _matching(_ROLE_RE),
        "nonce": _fixed_bytes(NONCE_SIZE),
        "proof": _fixed_bytes(PROOF_SIZE),
        **_PROGRESS,
    },
    WELCOME: {
        "proof": _fixed_bytes(PROOF_SIZE),
        "mode": _choice(MODES),
        "head_n": _count,
        "head_seq": _count,
        "head_at": _time,
        "seq": _opt_count,
        "window": _count,
        "max_frame": _count,
        "safe": _opt_count,
    },
    ERROR: {"code": _matching(_CODE_RE), "error": _text(MAX_ERROR_TEXT)},
    SNAP_BEGIN: {
        "id": _count,
        "version": _count,
        "seq": _count,
        "at": _time,
        "inputs": _positions,
        "outputs": _positions,
        "items": _count,
        "first": _count,
        "chunk": _count,
    },
    CHUNK: {"id": _count, "i": _count, "first": _count, "count": _count},
    SNAP_END: {"id": _count, "chunks": _count, "items": _count},
    POINT: {
        "version": _count,
        "seq": _count,
        "at": _time,
        "inputs": _positions,
        "outputs": _positions,
        "delta": _flag,
    },
    HEAD: {"n": _count, "seq": _count, "at": _time, "safe": _opt_count},
    ACK: {"bytes": _count, **_PROGRESS},
    NACK: {"k": _count, "reason": _choice(NACK_REASONS), "bytes": _count, **_PROGRESS},
    RESTART: {"k": _count, "mode": _choice(MODES)},
}


def check_meta(frame_type: int, meta: object) -> dict[str, Any]:
    """Type-check a frame's metadata against its schema; WireError names the bad field."""
    name = TYPE_NAMES[frame_type]
    if type(meta) is not dict:
        raise WireError(f"{name} metadata is a {type(meta).__name__}, not a map")
    schema = SCHEMAS[frame_type]
    if len(meta) != len(schema) or meta.keys() != schema.keys():
        missing = sorted(set(schema) - set(meta))
        unknown = sorted(map(str, set(meta) - set(schema)))[:5]
        raise WireError(f"{name} metadata: missing fields {missing}, unknown fields {unknown}")
    for field, ok in schema.items():
        if not ok(meta[field]):
            raise WireError(
                f"{name} field {field!r} has a bad value {str(meta[field])[:60]!r} "
                f"({type(meta[field]).__name__})"
            )
    return meta


# --------------------------------------------------------------------------- encoding


def encode(
    frame_type: int, meta: dict[str, Any], payload: Sequence[bytes | memoryview] = ()
) -> list[bytes | memoryview]:
    """One frame as a list of buffers for a gathering send: the header and metadata joined,
    then the payload's parts as given (never copied into one buffer). The metadata is
    checked against the schema first, so this end never sends what the peer would refuse."""
    check_meta(frame_type, meta)
    body = pack(meta)
    if len(body) > MAX_META:
        raise WireError(
            f"{TYPE_NAMES[frame_type]} metadata of {len(body)} bytes exceeds {MAX_META}"
        )
    size = 0
    crc = zlib.crc32(body)
    for part in payload:
        size += len(part)
        crc = zlib.crc32(part, crc)
    if size and frame_type not in WITH_PAYLOAD:
        raise WireError(f"{TYPE_NAMES[frame_type]} frames carry no payload")
    if size > MAX_PAYLOAD:
        raise WireError(
            f"{TYPE_NAMES[frame_type]} payload of {size} bytes exceeds {MAX_PAYLOAD}; "
            "split the state into smaller values"
        )
    head = _HEAD16.pack(MAGIC, VERSION, frame_type, len(body), size, crc)
    out: list[bytes | memoryview] = [head + struct.pack("!I", zlib.crc32(head)) + body]
    out.extend(p for p in payload if len(p))
    return out


def encode_bytes(
    frame_type: int, meta: dict[str, Any], payload: Sequence[bytes | memoryview] = ()
) -> bytes:
    """:func:`encode` joined into one bytes object (small frames, tests)."""
    return b"".join(encode(frame_type, meta, payload))


def frame_size(parts: Sequence[bytes | memoryview]) -> int:
    return sum(map(len, parts))


def encode_error(code: str, text: str) -> bytes:
    """An ERROR frame; the text is cut to MAX_ERROR_TEXT and made printable."""
    clean = "".join(ch if ch.isprintable() else "?" for ch in text)[:MAX_ERROR_TEXT]
    return encode_bytes(ERROR, {"code": code if _CODE_RE.match(code) else "error", "error": clean})


def encode_point(point: Point, seq: int) -> list[bytes | memoryview]:
    """A POINT frame for ``point``, the ``seq``-th point this primary published."""
    delta = point.delta
    if delta is not None and delta.version != point.version:
        raise WireError(
            f"point at version {point.version} carries a delta of version {delta.version}"
        )
    meta = {
        "version": point.version,
        "seq": seq,
        "at": float(point.at),
        "inputs": dict(point.inputs),
        "outputs": dict(point.outputs),
        "delta": delta is not None,
    }
    return encode(POINT, meta, [delta.encode()] if delta is not None else [])


def decode_point(meta: dict[str, Any], payload: memoryview) -> Point:
    """The Point a POINT frame carries; WireError if its delta is malformed or disagrees."""
    delta = None
    if meta["delta"]:
        try:
            fields = msgpack.unpackb(
                payload, raw=False, strict_map_key=False, use_list=True, ext_hook=_reject_ext
            )
        except Exception as err:  # msgpack raises many types for hostile bytes; all mean "bad"
            raise WireError(f"POINT delta is not valid msgpack: {err}") from err
        if (
            type(fields) is not list
            or len(fields) != 3
            or type(fields[0]) is not int
            or type(fields[1]) is not dict
            or type(fields[2]) is not list
        ):
            raise WireError("POINT delta is not [version, set, deleted]")
        version, changes, deleted = fields
        if version != meta["version"]:
            raise WireError(
                f"POINT at version {meta['version']} carries a delta of version {version}"
            )
        if not _str_keys(changes) or not all(type(k) is str for k in deleted):
            raise WireError("POINT delta has a key that is not a string")
        delta = Delta(version, changes, tuple(deleted))
    elif len(payload):
        raise WireError("POINT without a delta carries a payload")
    return Point(meta["version"], delta, meta["inputs"], meta["outputs"], meta["at"])


def _reject_ext(code: int, data: bytes) -> object:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def _str_keys(d: dict[Any, Any]) -> bool:
    return not d or set(map(type, d)) == {str}


def decode_items(payload: memoryview, count: int) -> dict[str, Any]:
    """The state items a CHUNK carries: a msgpack map of exactly ``count`` string keys."""
    try:
        items = msgpack.unpackb(
            payload, raw=False, strict_map_key=False, use_list=True, ext_hook=_reject_ext
        )
    except Exception as err:  # msgpack raises many types for hostile bytes; all mean "bad"
        raise WireError(f"CHUNK payload is not valid msgpack: {err}") from err
    if type(items) is not dict:
        raise WireError(f"CHUNK payload is a {type(items).__name__}, not a map")
    if len(items) != count:
        raise WireError(f"CHUNK announces {count} items but holds {len(items)}")
    if not _str_keys(items):
        raise WireError("CHUNK holds a key that is not a string")
    return items


def _unpack_meta(data: memoryview) -> Any:
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True, ext_hook=_reject_ext
        )
    except Exception as err:  # msgpack raises many types for hostile bytes; all mean "bad"
        raise WireError(f"frame metadata is not valid msgpack: {err}") from err


# --------------------------------------------------------------------------- proofs


def _mac(token: str, label: bytes, server_nonce: bytes, replica_nonce: bytes, *names: str) -> bytes:
    msg = b"\0".join(
        [
            b"dpmigrate-statesync-v1",
            label,
            server_nonce + replica_nonce,
            *(n.encode() for n in names),
        ]
    )
    return hmac.new(token.encode(), msg, hashlib.sha256).digest()


def replica_proof(
    token: str, stage: str, role: str, node: str, server_nonce: bytes, replica_nonce: bytes
) -> bytes:
    """What a replica sends to prove it knows the token (bound to both nonces and names)."""
    return _mac(token, b"replica", server_nonce, replica_nonce, stage, role, node)


def primary_proof(
    token: str, stage: str, node: str, server_nonce: bytes, replica_nonce: bytes
) -> bytes:
    """What the primary sends back to prove it knows the token too."""
    return _mac(token, b"primary", server_nonce, replica_nonce, stage, node)


def proofs_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


# --------------------------------------------------------------------------- reading


def describe_header(word: int, version: int, frame_type: int) -> str | None:
    """Why a header with these first fields is not ours, or None if they are fine."""
    if word != MAGIC:
        return (
            f"bad magic {word.to_bytes(2, 'big')!r} (expected b'DS'; is this a dpmigrate "
            "statesync peer?)"
        )
    if version != VERSION:
        return f"unsupported statesync protocol version {version} (this end speaks {VERSION})"
    if frame_type not in TYPE_NAMES:
        return f"unknown frame type {frame_type}"
    return None


class FrameReader:
    """Accumulates received bytes in one reusable buffer and cuts them into frames.

    ``allowed`` is the set of frame types this direction and phase may carry, ``max_meta`` and
    ``max_payload`` bound one frame: every header is validated before its body is awaited, so
    a peer can never make the reader wait for or allocate more than one frame. The buffer
    starts at ``size`` and grows only to hold one announced (valid) frame. ``prefault``
    touches every page of it now, so the first reads do not pay the page faults (about 5 ms
    for 8 MiB here: a quarter of a 20 MiB snapshot's time).
    """

    def __init__(
        self,
        allowed: frozenset[int],
        *,
        max_meta: int = MAX_META,
        max_payload: int = MAX_PAYLOAD,
        size: int = 1 << 16,
        prefault: bool = False,
    ) -> None:
        self.allowed = allowed
        self.max_meta = max_meta
        self.max_payload = max_payload
        self.buf = bytearray(max(size, 4096))
        if prefault:
            self.buf[::4096] = bytes(len(self.buf[::4096]))
        self._mv = memoryview(self.buf)
        self.start = 0
        self.end = 0
        self.peak = len(self.buf)

    def reset(self, allowed: frozenset[int], max_meta: int, max_payload: int) -> None:
        """Forget any buffered bytes and take new limits (a new connection reuses the
        buffer)."""
        self.allowed = allowed
        self.max_meta = max_meta
        self.max_payload = max_payload
        self.start = self.end = 0

    @property
    def pending(self) -> int:
        """Bytes received and not yet cut into frames."""
        return self.end - self.start

    def _room(self, need: int) -> None:
        """Make room for ``need`` bytes after the unparsed tail: move it to the front, or grow
        into a new buffer (old views stay valid on the old one)."""
        start, end = self.start, self.end
        if start == end:
            self.start = self.end = 0
            start = end = 0
        if len(self.buf) - end >= need:
            return
        n = end - start
        if n + need <= len(self.buf):
            self.buf[:n] = self._mv[start:end] if n <= start else bytes(self._mv[start:end])
        else:
            grown = bytearray(max(n + need, 2 * len(self.buf)))
            grown[:n] = self._mv[start:end]
            self.buf = grown
            self._mv = memoryview(grown)
            self.peak = max(self.peak, len(grown))
        self.start, self.end = 0, n

    def recv_from(self, sock: Any, limit: int = 4 << 20) -> int:
        """One recv_into(); returns the count, 0 meaning EOF. Raises BlockingIOError /
        OSError as the socket does.

        It asks for up to ``limit`` bytes (or all a frame in progress still needs, if more),
        into the space after the data: few large reads (the syscall count, not the bytes,
        dominates the receive cost). A partial frame is moved to the front only when the
        frame in progress would not fit behind its start, so with a buffer of a few
        ``limit``s a move happens at most once per buffer-full. (Moving the partial frame on
        every read cost more than the crc32 of the data did.)
        """
        missing = self._missing()
        self._room(max(missing, 4096))  # the whole frame in progress fits behind its start
        stop = min(len(self.buf), self.end + max(missing, limit))
        n = sock.recv_into(self._mv[self.end : stop])
        self.end += n
        return n

    def feed(self, data: bytes) -> None:
        """Append ``data`` as if it had been received (tests, in-memory use)."""
        self._room(len(data))
        self.buf[self.end : self.end + len(data)] = data
        self.end += len(data)

    def _missing(self) -> int:
        """How many more bytes the frame at the front needs: 0 when no frame is in progress
        (the buffer is empty or its front frame complete, or the header will be refused)."""
        have = self.end - self.start
        if have < HEADER_SIZE:
            return HEADER_SIZE - have if have else 0
        _, _, _, meta_len, payload_len, _, _ = HEADER.unpack_from(self.buf, self.start)
        if meta_len > self.max_meta or payload_len > self.max_payload:
            return 0  # next() will refuse it
        return max(0, HEADER_SIZE + meta_len + payload_len - (self.end - self.start))

    def next(self) -> Frame | None:
        """The next complete frame, or None if more bytes are needed.

        Raises FramingError (header not ours or damaged: drop the connection), ChecksumError
        (this frame's body is damaged; the reader has skipped it) or WireError (a valid frame
        with bad contents; the reader has skipped it).
        """
        start = self.start
        if self.end - start < HEADER_SIZE:
            return None
        buf = self.buf
        word, version, ftype, meta_len, payload_len, crc, hcrc = HEADER.unpack_from(buf, start)
        why = describe_header(word, version, ftype)
        if why:
            raise FramingError(why)
        if zlib.crc32(self._mv[start : start + 16]) != hcrc:
            raise FramingError("frame header checksum mismatch (damaged in transit)", True)
        name = TYPE_NAMES[ftype]
        if ftype not in self.allowed:
            raise FramingError(f"unexpected {name} frame in this direction or phase")
        if meta_len > self.max_meta or payload_len > (
            self.max_payload if ftype in WITH_PAYLOAD else 0
        ):
            raise FramingError(
                f"{name} frame announces {meta_len} + {payload_len} bytes, above the limit "
                f"of {self.max_meta} + {self.max_payload if ftype in WITH_PAYLOAD else 0}"
            )
        body = start + HEADER_SIZE
        stop = body + meta_len + payload_len
        if stop > self.end:
            return None
        self.start = stop
        size = stop - start
        mv = self._mv
        if zlib.crc32(mv[body:stop]) != crc:
            raise ChecksumError(f"{name} frame body checksum mismatch", ftype, size)
        meta = check_meta(ftype, _unpack_meta(mv[body : body + meta_len]))
        return Frame(ftype, meta, mv[body + meta_len : stop], size)


# --------------------------------------------------------------------------- writing

_IOV_MAX = 512  # buffers per sendmsg() call (the kernel's limit is 1024)


class OutQueue:
    """Frames waiting for the kernel, written with one gathering sendmsg() per call: headers
    and payloads are never joined into one buffer, and only a partial write leaves a
    memoryview behind."""

    __slots__ = ("bufs", "nbytes")

    def __init__(self) -> None:
        self.bufs: deque[bytes | memoryview] = deque()
        self.nbytes = 0

    def __bool__(self) -> bool:
        return self.nbytes > 0

    def extend(self, parts: Sequence[bytes | memoryview], nbytes: int) -> None:
        self.bufs.extend(parts)
        self.nbytes += nbytes

    def write(self, sock: socket.socket) -> int:
        """Write what the socket takes now; returns the byte count. OSError other than
        EAGAIN/EINTR propagates (the peer is gone)."""
        bufs = self.bufs
        total = 0
        while bufs:
            try:
                if len(bufs) <= _IOV_MAX:
                    n = sock.sendmsg(bufs)
                else:
                    n = sock.sendmsg(list(itertools.islice(bufs, _IOV_MAX)))
            except (BlockingIOError, InterruptedError):
                return total
            total += n
            if n == self.nbytes:
                bufs.clear()
                self.nbytes = 0
                return total
            self.nbytes -= n
            while n:
                size = len(bufs[0])
                if n >= size:
                    n -= size
                    bufs.popleft()
                else:
                    bufs[0] = memoryview(bufs[0])[n:]
                    return total  # the kernel took less than offered: it is full for now
        return total


def tune_socket(sock: socket.socket, dead_after: float) -> None:
    """Non-blocking, no Nagle delay (acks must leave at once), and a dead peer noticed within
    about ``dead_after`` seconds even on an idle or half-open link (keepalive and
    TCP_USER_TIMEOUT), so no thread waits forever on a vanished node."""
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(dead_after / 2)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1000, int(dead_after * 1000)))
