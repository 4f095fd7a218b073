"""The agents' control protocol: versioned, authenticated, length-prefixed JSON.

Every connection starts with a challenge, so the cluster token never crosses the wire:

    agent  -> client   {"v": 1, "hello": "dpmigrate-agent", "node": N, "nonce": HEX}
    client -> agent    {"v": 1, "auth": HMAC-SHA256(token, nonce) as hex}
    agent  -> client   {"v": 1, "ok": true}            (or an error, then the agent hangs up)

then any number of requests and replies on the same connection:

    client -> agent    {"v": 1, "id": INT, "op": NAME, "args": {...}}
    agent  -> client   {"v": 1, "id": INT, "ok": true, "result": ...}
                       {"v": 1, "id": INT, "ok": false, "error": TEXT}

A frame is a 4-byte big-endian length and that many bytes of UTF-8 JSON (at most
:data:`MAX_FRAME`). JSON, never pickle or eval: a frame from the network is data. Anything
malformed — bad length, bad JSON, wrong version, unknown op, wrong argument types — gets an
error reply (when the frame could be read at all) and changes nothing. The operations and
their typed arguments are the agent's :class:`~dpmigrate.runtime.operations.OperationTable`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import socket
import struct
import threading
from typing import Any

from dpmigrate.errors import AgentUnreachable, AuthError, ProtocolError, RemoteError

VERSION = 1
MAX_FRAME = 1 << 20
_LEN = struct.Struct("!I")


def send_frame(sock: socket.socket, obj: dict[str, Any]) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"control message of {len(data)} bytes exceeds {MAX_FRAME}")
    sock.sendall(_LEN.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 65536))
        if not chunk:
            raise ConnectionError("peer closed the control connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket) -> dict[str, Any]:
    """Read one frame; ProtocolError for anything that is not a versioned JSON object."""
    (length,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if length > MAX_FRAME:
        raise ProtocolError(f"control frame of {length} bytes exceeds the maximum {MAX_FRAME}")
    raw = _recv_exact(sock, length)
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError(f"control frame is not UTF-8 JSON: {err}") from err
    if not isinstance(obj, dict):
        raise ProtocolError("control frame must be a JSON object")
    if obj.get("v") != VERSION:
        raise ProtocolError(f"control protocol version {obj.get('v')!r} is not {VERSION}")
    return obj


def proof(token: str, nonce: str) -> str:
    return hmac.new(token.encode(), bytes.fromhex(nonce), hashlib.sha256).hexdigest()


def server_handshake(sock: socket.socket, token: str, node: str) -> None:
    """Challenge a new client; raise AuthError (after telling it why) unless it knows the token."""
    nonce = secrets.token_hex(16)
    send_frame(sock, {"v": VERSION, "hello": "dpmigrate-agent", "node": node, "nonce": nonce})
    reply = recv_frame(sock)
    auth = reply.get("auth")
    if not isinstance(auth, str) or not hmac.compare_digest(auth, proof(token, nonce)):
        send_frame(sock, {"v": VERSION, "ok": False,
                          "error": "authentication failed: wrong or missing cluster token "
                                   "(DPMIGRATE_TOKEN)"})  # fmt: skip
        raise AuthError("client failed authentication")
    send_frame(sock, {"v": VERSION, "ok": True})


class AgentClient:
    """A connection to one agent (unix socket path, abstract name, or host:port)."""

    def __init__(self, address: str, token: str, timeout: float = 30.0) -> None:
        self.address = address
        self._lock = threading.Lock()
        self._next_id = 0
        try:
            self._sock = _connect(address, timeout)
        except OSError as err:
            raise AgentUnreachable(
                f"cannot reach the agent at {address} ({err.strerror or err}); is the cluster up? "
                "(`dpmigrate cluster status`)"
            ) from err
        try:
            hello = recv_frame(self._sock)
            nonce = hello.get("nonce")
            if hello.get("hello") != "dpmigrate-agent" or not isinstance(nonce, str):
                raise ProtocolError(f"{address} is not a dpmigrate agent")
            self.node = str(hello.get("node", "?"))
            send_frame(self._sock, {"v": VERSION, "auth": proof(token, nonce)})
            answer = recv_frame(self._sock)
            if not answer.get("ok"):
                raise AuthError(f"agent at {address} refused us: {answer.get('error')}")
        except (OSError, ConnectionError) as err:
            self._sock.close()
            # a dying agent accepts, then resets: as unreachable as one that is gone
            raise AgentUnreachable(
                f"agent at {address} hung up during the handshake: {err}"
            ) from err
        except BaseException:
            self._sock.close()
            raise

    def call(self, op: str, **args: Any) -> Any:
        with self._lock:
            self._next_id += 1
            request = {"v": VERSION, "id": self._next_id, "op": op, "args": args}
            try:
                send_frame(self._sock, request)
                reply = recv_frame(self._sock)
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
