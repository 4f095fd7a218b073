"""The agents' control protocol: versioned, mutually authenticated, every frame MACed.

A connection starts with a mutual challenge on a credential — the cluster token, or a stage's
own key derived from it — so no secret crosses the wire and each side proves itself:

    agent  -> client   {"v": 2, "hello": "dpmigrate-agent", "node": N, "nonce": NS}
    client -> agent    {"v": 2, "as": P, "nonce": NC, "auth": MAC(K, client|NS|NC|P)}
    agent  -> client   {"v": 2, "ok": true, "auth": MAC(K, agent|NC|NS|N)}
                       (or an error, then the agent hangs up)

``P``, the principal, is ``cluster`` (``K`` = the token: the CLI, the engine, other agents) or
``stage:APP/STAGE`` (``K`` = :func:`stage_key`: a stage process, which never holds the token
and may only use the few operations a stage needs, for its own app). The client checks the
agent's proof before it sends a request, so a fake agent that relays a real agent's nonce
learns nothing it can use: both sides then derive a session key ``MAC(K, session|NS|NC)``,
and every later frame carries ``MAC(session key, direction | sequence number | body)``. A
frame altered, injected, replayed or reordered fails its MAC and ends the connection.

    client -> agent    {"v": 2, "id": INT, "op": NAME, "args": {...}}
    agent  -> client   {"v": 2, "id": INT, "ok": true, "result": ...}
                       {"v": 2, "id": INT, "ok": false, "error": TEXT}

On the wire a frame is a 4-byte big-endian length and that many bytes: during the handshake
UTF-8 JSON (at most :data:`MAX_HANDSHAKE_FRAME`: a stranger cannot make the agent read
more), after it a 32-byte MAC and the JSON (at most :data:`MAX_FRAME`). JSON, never pickle
or eval: a frame from the network is data. Anything malformed — bad length, bad JSON, too
deep, wrong version, unknown op, wrong argument types — gets an error reply (when the frame
could be read at all) and changes nothing. The operations and their typed arguments are the
agent's :class:`~dpmigrate.runtime.operations.OperationTable`.

Why a challenge and a session MAC rather than mutual TLS: the credential already exists (the
cluster token, which etcd-less tests and the local cluster create), there is no CA to create,
rotate and hand to every stage, most control traffic runs on unix sockets where TLS would
protect nothing the kernel does not, and the messages are not secret — their integrity and
origin are what matters. Confidentiality is not provided; put untrusted networks behind the
SSH transport of the nodes (DESIGN.md §7).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import re
import secrets
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

from dpmigrate.errors import AgentUnreachable, AuthError, ProtocolError, RemoteError
from dpmigrate.transports.resolver import NAME_RE

VERSION = 2
MAX_FRAME = 1 << 20
#: Largest frame before the peer proved itself: a HELLO or an AUTH is a few hundred bytes.
MAX_HANDSHAKE_FRAME = 4096
#: How long an agent waits for a new connection's proof (a stranger holds a slot that long).
HANDSHAKE_TIMEOUT_S = 5.0
CLUSTER = "cluster"
_LEN = struct.Struct("!I")
_SEQ = struct.Struct("!Q")
_MAC_SIZE = 32
_NONCE_RE = re.compile(r"^[0-9a-f]{32}$")
_TO_AGENT, _TO_CLIENT = b"c", b"a"


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"\0".join(parts), hashlib.sha256).digest()


def stage_key(token: str, app: str, stage: str) -> bytes:
    """The key a stage process authenticates with: derived from the token by the agents, so
    any agent of the cluster recognises the stage (also after a migration) while the stage
    never holds the token itself."""
    return _mac(token.encode(), b"dpmigrate stage key", app.encode(), stage.encode())


def ring_key(token: str, ring: str) -> bytes:
    """The credential of one ring (or one statesync channel): both of its ends get it from
    their agents; it proves a peer to the other end, and nothing else."""
    return _mac(token.encode(), b"dpmigrate ring key", ring.encode())


@dataclasses.dataclass(frozen=True)
class Credential:
    """Who a client is and the key that proves it."""

    principal: str
    key: bytes = dataclasses.field(repr=False)

    @classmethod
    def cluster(cls, token: str) -> Credential:
        return cls(CLUSTER, token.encode())

    @classmethod
    def stage(cls, app: str, stage: str, key: bytes) -> Credential:
        return cls(f"stage:{app}/{stage}", key)


def stage_of(principal: str) -> tuple[str, str] | None:
    """(app, stage) of a stage principal; None for the cluster principal."""
    kind, _, ref = principal.partition(":")
    app, _, stage = ref.partition("/")
    if kind != "stage" or not (NAME_RE.fullmatch(app) and NAME_RE.fullmatch(stage)):
        return None
    return app, stage


# -- frames ---------------------------------------------------------------------------------
def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 65536))
        if not chunk:
            raise ConnectionError("peer closed the control connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _encode(obj: dict[str, Any], limit: int) -> bytes:
    data = json.dumps(obj, separators=(",", ":")).encode()
    if len(data) > limit:
        raise ProtocolError(f"control message of {len(data)} bytes exceeds {limit}")
    return data


def _decode(raw: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError(f"control frame is not UTF-8 JSON: {err}") from err
    except RecursionError:
        raise ProtocolError("control frame is nested too deeply") from None
    if not isinstance(obj, dict):
        raise ProtocolError("control frame must be a JSON object")
    if obj.get("v") != VERSION:
        raise ProtocolError(f"control protocol version {obj.get('v')!r} is not {VERSION}")
    return obj


def _read_body(sock: socket.socket, limit: int) -> bytes:
    (length,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if length > limit:
        raise ProtocolError(f"control frame of {length} bytes exceeds the maximum {limit}")
    return _recv_exact(sock, length)


def send_frame(sock: socket.socket, obj: dict[str, Any]) -> None:
    """A handshake frame (plain JSON): before a session key exists."""
    data = _encode(obj, MAX_HANDSHAKE_FRAME)
    sock.sendall(_LEN.pack(len(data)) + data)


def recv_frame(sock: socket.socket) -> dict[str, Any]:
    """Read one handshake frame; ProtocolError for anything that is not a versioned JSON
    object of at most :data:`MAX_HANDSHAKE_FRAME` bytes."""
    return _decode(_read_body(sock, MAX_HANDSHAKE_FRAME))


class Session:
    """One authenticated connection: frames MACed with the session key and numbered in each
    direction, so none can be forged, replayed, dropped or reordered unnoticed."""

    def __init__(
        self, sock: socket.socket, key: bytes, principal: str, outgoing: bytes, peer: str
    ) -> None:
        self.sock = sock
        self.principal = principal
        self.peer = peer  # the agent's node name (client side) or the principal (agent side)
        #: (app, stage) when the peer is a stage process, else None (the cluster principal)
        self.stage = stage_of(principal)
        self._key = key
        self._out, self._in = outgoing, (_TO_CLIENT if outgoing == _TO_AGENT else _TO_AGENT)
        self._sent = 0
        self._received = 0

    def send(self, obj: dict[str, Any]) -> None:
        data = _encode(obj, MAX_FRAME - _MAC_SIZE)
        mac = _mac(self._key, self._out, _SEQ.pack(self._sent), data)
        self._sent += 1
        self.sock.sendall(_LEN.pack(len(data) + _MAC_SIZE) + mac + data)

    def recv(self) -> dict[str, Any]:
        raw = _read_body(self.sock, MAX_FRAME)
        if len(raw) < _MAC_SIZE:
            raise ProtocolError("control frame too short to carry its MAC")
        mac, data = raw[:_MAC_SIZE], raw[_MAC_SIZE:]
        want = _mac(self._key, self._in, _SEQ.pack(self._received), data)
        if not hmac.compare_digest(mac, want):
            raise AuthError(
                "a control frame failed its MAC (altered, injected, replayed or out of order); "
                "the connection is closed"
            )
        self._received += 1
        return _decode(data)


def server_handshake(
    sock: socket.socket, keys: Callable[[str], bytes | None], node: str
) -> Session:
    """Challenge a new client and prove ourselves; raise AuthError (after telling it a
    generic reason) unless it holds the key of the principal it claims. ``keys(principal)``
    returns that key, or None for a principal this agent does not know."""
    nonce = secrets.token_hex(16)
    send_frame(sock, {"v": VERSION, "hello": "dpmigrate-agent", "node": node, "nonce": nonce})
    reply = recv_frame(sock)
    principal, theirs, auth = reply.get("as"), reply.get("nonce"), reply.get("auth")
    key = None
    if (
        isinstance(principal, str) and isinstance(theirs, str) and isinstance(auth, str)
        and _NONCE_RE.fullmatch(theirs) and len(principal) <= 300
    ):  # fmt: skip
        key = keys(principal)
    want = (
        _mac(key, b"client", nonce.encode(), theirs.encode(), principal.encode()).hex()
        if key is not None
        else ""
    )
    if key is None or not hmac.compare_digest(str(auth), want):
        send_frame(sock, {"v": VERSION, "ok": False,
                          "error": "authentication failed: wrong or missing cluster token "
                                   "(DPMIGRATE_TOKEN) or stage key"})  # fmt: skip
        raise AuthError("client failed authentication")
    mine = _mac(key, b"agent", theirs.encode(), nonce.encode(), node.encode()).hex()
    send_frame(sock, {"v": VERSION, "ok": True, "auth": mine})
    session_key = _mac(key, b"session", nonce.encode(), theirs.encode())
    return Session(sock, session_key, principal, _TO_CLIENT, principal)


def client_handshake(sock: socket.socket, credential: Credential, address: str) -> Session:
    """Answer an agent's challenge and check its proof; AuthError if it has none (a fake
    agent, or one of another cluster)."""
    hello = recv_frame(sock)
    nonce = hello.get("nonce")
    node = hello.get("node")
    if (
        hello.get("hello") != "dpmigrate-agent" or not isinstance(nonce, str)
        or not _NONCE_RE.fullmatch(nonce) or not isinstance(node, str)
    ):  # fmt: skip
        raise ProtocolError(f"{address} is not a dpmigrate agent (protocol {VERSION})")
    mine = secrets.token_hex(16)
    key, principal = credential.key, credential.principal
    auth = _mac(key, b"client", nonce.encode(), mine.encode(), principal.encode()).hex()
    send_frame(sock, {"v": VERSION, "as": principal, "nonce": mine, "auth": auth})
    answer = recv_frame(sock)
    if not answer.get("ok"):
        raise AuthError(f"agent at {address} refused us: {answer.get('error')}")
    want = _mac(key, b"agent", mine.encode(), nonce.encode(), node.encode()).hex()
    if not hmac.compare_digest(str(answer.get("auth", "")), want):
        raise AuthError(
            f"the peer at {address} claims to be agent {node!r} but cannot prove it holds the "
            "cluster token: it is not an agent of this cluster (or its token differs)"
        )
    session_key = _mac(key, b"session", nonce.encode(), mine.encode())
    return Session(sock, session_key, principal, _TO_AGENT, node)


class AgentClient:
    """A connection to one agent (unix socket path, abstract name, or host:port).

    ``credential``: the cluster token (a str) or a :class:`Credential` (a stage's own)."""

    def __init__(
        self, address: str, credential: str | Credential, timeout: float = 30.0
    ) -> None:
        self.address = address
        self._lock = threading.Lock()
        self._next_id = 0
        if isinstance(credential, str):
            credential = Credential.cluster(credential)
        try:
            self._sock = _connect(address, timeout)
        except OSError as err:
            raise AgentUnreachable(
                f"cannot reach the agent at {address} ({err.strerror or err}); is the cluster up? "
                "(`dpmigrate cluster status`)"
            ) from err
        try:
            self._session = client_handshake(self._sock, credential, address)
        except (OSError, ConnectionError) as err:
            self._sock.close()
            # a dying agent accepts, then resets: as unreachable as one that is gone
            raise AgentUnreachable(
                f"agent at {address} hung up during the handshake: {err}"
            ) from err
        except BaseException:
            self._sock.close()
            raise
        self.node = self._session.peer

    def call(self, op: str, **args: Any) -> Any:
        with self._lock:
            self._next_id += 1
            request = {"v": VERSION, "id": self._next_id, "op": op, "args": args}
            try:
                self._session.send(request)
                reply = self._session.recv()
            except (OSError, ConnectionError) as err:
                raise RemoteError(
                    f"agent at {self.address} went away during {op!r}: {err}"
                ) from err
        if reply.get("id") != request["id"]:
            raise ProtocolError(f"agent at {self.address} answered request {reply.get('id')!r}")
        if not reply.get("ok"):
            raise RemoteError(f"agent {self.node}: {op} failed: {reply.get('error')}")
        return reply.get("result")

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _connect(address: str, timeout: float) -> socket.socket:
    if address.startswith("/") or address.startswith("@"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        target: Any = "\0" + address[1:] if address.startswith("@") else address
    else:
        host, _, port = address.rpartition(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        target = (host, int(port))
    sock.settimeout(timeout)
    try:
        sock.connect(target)
    except BaseException:
        sock.close()
        raise
    return sock
