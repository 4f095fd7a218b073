#!/usr/bin/env python3
"""Ring transports against their peers and against the machine's ceilings, in one run.

    .venv/bin/python benchmarks/rings.py             # full run, about 5 minutes
    .venv/bin/python benchmarks/rings.py --quick     # under a minute
    .venv/bin/python benchmarks/rings.py --quick --transports shm,mp.Queue

Prints the machine, one table of every case (median of the repeats and their min-max), the
ceilings and the issue-16 targets, and writes ``benchmarks/results/rings.json`` (``--out``
to write elsewhere). pyzmq is a benchmark-only extra (``pip install .[bench]``); without it
the zmq-ipc rows say so and the rest still run.

Cases
    message size 64 B and 4 KiB, times burst 1 and 32, times the transports: the dpmigrate
    rings (opened through ``dpmigrate.transports`` with a DirectoryResolver in a temp dir,
    capacity 1024 messages) ``shm``, ``shm-2m``/``shm-4k`` (2 MB or 4 KB pages only),
    ``tcp``, ``tcp+tls``, each "/views" row the same ring received with ``recv_views``
    (bursts only), ``shm-l2/views`` (a 512 KiB data area instead of 4 MiB), and the peers
    ``mp.Queue``, ``mp.Pipe``, ``socketpair``, ``zmq-ipc`` and ``faster-fifo``.

How each transport is used (a fair user of its API)
    burst 1 is one message per call; burst 32 is the batch API where there is one, and
    otherwise the 32 messages travel as one object / one write, because that is what a user
    who cares about speed does with that API:

    * shm, tcp: ``send`` / ``recv``; bursts: ``send_burst`` (repeated until all 32 are in)
      / ``recv_burst(32)``. Calls get a timeout (5 s): the rings' timeouts cost nothing
      when data is ready.
    * mp.Queue (maxsize 1024 messages, i.e. 32 lists in burst mode, to match the rings'
      window: an unbounded queue has no backpressure, which a ring must have; unbounded it
      runs up to ~1.5x faster with 64 B bursts): ``put(bytes)`` / ``get()``; bursts:
      ``put(list of 32 bytes)`` / ``get()``, one pickled object.
    * mp.Pipe (``duplex=False``, one per direction): ``send_bytes`` / ``recv_bytes`` (no
      pickle); bursts: ``send(list of 32 bytes)`` / ``recv()``, one pickled object.
    * socketpair (AF_UNIX stream, one duplex pair): frames are a 4-byte little-endian length
      and the payload; burst 1 is one ``sendall`` per frame, burst 32 one ``sendall`` of the
      32 frames joined. The reader ``recv``s up to 256 KiB at a time into a buffer and hands
      out one frame per call (burst 1) or up to 32 per call (burst 32).
    * zmq-ipc: pyzmq PUSH/PULL over ``ipc://`` in a temp dir, default copy semantics and
      high-water marks; bursts: ``send_multipart`` / ``recv_multipart`` of 32 frames.

    mp.Queue, mp.Pipe and socketpair use their plain blocking calls, since a timeout there
    adds a poll() to every call; they are bounded by the parent's watchdog instead (and
    closed peer fds turn a dead peer into EOF). The 32 messages of a burst are 32 distinct
    bytes objects so that pickle cannot send one and reference it 31 times.

Processes
    For each case the parent makes the channel (queues, pipes, socketpair, temp dirs) and
    forks two children: A drives, B echoes. The parent only waits, with a watchdog; any
    child still alive at the end of a case is killed by its PID, and every temp dir is
    removed, also on failure or Ctrl-C. Children die with the parent (PR_SET_PDEATHSIG).
    One case runs at a time, and A and B are pinned to one CPU each (the first two this
    process may use; ``--no-pin`` leaves placement to the scheduler), every transport the
    same way: helper threads (mp.Queue's feeder) share their process's CPU. Pinned, the
    spread between runs is smaller, and mp.Queue and raw loopback TCP are faster than
    unpinned on this machine (so the ratios against them are harder, not easier).

Throughput
    A sends a command naming the count N, reads CLOCK_MONOTONIC (t0), sends N messages; B
    reads CLOCK_MONOTONIC (t1) once the N-th message has arrived and replies with t1. Both
    processes run on one host, so they read the same clock: msgs/s = N / (t1 - t0). N is
    calibrated from a warm-up so that one repeat lasts about 0.4 s (0.15 s with --quick).
    MB/s counts payload bytes only (no frame headers), in units of 10^6 bytes.

Latency
    Ping-pong / 2: A sends one message (or one burst of 32), B sends it back as soon as it
    has all of it, A halves the round trip it measured with perf_counter. The burst latency
    is therefore the time for a whole burst of 32 to cross. ``lat_p50_us`` is the median
    over repeats of each repeat's median; its spread is the min-max of those medians;
    ``lat_p99_us`` pools every sample.

Ceilings
    * memcpy: ``dst_view[:] = src_view`` on two memoryviews of 64 MiB bytearrays, in the
      parent (CPython copies a contiguous memoryview slice with one memcpy). A buffer that
      large does not fit in cache: this is the copy bandwidth of main memory, counting each
      byte copied once. The same copy of two buffers of a quarter of this CPU's L2 each
      (256 KiB with a 1 MiB L2, 128 KiB with a 512 KiB one: together they stay in L2) is
      ``memcpy_cached_mb_s``, the in-cache ceiling target (2) uses. ``machine`` records the
      CPU (family, model, L2, vector extensions): these machines are not always the same
      CPU from one day to the next, and the in-cache copy differs two- to threefold.
    * memcpy into a 4 MiB ring: 128 KiB bursts from cache into a cycling 4 MiB area, the
      copy the shm producer makes with the default ring (information).
    * raw loopback TCP: two forked processes, one ``sendall`` of a 1 MiB memoryview after
      another, the other ``recv_into`` a 1 MiB buffer, no framing; timed with t0/t1 as above.
      The same with 128 KiB writes (one ring burst of 32 x 4 KiB each) for information.

Targets (issue 16, ratios in the same run)
    (1) shm/views 64 B bursts of 32: msgs/s >= 10x mp.Queue with the same bursts, and
        ahead of faster-fifo's put_many/get_many;
    (2) shm/views 4 KiB bursts of 32: MB/s >= 0.6 of the in-cache memcpy;
    (3) tcp/views 4 KiB bursts of 32: MB/s >= 0.6 of raw loopback TCP (1 MiB writes);
    (4) shm one-way latency p50 of single 64 B messages <= 2 us.
    Below them the same ratios for the other rows and ceilings, for comparison.

Every figure is the median of ``--repeats`` repeats (5 with --quick, 9 otherwise), taken
with throughput and latency repeats alternating; the JSON adds ``*_min`` / ``*_max`` spread
fields (and ``close_error`` when a clean close failed after the figures were taken). A case
that fails (a transport not built yet, an error, a timeout) is reported with ``error`` and
null figures; the other cases still run. On a small shared machine expect a spread of tens
of percent even pinned, and read the min-max before a single median.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import functools
import importlib.metadata
import json
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import platform
import shutil
import signal
import socket
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TRANSPORTS = (
    "shm", "shm/views", "shm-l2/views", "shm-2m", "shm-4k", "tcp", "tcp/views", "tcp+tls",
    "tcp+tls/views", "mp.Queue", "mp.Pipe", "socketpair", "zmq-ipc", "faster-fifo",
)  # fmt: skip
RING_TRANSPORTS = (
    "shm", "shm/views", "shm-l2/views", "shm-2m", "shm-4k", "tcp", "tcp/views", "tcp+tls",
    "tcp+tls/views",
)  # fmt: skip
#: the shm ring on 2 MB pages only (the case fails when none are free: --hugepages N) and on
#: 4 KB pages only, side by side; plain "shm" takes 2 MB pages when free, as stages do
#: shm-l2 is the shm ring with a 512 KiB data area instead of the default 4 MiB: small
#: enough to stay in the producer's L2 where that is 1 MiB, so its one copy runs at in-cache speed;
#: the window is then bounded by bytes (about 127 records of 4 KiB) before the 1024 messages
_SENDER_OPTS = {
    "shm-2m": {"hugepages": True},
    "shm-4k": {"hugepages": False},
    "shm-l2/views": {"ring_bytes": 512 << 10, "max_message": 64 << 10},
}
#: tcp+tls is the tcp ring with its ``tls`` option (ring_tls in a cluster): the same code,
#: with the cost of TLS 1.3 (AES-GCM) on every byte and one join per write. A "/views" row
#: is the same ring received with the zero-copy API (``recv_views``) instead of owned bytes.
_BASE = {
    "tcp+tls": "tcp", "shm-2m": "shm", "shm-4k": "shm",
    "shm/views": "shm", "shm-l2/views": "shm", "tcp/views": "tcp", "tcp+tls/views": "tcp",
}  # fmt: skip
_OPTIONAL = {"zmq-ipc": "zmq", "faster-fifo": "faster_fifo"}  # benchmark-only extras
SIZES = (64, 4096)
BURSTS = (1, 32)
CAPACITY = 1024  # ring window and mp.Queue bound, in messages
CALL_TIMEOUT = 5.0  # s; a single ring / zmq call that waits longer means the case failed
RING_RECONNECT = 2.0  # s; bounds a ring close that waits for the last acks
PEER_GRACE = RING_RECONNECT + 4.0  # s a child may still take to report after its peer failed
CHUNK = 256  # single-message sends are issued in chunks of this many between time checks
MAX_N = 5_000_000  # messages in one throughput repeat, whatever the calibration says
MAX_PINGS = 50_000  # round trips in one latency repeat
MAX_COMMANDS = 1_000  # commands B accepts in one case
MAX_FRAME = 1 << 20  # socketpair frames larger than this are a protocol error
RECV_CHUNK = 256 << 10
RESULTS = Path(__file__).resolve().parent / "results" / "rings.json"

_CMD = struct.Struct("<4sQ")  # A -> B: kind, count;  B -> A: b"DONE", t1 (ns)
_LEN = struct.Struct("<I")  # socketpair frame header
DASH = "\u2013"  # en dash, for ranges in the tables


@dataclasses.dataclass(frozen=True)
class Plan:
    """How long to measure: what --quick changes."""

    repeats: int
    tp_seconds: float  # one throughput repeat
    lat_seconds: float  # one latency repeat
    case_timeout: float  # watchdog for one case, both children together
    ceiling_seconds: float  # one repeat of a ceiling
    cpus: tuple[int, ...] = ()  # pin A and B to these two CPUs (empty: no pinning)


QUICK = Plan(repeats=5, tp_seconds=0.15, lat_seconds=0.1, case_timeout=30.0, ceiling_seconds=0.2)
FULL = Plan(repeats=9, tp_seconds=0.4, lat_seconds=0.25, case_timeout=90.0, ceiling_seconds=0.4)


class BenchError(Exception):
    """A case went wrong in a way the benchmark noticed (short count, bad reply, timeout)."""


# --------------------------------------------------------------------------- links
# A link is one process's view of a case: it sends on one direction and receives on the
# other. A (the driver) sends on "fwd" and receives on "rev"; B (the echo) the reverse.


class Link:
    """The few calls the driver and the echo need, mapped onto each transport's own API."""

    def send_one(self, msg: bytes) -> None:
        raise NotImplementedError

    def send_many(self, msgs: list[bytes]) -> None:
        raise NotImplementedError

    def recv_one(self) -> bytes:
        raise NotImplementedError

    def recv_many(self, max_n: int) -> list[bytes]:
        """Return 1..max_n messages (transports that send bursts as one object return it)."""
        raise NotImplementedError

    #: recv_many returns views that expire at the next receive (copy what must outlive it)
    views = False

    def nbytes(self, msgs: Any) -> int:
        """Payload bytes of what recv_many returned."""
        return sum(map(len, msgs))

    def close(self) -> None:
        """Close cleanly once both sides agreed to stop."""

    def abort(self) -> None:
        """Release everything after a failure without waiting for the peer."""
        with contextlib.suppress(Exception):
            self.close()


class RingLink(Link):
    """A dpmigrate ring per direction; each process is producer of its outgoing ring."""

    def __init__(self, transport: str, role: str, registry: str) -> None:
        from dpmigrate import transports
        from dpmigrate.transports.resolver import DirectoryResolver

        resolver = DirectoryResolver(registry, poll_interval=0.002)
        out_name, in_name = (
            ("bench.fwd", "bench.rev") if role == "A" else ("bench.rev", "bench.fwd")
        )
        tx_opts, rx_opts = _tls_opts(transport, registry)
        base = _BASE.get(transport, transport)
        self.views = transport.endswith("/views")
        self.tx = transports.open_sender(
            base, out_name, resolver=resolver, capacity=CAPACITY,
            reconnect_timeout=RING_RECONNECT, **tx_opts, **_SENDER_OPTS.get(transport, {}),
        )  # fmt: skip
        try:
            self.rx = transports.open_receiver(
                base, in_name, resolver=resolver, reconnect_timeout=RING_RECONNECT,
                connect_timeout=CALL_TIMEOUT, **rx_opts,
            )  # fmt: skip
        except BaseException:
            with contextlib.suppress(Exception):
                self.tx.close()
            raise
        self.early: list[bytes] = []  # what arrived while the link settled
        if tx_opts:
            self._settle()

    def _settle(self) -> None:
        """TLS: drive both ends through their handshakes before anything is timed. A process
        blocked in one ring's recv does not serve its other ring's producer, and a TLS
        handshake takes that producer a few calls (a plain keyless link: one)."""
        deadline = time.monotonic() + CALL_TIMEOUT
        while time.monotonic() < deadline:
            self.tx.service(0.001)
            self.early += self.rx.recv_burst(CAPACITY, timeout=0.001)
            if self.tx.statistics().extra.get("connected") and self.rx.statistics().extra.get(
                "connected"
            ):
                return
        raise BenchError(f"the TLS rings did not connect within {CALL_TIMEOUT} s")

    def send_one(self, msg: bytes) -> None:
        self.tx.send(msg, CALL_TIMEOUT)

    def send_many(self, msgs: list[bytes]) -> None:
        if not isinstance(msgs, list):  # a batch of views being relayed
            msgs = list(msgs)
        sent = self.tx.send_burst(msgs, CALL_TIMEOUT)
        while sent < len(msgs):  # each pass sends >= 1 or raises: at most len(msgs) passes
            more = self.tx.send_burst(msgs[sent:], CALL_TIMEOUT)
            if more <= 0:
                raise BenchError(f"ring send_burst sent nothing within {CALL_TIMEOUT} s")
            sent += more

    def recv_one(self) -> bytes:
        if self.early:
            return self.early.pop(0)
        return self.rx.recv(CALL_TIMEOUT)

    def recv_many(self, max_n: int) -> list[bytes]:
        if self.early:
            msgs, self.early = self.early[:max_n], self.early[max_n:]
            return msgs
        if self.views:
            msgs = self.rx.recv_views(max_n, CALL_TIMEOUT)
        else:
            msgs = self.rx.recv_burst(max_n, CALL_TIMEOUT)
        if not msgs:
            raise BenchError(f"ring receive got nothing within {CALL_TIMEOUT} s")
        return msgs

    def nbytes(self, msgs: Any) -> int:
        # a batch of views knows its payload bytes (the shm one from its record headers,
        # in C): counting them creates no per-message object
        return msgs.nbytes if self.views and not isinstance(msgs, list) else sum(map(len, msgs))

    def close(self) -> None:
        # Receivers first (after acking everything), then senders: each sender's close waits
        # for the acks of its last messages, which the peer has already given by then.
        try:
            self.rx.commit()
            self.rx.close()
        finally:
            self.tx.close()


class QueueLink(Link):
    def __init__(self, out_q: Any, in_q: Any) -> None:
        self.out_q, self.in_q = out_q, in_q

    def send_one(self, msg: bytes) -> None:
        self.out_q.put(msg)

    def send_many(self, msgs: list[bytes]) -> None:
        self.out_q.put(msgs)

    def recv_one(self) -> bytes:
        return self.in_q.get()

    def recv_many(self, max_n: int) -> list[bytes]:
        return self.in_q.get()

    def close(self) -> None:
        self.out_q.close()
        self.out_q.join_thread()  # flush what the feeder thread still holds

    def abort(self) -> None:
        for q in (self.out_q, self.in_q):
            q.cancel_join_thread()  # never block exit on a peer that is gone
            q.close()


class FifoLink(Link):
    """faster-fifo: a C circular buffer in shared memory with a mutex and condition
    variables; its batch API (put_many / get_many) used with identity dumps/loads, its
    fastest setting for bytes (no pickle; get_many returns memoryviews into its receive
    buffer, valid until the next get, like the rings' zero-copy receive)."""

    views = True

    def __init__(self, out_q: Any, in_q: Any) -> None:
        self.out_q, self.in_q = out_q, in_q

    def send_one(self, msg: bytes) -> None:
        self.out_q.put(msg, timeout=CALL_TIMEOUT)

    def send_many(self, msgs: list[bytes]) -> None:
        if type(msgs[0]) is not bytes:  # relaying its own views: put_many takes bytes only
            msgs = list(map(bytes, msgs))
        self.out_q.put_many(msgs, timeout=CALL_TIMEOUT)

    def recv_one(self) -> bytes:
        return bytes(self.in_q.get(timeout=CALL_TIMEOUT))

    def recv_many(self, max_n: int) -> list[bytes]:
        return self.in_q.get_many(timeout=CALL_TIMEOUT, max_messages_to_get=max_n)


def _fifo_pair() -> tuple[Any, Any]:
    import faster_fifo

    def same(x: Any) -> Any:
        return x

    # bounded like the rings: 1024 messages, and bytes enough for 1024 x 4 KiB plus headers
    return tuple(
        faster_fifo.Queue(max_size_bytes=8 << 20, maxsize=CAPACITY, loads=same, dumps=same)
        for _ in range(2)
    )  # type: ignore[return-value]


class PipeLink(Link):
    def __init__(self, reader: mpc.Connection, writer: mpc.Connection) -> None:
        self.reader, self.writer = reader, writer

    def send_one(self, msg: bytes) -> None:
        self.writer.send_bytes(msg)

    def send_many(self, msgs: list[bytes]) -> None:
        self.writer.send(msgs)

    def recv_one(self) -> bytes:
        return self.reader.recv_bytes()

    def recv_many(self, max_n: int) -> list[bytes]:
        return self.reader.recv()

    def close(self) -> None:
        self.writer.close()
        self.reader.close()


class SocketLink(Link):
    """Length-prefixed frames on a stream socket, read through a buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.pos = 0

    def send_one(self, msg: bytes) -> None:
        self.sock.sendall(_LEN.pack(len(msg)) + msg)

    def send_many(self, msgs: list[bytes]) -> None:
        parts: list[bytes] = []
        for m in msgs:
            parts.append(_LEN.pack(len(m)))
            parts.append(m)
        self.sock.sendall(b"".join(parts))

    def recv_one(self) -> bytes:
        return self._frames(1)[0]

    def recv_many(self, max_n: int) -> list[bytes]:
        return self._frames(max_n)

    def _frames(self, max_n: int) -> list[bytes]:
        out: list[bytes] = []
        buf, pos = self.buf, self.pos
        for _ in range(MAX_FRAME + 8):  # every recv adds >= 1 byte; one frame is <= 1 MiB
            end = len(buf)
            while len(out) < max_n and end - pos >= 4:
                (n,) = _LEN.unpack_from(buf, pos)
                if n > MAX_FRAME:
                    raise BenchError(f"socketpair: frame of {n} bytes announced; stream corrupt")
                if end - pos - 4 < n:
                    break
                out.append(buf[pos + 4 : pos + 4 + n])
                pos += 4 + n
            if out:
                break
            data = self.sock.recv(RECV_CHUNK)
            if not data:
                raise BenchError("socketpair: peer closed the stream")
            buf = buf[pos:] + data
            pos = 0
        self.buf, self.pos = buf, pos
        return out

    def close(self) -> None:
        self.sock.close()


class ZmqLink(Link):
    """PUSH/PULL pair per direction over ipc://; each process binds its outgoing PUSH."""

    def __init__(self, role: str, ipc_dir: str) -> None:
        import zmq

        self.zmq = zmq
        self.ctx = zmq.Context()
        out_name, in_name = ("fwd", "rev") if role == "A" else ("rev", "fwd")
        self.push = self.ctx.socket(zmq.PUSH)
        self.pull = self.ctx.socket(zmq.PULL)
        for s in (self.push, self.pull):
            s.setsockopt(zmq.SNDTIMEO, int(CALL_TIMEOUT * 1000))
            s.setsockopt(zmq.RCVTIMEO, int(CALL_TIMEOUT * 1000))
        self.push.bind(f"ipc://{ipc_dir}/{out_name}.ipc")
        self.pull.connect(f"ipc://{ipc_dir}/{in_name}.ipc")

    def send_one(self, msg: bytes) -> None:
        self.push.send(msg)

    def send_many(self, msgs: list[bytes]) -> None:
        self.push.send_multipart(msgs)

    def recv_one(self) -> bytes:
        return self.pull.recv()

    def recv_many(self, max_n: int) -> list[bytes]:
        return self.pull.recv_multipart()

    def close(self) -> None:
        self.pull.close(linger=0)
        self.push.close(linger=int(CALL_TIMEOUT * 1000))  # the last reply must get out
        self.ctx.term()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.pull.close(linger=0)
            self.push.close(linger=0)
            self.ctx.term()


def _tls_opts(transport: str, folder: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The producer's and the consumer's TLS options (the ring files _prepare made)."""
    if not transport.startswith("tcp+tls"):
        return {}, {}
    from dpmigrate.cluster.pki import ring_tls_context

    pki = Path(folder) / "pki"
    return ({"tls": ring_tls_context(pki, server_side=True)},
            {"tls": ring_tls_context(pki, server_side=False)})  # fmt: skip


def _make_link(transport: str, role: str, res: dict[str, Any]) -> Link:
    for obj in res.get("close", ()):  # the peer's ends: close them so a dead peer means EOF
        obj.close()
    if transport in RING_TRANSPORTS:
        return RingLink(transport, role, res["dir"])
    if transport == "mp.Queue":
        return QueueLink(res["out"], res["in"])
    if transport == "mp.Pipe":
        return PipeLink(res["in"], res["out"])
    if transport == "socketpair":
        return SocketLink(res["sock"])
    if transport == "zmq-ipc":
        return ZmqLink(role, res["dir"])
    if transport == "faster-fifo":
        return FifoLink(res["out"], res["in"])
    raise BenchError(f"unknown transport {transport!r}")


def _prepare(transport: str, burst: int, tmp: str) -> tuple[dict[str, Any], dict[str, Any], list]:
    """The channel of one case: what A gets, what B gets, what the parent closes after fork."""
    ctx = mp.get_context("fork")
    if transport.startswith("tcp+tls"):
        from dpmigrate.cluster.pki import make

        make(Path(tmp) / "pki", ("127.0.0.1",))
    if transport in RING_TRANSPORTS or transport == "zmq-ipc":
        return {"dir": tmp}, {"dir": tmp}, []
    if transport == "mp.Queue":
        fwd, rev = ctx.Queue(CAPACITY // burst), ctx.Queue(CAPACITY // burst)
        return {"out": fwd, "in": rev}, {"out": rev, "in": fwd}, [fwd, rev]
    if transport == "faster-fifo":
        fwd, rev = _fifo_pair()
        return {"out": fwd, "in": rev}, {"out": rev, "in": fwd}, []
    if transport == "mp.Pipe":
        fwd_r, fwd_w = ctx.Pipe(duplex=False)
        rev_r, rev_w = ctx.Pipe(duplex=False)
        a = {"out": fwd_w, "in": rev_r, "close": [fwd_r, rev_w]}
        b = {"out": rev_w, "in": fwd_r, "close": [rev_r, fwd_w]}
        return a, b, [fwd_r, fwd_w, rev_r, rev_w]
    if transport == "socketpair":
        sa, sb = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return {"sock": sa, "close": [sb]}, {"sock": sb, "close": [sa]}, [sa, sb]
    raise BenchError(f"unknown transport {transport!r}")


# --------------------------------------------------------------------------- the two roles


def _payloads(size: int, n: int) -> list[bytes]:
    """``n`` distinct bytes objects of ``size`` bytes (distinct: pickle must not dedupe)."""
    return [bytes([0x40 + i % 64]) * size for i in range(n)]


def _drive(link: Link, size: int, burst: int, plan: Plan) -> dict[str, Any]:
    """Role A: calibrate, then alternate throughput and latency repeats; return the figures."""
    deadline = time.monotonic() + plan.case_timeout
    batch = _payloads(size, burst)
    one = batch[0]
    views = link.views
    send_one, send_many, recv_one, recv_many = (
        link.send_one, link.send_many, link.recv_one, link.recv_many,
    )  # fmt: skip

    def expect_done() -> int:
        reply = recv_one()
        if len(reply) != _CMD.size:
            raise BenchError(f"echo replied {len(reply)} bytes instead of {_CMD.size}")
        kind, value = _CMD.unpack(reply)
        if kind != b"DONE":
            raise BenchError(f"echo replied {kind!r} instead of DONE")
        return value

    def check_time() -> None:
        if time.monotonic() > deadline:
            raise BenchError(f"case ran past its {plan.case_timeout:.0f} s bound")

    def throughput(n: int) -> float:
        send_one(_CMD.pack(b"THRU", n))
        t0 = time.monotonic_ns()
        if burst == 1:
            for _ in range(n // CHUNK):
                for _ in range(CHUNK):
                    send_one(one)
                check_time()
        else:
            for i in range(n // burst):
                send_many(batch)
                if not i & 63:
                    check_time()
        t1 = expect_done()
        if t1 <= t0:
            raise BenchError("echo's clock is behind the driver's: not one CLOCK_MONOTONIC?")
        return (t1 - t0) / 1e9

    def pingpong(k: int) -> list[float]:
        send_one(_CMD.pack(b"PING", k))
        samples: list[float] = []
        for _ in range(k):
            t0 = time.perf_counter_ns()
            if burst == 1:
                send_one(one)
                back = [recv_one()]
            else:
                send_many(batch)
                back = []
                for _ in range(burst):  # each call returns >= 1 message
                    got = recv_many(burst - len(back))
                    back.extend(map(bytes, got) if views else got)  # views: copy to compare
                    if len(back) >= burst:
                        break
            samples.append((time.perf_counter_ns() - t0) / 2000.0)
            if back != batch:  # checked outside the timed part
                raise BenchError(f"ping-pong: {len(back)} messages came back, not the same")
            check_time()
        expect_done()
        return samples

    def count_for(rate: float, seconds: float) -> int:
        step = CHUNK if burst == 1 else burst
        n = int(rate * seconds) // step * step
        return max(step * 4, min(MAX_N // step * step, n))

    # Warm up and calibrate: a short run, then one at half the repeat length.
    n = count_for(0, 0) * (1 if burst == 1 else 8)
    rate = n / throughput(n)
    n = count_for(rate, plan.tp_seconds / 2)
    rate = n / throughput(n)
    rtt_us = 2 * statistics.median(pingpong(50))

    tp: list[float] = []
    lat_medians: list[float] = []
    lat_all: list[float] = []
    for _ in range(plan.repeats):
        n = count_for(rate, plan.tp_seconds)
        tp.append(n / throughput(n))
        k = max(20, min(MAX_PINGS, int(plan.lat_seconds / (rtt_us * 1e-6))))
        samples = pingpong(k)
        lat_medians.append(statistics.median(samples))
        lat_all.extend(samples)
    send_one(_CMD.pack(b"QUIT", 0))
    expect_done()
    return {"tp": tp, "lat_medians": lat_medians, "lat_p99": _quantile(lat_all, 0.99)}


def _echo(link: Link, size: int, burst: int, plan: Plan) -> dict[str, Any]:
    """Role B: obey A's commands; count and check what arrives; echo pings."""
    expected_last = _payloads(size, burst)[-1]
    send_one, send_many, recv_one, recv_many = (
        link.send_one, link.send_many, link.recv_one, link.recv_many,
    )  # fmt: skip
    views, count_bytes = link.views, link.nbytes
    for _ in range(MAX_COMMANDS):
        cmd = recv_one()
        if len(cmd) != _CMD.size:
            raise BenchError(f"driver sent a {len(cmd)}-byte command; expected {_CMD.size}")
        kind, n = _CMD.unpack(cmd)
        if kind == b"THRU":
            if not 0 < n <= MAX_N:
                raise BenchError(f"driver asked for {n} messages")
            got = nbytes = 0
            last = b""
            if burst == 1:
                for _ in range(n):
                    last = recv_one()
                    nbytes += len(last)
                got = n
            else:
                for _ in range(n):  # each call returns >= 1 message
                    msgs = recv_many(burst)
                    got += len(msgs)
                    nbytes += count_bytes(msgs)
                    if got >= n:
                        last = bytes(msgs[-1])
                        break
            t1 = time.monotonic_ns()
            if got != n or nbytes != n * size:
                raise BenchError(f"expected {n} x {size} B, got {got} messages, {nbytes} B")
            if last != expected_last:
                raise BenchError("the last message of a throughput run has the wrong content")
            send_one(_CMD.pack(b"DONE", t1))
        elif kind == b"PING":
            if not 0 < n <= MAX_PINGS:
                raise BenchError(f"driver asked for {n} pings")
            for _ in range(n):
                if burst == 1:
                    send_one(recv_one())
                    continue
                if views:  # relay each batch as it comes: its views expire at the next receive
                    k = 0
                    while k < burst:
                        got = recv_many(burst - k)
                        send_many(got)
                        k += len(got)
                    continue
                msgs: list[bytes] = []
                for _ in range(burst):
                    msgs.extend(recv_many(burst - len(msgs)))
                    if len(msgs) >= burst:
                        break
                send_many(msgs)
            send_one(_CMD.pack(b"DONE", 0))
        elif kind == b"QUIT":
            send_one(_CMD.pack(b"DONE", 0))
            return {"ok": True}
        else:
            raise BenchError(f"driver sent unknown command {kind!r}")
    raise BenchError(f"driver sent more than {MAX_COMMANDS} commands")


def _case_child(
    role: str, transport: str, size: int, burst: int, res: dict[str, Any], plan: Plan
) -> dict[str, Any]:
    link = _make_link(transport, role, res)
    try:
        out = (_drive if role == "A" else _echo)(link, size, burst, plan)
    except BaseException:
        link.abort()
        raise
    try:  # the figures stand even if the clean close misbehaves; report it beside them
        link.close()
    except Exception as err:
        out["close_error"] = f"{type(err).__name__}: {err}"
        link.abort()
    return out


# --------------------------------------------------------------------------- ceilings


def _tcp_sender(port: int, plan: Plan, block_bytes: int) -> dict[str, Any]:
    """Raw loopback TCP, sending side: sendall()s of block_bytes, t0 here, t1 from the
    receiver."""
    deadline = time.monotonic() + plan.case_timeout
    block = memoryview(bytearray(b"\x5a" * block_bytes))
    with socket.create_connection(("127.0.0.1", port), timeout=CALL_TIMEOUT) as sock:
        sock.settimeout(None)
        if _recv_exact(sock, 1) != b"R":
            raise BenchError("raw tcp: receiver did not say ready")

        def run(blocks: int) -> float:
            sock.sendall(_CMD.pack(b"THRU", blocks))
            t0 = time.monotonic_ns()
            for _ in range(blocks):
                sock.sendall(block)
                if time.monotonic() > deadline:
                    raise BenchError(f"raw tcp ran past its {plan.case_timeout:.0f} s bound")
            kind, t1 = _CMD.unpack(_recv_exact(sock, _CMD.size))
            if kind != b"DONE" or t1 <= t0:
                raise BenchError("raw tcp: bad reply from the receiver")
            return (t1 - t0) / 1e9

        rate = 64 / run(64)  # blocks per second
        rate = max(16, int(rate * plan.ceiling_seconds / 2)) / run(
            max(16, int(rate * plan.ceiling_seconds / 2))
        )
        mbs = []
        for _ in range(plan.repeats):
            blocks = max(16, min(1 << 16, int(rate * plan.ceiling_seconds)))
            mbs.append(blocks * len(block) / run(blocks) / 1e6)
        sock.sendall(_CMD.pack(b"QUIT", 0))
    return {"mb_s": mbs}


def _tcp_receiver(listener: socket.socket, plan: Plan, block_bytes: int) -> dict[str, Any]:
    listener.settimeout(CALL_TIMEOUT)
    sock, _ = listener.accept()
    listener.close()
    buf = bytearray(1 << 20)
    with sock:
        sock.settimeout(None)
        sock.sendall(b"R")
        for _ in range(MAX_COMMANDS):
            kind, blocks = _CMD.unpack(_recv_exact(sock, _CMD.size))
            if kind == b"QUIT":
                return {"ok": True}
            if kind != b"THRU" or not 0 < blocks <= 1 << 16:
                raise BenchError(f"raw tcp: bad command {kind!r} {blocks}")
            want, got = blocks * block_bytes, 0
            for _ in range(want):  # every recv_into returns >= 1 byte or we stop
                n = sock.recv_into(buf)
                if n == 0:
                    raise BenchError("raw tcp: sender closed early")
                got += n
                if got >= want:
                    break
            t1 = time.monotonic_ns()
            sock.sendall(_CMD.pack(b"DONE", t1))
    raise BenchError("raw tcp: too many commands")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    for _ in range(n):
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise BenchError("peer closed the connection")
        data += chunk
        if len(data) == n:
            return data
    raise BenchError("short read")


def measure_memcpy(plan: Plan, size: int = 64 << 20) -> list[float]:
    """Copy bandwidth: one memcpy of ``size`` bytes per memoryview slice assignment.

    64 MiB does not fit in any cache: that is main memory (the ceiling the targets use).
    measure_memcpy_cached copies buffers that stay in L2 (see l2_bytes).
    """
    src = bytearray(os.urandom(min(size, 1 << 20))) * max(1, size >> 20)
    dst = bytearray(len(src))
    src_view, dst_view = memoryview(src), memoryview(dst)
    dst_view[:] = src_view  # fault the pages in
    t0 = time.perf_counter()
    for _ in range(4):
        dst_view[:] = src_view
    per_copy = (time.perf_counter() - t0) / 4
    copies = max(2, min(1_000_000, int(plan.ceiling_seconds / per_copy)))
    out = []
    for _ in range(plan.repeats):
        t0 = time.perf_counter()
        for _ in range(copies):
            dst_view[:] = src_view
        out.append(copies * len(src) / (time.perf_counter() - t0) / 1e6)
    if dst != src:
        raise BenchError("memcpy check failed")
    return out


@functools.cache
def l2_bytes() -> int | None:
    """This CPU's per-core L2 from sysfs (None where the kernel does not say)."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        with contextlib.suppress(OSError, ValueError):
            if (index / "level").read_text().strip() != "2":
                continue
            size = (index / "size").read_text().strip()  # "512K", "1024K", "2M"
            unit = {"K": 1 << 10, "M": 1 << 20}.get(size[-1:], 1)
            return int(size.rstrip("KM")) * unit
    return None


def cached_buffer_bytes(l2: int | None) -> int:
    """The in-cache ceiling's buffer: source and destination are a quarter of the L2 each
    (256 KiB where the kernel does not say)."""
    return max(16 << 10, (l2 or 1 << 20) // 4)


def measure_memcpy_cached(plan: Plan) -> list[float]:
    return measure_memcpy(plan, cached_buffer_bytes(l2_bytes()))


def measure_memcpy_ring(plan: Plan) -> list[float]:
    """The copy a 4 KiB burst costs the shm producer: 128 KiB (32 x 4 KiB, in cache) into
    the next 128 KiB of a 4 MiB destination (the default ring's data area), round and round.
    The source stays in L2, the destination does not (a 4 MiB ring cycles through all of its
    memory): the best any ring of that size can do with one copy per byte. Information."""
    burst, area = 128 << 10, 4 << 20
    src = memoryview(bytearray(os.urandom(burst)))
    dst = memoryview(bytearray(area))
    offsets = range(0, area, burst)
    for off in offsets:
        dst[off : off + burst] = src
    t0 = time.perf_counter()
    for off in offsets:
        dst[off : off + burst] = src
    per_lap = time.perf_counter() - t0
    laps = max(2, min(100_000, int(plan.ceiling_seconds / max(per_lap, 1e-9))))
    out = []
    for _ in range(plan.repeats):
        t0 = time.perf_counter()
        for _ in range(laps):
            for off in offsets:
                dst[off : off + burst] = src
        out.append(laps * area / (time.perf_counter() - t0) / 1e6)
    return out


def measure_tcp_loopback(plan: Plan, block_bytes: int = 1 << 20) -> list[float]:
    """Two processes, sendall(block_bytes) / recv_into(1 MiB): 1 MiB is the ceiling the
    target uses; 128 KiB (one ring burst of 32 x 4 KiB per write) is for information."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        a, b = run_pair(
            (_tcp_sender, (port, plan, block_bytes)),
            (_tcp_receiver, (listener, plan, block_bytes)),
            [listener],
            plan,
        )
    finally:
        listener.close()
    for r in (a, b):
        if "error" in r:
            raise BenchError(r["error"])
    return a["mb_s"]


def measure_tcp_loopback_128k(plan: Plan) -> list[float]:
    return measure_tcp_loopback(plan, 128 << 10)


# --------------------------------------------------------------------------- process handling


def _die_with_parent(parent: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


def _child_main(
    fn: Callable[..., dict[str, Any]],
    args: tuple,
    result: mpc.Connection,
    parent: int,
    cpu: int | None,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent(parent)
    if cpu is not None:  # the whole process, helper threads (mp.Queue's feeder) included
        os.sched_setaffinity(0, {cpu})
    try:
        out = fn(*args)
    except BaseException as err:
        out = {"error": f"{type(err).__name__}: {err}"}
    result.send(out)
    result.close()


def run_pair(
    a: tuple[Callable[..., dict[str, Any]], tuple],
    b: tuple[Callable[..., dict[str, Any]], tuple],
    parent_closes: list,
    plan: Plan,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fork A and B, wait for both results under a watchdog, reap both by PID."""
    ctx = mp.get_context("fork")
    procs: list[mp.process.BaseProcess] = []
    readers: list[mpc.Connection] = []
    stuck: list[mp.process.BaseProcess] = []
    finished = False
    try:
        for i, (fn, args) in enumerate((a, b)):
            r, w = ctx.Pipe(duplex=False)
            cpu = plan.cpus[i] if plan.cpus else None
            p = ctx.Process(
                target=_child_main, args=(fn, args, w, os.getpid(), cpu), daemon=True
            )
            p.start()
            procs.append(p)
            w.close()
            readers.append(r)
        for obj in parent_closes:
            obj.close()
        deadline = time.monotonic() + plan.case_timeout
        results: list[dict[str, Any] | None] = [None, None]
        why = f"no result within {plan.case_timeout:.0f} s"
        pending = {0: readers[0], 1: readers[1]}
        for _ in range(3):  # each pass collects >= 1 result or reaches the deadline
            remaining = deadline - time.monotonic()
            if not pending or remaining <= 0:
                break
            for conn in mpc.wait(list(pending.values()), remaining):
                i = readers.index(conn)  # type: ignore[arg-type]
                del pending[i]
                try:
                    res = conn.recv()  # type: ignore[union-attr]
                except EOFError:
                    procs[i].join(1.0)
                    res = {"error": f"child died (exit code {procs[i].exitcode}), no result"}
                results[i] = res
                if "error" in res and time.monotonic() + PEER_GRACE < deadline:
                    # The survivor may wait for ever on a dead peer (mp.Queue does): give it
                    # time to report its own view, then stop waiting.
                    deadline = time.monotonic() + PEER_GRACE
                    why = f"still running {PEER_GRACE:.0f} s after its peer failed"
        for i in pending:
            results[i] = {"error": f"{why}; killed"}
            stuck.append(procs[i])
        finished = True
        return results[0] or {}, results[1] or {}
    finally:
        for p in procs if not finished else stuck:
            if p.is_alive():
                p.kill()  # SIGKILL to this PID only (interrupted, or it had its time)
        _reap(procs)
        for r in readers:
            r.close()


def _reap(procs: list[mp.process.BaseProcess]) -> None:
    """Give each child a few seconds to finish closing, then kill it by its PID."""
    deadline = time.monotonic() + RING_RECONNECT + 2.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()  # SIGKILL to this PID only
            p.join(2.0)


def run_case(transport: str, size: int, burst: int, plan: Plan) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="dpm-bench-rings-")
    try:
        if transport in _OPTIONAL:  # a clear error now rather than from both children
            importlib.import_module(_OPTIONAL[transport])
        if transport in RING_TRANSPORTS:
            from dpmigrate import transports

            transports.module(_BASE.get(transport, transport))  # import errors: once, here
        res_a, res_b, closes = _prepare(transport, burst, tmp)
        a, b = run_pair(
            (_case_child, ("A", transport, size, burst, res_a, plan)),
            (_case_child, ("B", transport, size, burst, res_b, plan)),
            closes,
            plan,
        )
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}"}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    errors = [f"{who}: {r['error']}" for who, r in (("driver", a), ("echo", b)) if "error" in r]
    if errors:
        return {"error": "; ".join(errors)}
    close = [f"{who}: {r['close_error']}" for who, r in (("driver", a), ("echo", b))
             if "close_error" in r]  # fmt: skip
    return {**a, "close_error": "; ".join(close)} if close else a


# --------------------------------------------------------------------------- reporting


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def machine_info(plan: Plan, quick: bool) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    ids: dict[str, Any] = {}
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name":
                cpu = value
            elif key in ("cpu family", "model", "stepping") and value.isdigit():
                ids[key.replace(" ", "_")] = int(value)
            elif key == "flags":
                ids["flags"] = sorted(set(value.split()) & {"avx2", "avx512f", "erms", "fsrm"})
            elif not line.strip():
                break  # the first CPU is enough
    mem_gib = None
    with contextlib.suppress(OSError, ValueError):
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    versions = {}
    for dist in ("pyzmq", "faster-fifo", "rich"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    return {
        "cpu": cpu,
        "cpu_ids": ids,
        "l2_bytes": l2_bytes(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "pinned_cpus": list(plan.cpus),  # the two processes of a case, one CPU each
        "memory_gib": mem_gib,
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": versions,
        "run": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "mode": "quick" if quick else "full",
            "repeats": plan.repeats,
            "latency": "ping-pong round trip / 2 (perf_counter in the driver)",
            "throughput": "N / (t1 - t0), t0 in sender and t1 in receiver, CLOCK_MONOTONIC",
            "mb": "10^6 payload bytes",
            "ring_capacity": CAPACITY,
        },
    }


def summarise(transport: str, size: int, burst: int, raw: dict[str, Any], repeats: int) -> dict:
    row: dict[str, Any] = {"transport": transport, "size": size, "burst": burst}
    if "error" in raw:
        for key in ("msgs_per_s", "mb_per_s", "lat_p50_us"):
            row[key] = None
        row["error"] = raw["error"]
        return row
    tp, lat = raw["tp"], raw["lat_medians"]
    mb = [x * size / 1e6 for x in tp]
    row.update(
        msgs_per_s=statistics.median(tp),
        mb_per_s=statistics.median(mb),
        lat_p50_us=statistics.median(lat),
        msgs_per_s_min=min(tp),
        msgs_per_s_max=max(tp),
        mb_per_s_min=min(mb),
        mb_per_s_max=max(mb),
        lat_p50_us_min=min(lat),
        lat_p50_us_max=max(lat),
        lat_p99_us=raw["lat_p99"],
        repeats=repeats,
        error=None,
    )
    if raw.get("close_error"):
        row["close_error"] = raw["close_error"]
    return row


def targets(results: list[dict], ceilings: dict[str, Any]) -> list[dict[str, Any]]:
    def get(transport: str, size: int, key: str) -> float | None:
        for r in results:
            if (r["transport"], r["size"], r["burst"]) == (transport, size, 32):
                return r.get(key)
        return None

    def ratio(x: float | None, y: float | None) -> float | None:
        return x / y if x and y else None

    def lat(transport: str) -> float | None:
        for r in results:
            if (r["transport"], r["size"], r["burst"]) == (transport, 64, 1):
                return r.get("lat_p50_us")
        return None

    cached = ceilings.get("memcpy_cached_mb_s")
    loopback = ceilings.get("tcp_loopback_mb_s")
    specs = [  # (name, measured, required, ">=" or "<=", an issue target or for comparison)
        ("shm/views 64 B bursts of 32: msgs/s vs mp.Queue (same bursts)",
         ratio(get("shm/views", 64, "msgs_per_s"), get("mp.Queue", 64, "msgs_per_s")), 10.0,
         ">=", True),
        ("shm/views 64 B bursts of 32: msgs/s vs faster-fifo (put_many/get_many)",
         ratio(get("shm/views", 64, "msgs_per_s"), get("faster-fifo", 64, "msgs_per_s")), 1.0,
         ">", True),
        ("shm/views 4 KiB bursts of 32: MB/s vs in-cache memcpy",
         ratio(get("shm/views", 4096, "mb_per_s"), cached), 0.6, ">=", True),
        ("shm-l2/views (512 KiB ring) 4 KiB bursts of 32: MB/s vs in-cache memcpy",
         ratio(get("shm-l2/views", 4096, "mb_per_s"), cached), 0.6, ">=", False),
        ("tcp/views 4 KiB bursts of 32: MB/s vs raw loopback TCP",
         ratio(get("tcp/views", 4096, "mb_per_s"), loopback), 0.6, ">=", True),
        ("shm 64 B one-way latency p50 (µs)", lat("shm"), 2.0, "<=", True),
        ("tcp/views 4 KiB bursts of 32: MB/s vs raw loopback TCP, 128 KiB writes",
         ratio(get("tcp/views", 4096, "mb_per_s"), ceilings.get("tcp_loopback_128k_mb_s")),
         0.6, ">=", False),
        ("shm 64 B bursts of 32, owned bytes: msgs/s vs mp.Queue",
         ratio(get("shm", 64, "msgs_per_s"), get("mp.Queue", 64, "msgs_per_s")), 10.0, ">=",
         False),
        ("shm 4 KiB bursts of 32, owned bytes: MB/s vs in-cache memcpy",
         ratio(get("shm", 4096, "mb_per_s"), cached), 0.6, ">=", False),
        ("shm/views 4 KiB bursts of 32: MB/s vs memcpy into a 4 MiB ring",
         ratio(get("shm/views", 4096, "mb_per_s"), ceilings.get("memcpy_ring_mb_s")), 0.6,
         ">=", False),
        ("shm/views 4 KiB bursts of 32: MB/s vs memcpy from main memory",
         ratio(get("shm/views", 4096, "mb_per_s"), ceilings.get("memcpy_mb_s")), 0.6, ">=",
         False),
        ("tcp 4 KiB bursts of 32, owned bytes: MB/s vs raw loopback TCP",
         ratio(get("tcp", 4096, "mb_per_s"), loopback), 0.6, ">=", False),
        ("tcp+tls/views 4 KiB bursts of 32: MB/s vs raw loopback TCP",
         ratio(get("tcp+tls/views", 4096, "mb_per_s"), loopback), 0.6, ">=", False),
    ]  # fmt: skip

    def met(r: float | None, req: float, op: str) -> bool:
        if r is None:
            return False
        return r >= req if op == ">=" else r > req if op == ">" else r <= req

    return [
        {"name": n, "ratio": r, "required": req, "op": op, "target": target,
         "met": met(r, req, op)}
        for n, r, req, op, target in specs
    ]  # fmt: skip


def _si(x: float | None) -> str:
    if x is None:
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f}{suffix}"
    return f"{x:.0f}"


def _num(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def render(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=150)
    m = report["machine"]
    console.print(
        f"[bold]dpmigrate rings benchmark[/] ({m['run']['mode']}, median of "
        f"{m['run']['repeats']} repeats, spread = min{DASH}max)\n"
        f"machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), "
        f"{m['memory_gib']} GiB, Linux {m['kernel']}, {m['python']}"
    )
    table = Table(title="throughput (N msgs, t0 sender → t1 receiver) and latency (ping-pong/2)")
    for col, just in (
        ("transport", "left"), ("size", "right"), ("burst", "right"), ("msgs/s", "right"),
        ("msgs/s range", "right"), ("MB/s", "right"), ("MB/s range", "right"),
        ("lat p50 µs", "right"), ("p50 range", "right"), ("p99 µs", "right"),
    ):  # fmt: skip
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    last = None
    for r in report["results"]:
        key = (r["size"], r["burst"])
        if last is not None and key != last:
            table.add_section()
        last = key
        size = f"{r['size']} B" if r["size"] < 1024 else f"{r['size'] // 1024} KiB"
        if r.get("error"):
            table.add_row(r["transport"], size, str(r["burst"]), "[red]failed[/]")
            continue
        table.add_row(
            r["transport"], size, str(r["burst"]), _si(r["msgs_per_s"]),
            f"{_si(r['msgs_per_s_min'])}{DASH}{_si(r['msgs_per_s_max'])}", _num(r["mb_per_s"]),
            f"{_num(r['mb_per_s_min'])}{DASH}{_num(r['mb_per_s_max'])}", _num(r["lat_p50_us"]),
            f"{_num(r['lat_p50_us_min'])}{DASH}{_num(r['lat_p50_us_max'])}", _num(r["lat_p99_us"]),
        )  # fmt: skip
    console.print(table)
    for r in report["results"]:
        case = f"{r['transport']} {r['size']} B x{r['burst']}"
        if r.get("error"):
            console.print(f"[red]failed[/] {case}: {r['error']}", highlight=False)
        elif r.get("close_error"):
            console.print(f"[yellow]close failed[/] {case}: {r['close_error']}", highlight=False)
    c = report["ceilings"]
    ceil = Table(title="ceilings")
    for col in ("ceiling", "MB/s", "range", "how"):
        ceil.add_column(col)
    ceil.add_row(
        "memcpy", _num(c["memcpy_mb_s"]),
        f"{_num(c.get('memcpy_mb_s_min'))}{DASH}{_num(c.get('memcpy_mb_s_max'))}",
        "memoryview slice copy of a 64 MiB bytearray, one process",
    )  # fmt: skip
    ceil.add_row(
        "memcpy, in cache", _num(c.get("memcpy_cached_mb_s")),
        f"{_num(c.get('memcpy_cached_mb_s_min'))}{DASH}{_num(c.get('memcpy_cached_mb_s_max'))}",
        f"same, two buffers of {cached_buffer_bytes(report['machine'].get('l2_bytes')) >> 10}"
        " KiB (they stay in L2); target (2)",
    )  # fmt: skip
    ceil.add_row(
        "memcpy into a 4 MiB ring", _num(c.get("memcpy_ring_mb_s")),
        f"{_num(c.get('memcpy_ring_mb_s_min'))}{DASH}{_num(c.get('memcpy_ring_mb_s_max'))}",
        "128 KiB bursts from cache into a cycling 4 MiB area (the shm producer's copy)",
    )  # fmt: skip
    ceil.add_row(
        "tcp loopback", _num(c["tcp_loopback_mb_s"]),
        f"{_num(c.get('tcp_loopback_mb_s_min'))}{DASH}{_num(c.get('tcp_loopback_mb_s_max'))}",
        "2 processes, sendall(1 MiB) / recv_into(1 MiB), 127.0.0.1",
    )  # fmt: skip
    ceil.add_row(
        "tcp loopback, 128 KiB writes", _num(c.get("tcp_loopback_128k_mb_s")),
        f"{_num(c.get('tcp_loopback_128k_mb_s_min'))}{DASH}"
        f"{_num(c.get('tcp_loopback_128k_mb_s_max'))}",
        "same, one write per 32 x 4 KiB burst (what the tcp ring writes); information",
    )  # fmt: skip
    if c.get("error"):
        ceil.add_row("[red]error[/]", "", "", c["error"])
    console.print(ceil)
    tgt = Table(title="targets (issue 16) and, below them, the same ratios for comparison")
    for col in ("target", "measured", "required", "met"):
        tgt.add_column(col)
    for t in report["targets"]:
        ratio = "-" if t["ratio"] is None else f"{t['ratio']:.2f}"
        met = "[green]yes[/]" if t["met"] else "[red]no[/]"
        if not t.get("target", True):
            met = f"({'yes' if t['met'] else 'no'})"
        tgt.add_row(t["name"], ratio, f"{t.get('op', '>=')} {t['required']:g}", met)
    console.print(tgt)


# --------------------------------------------------------------------------- main


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through every finally: children reaped, dirs removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about a minute instead of ~3")
    parser.add_argument("--repeats", type=int, help="override the number of repeats")
    parser.add_argument(
        "--transports", default=",".join(TRANSPORTS), help="comma-separated subset to run"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON file ({RESULTS})")
    parser.add_argument("--no-ceilings", action="store_true", help="skip the ceilings")
    parser.add_argument(
        "--no-pin", action="store_true",
        help="let the scheduler place both processes of a case (default: one CPU each)",
    )  # fmt: skip
    parser.add_argument(
        "--hugepages", type=int, default=0, metavar="N",
        help="reserve N 2 MB hugepages while the benchmark runs (root; given back at the end); "
        "shm-2m needs 6 (two rings of 3 pages)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.hugepages:
        from dpmigrate.cluster import hugepages

        entry = hugepages.reserve(hugepages.check_count(args.hugepages, "--hugepages"),
                                  lambda e: None)  # fmt: skip
        print(f"hugepages: {entry['added']} of {args.hugepages} reserved", file=sys.stderr)
        try:
            return _main(parser, args)
        finally:
            for line in hugepages.release(entry):
                print(line, file=sys.stderr)
    return _main(parser, args)


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    plan = QUICK if args.quick else FULL
    if args.repeats:
        plan = dataclasses.replace(plan, repeats=max(1, min(50, args.repeats)))
    usable = sorted(os.sched_getaffinity(0))
    if not args.no_pin and len(usable) >= 2:
        plan = dataclasses.replace(plan, cpus=(usable[0], usable[1]))
    chosen = [t.strip() for t in args.transports.split(",") if t.strip()]
    unknown = [t for t in chosen if t not in TRANSPORTS]
    if unknown:
        parser.error(f"unknown transport(s) {unknown}; choose from {', '.join(TRANSPORTS)}")
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    started = time.monotonic()
    try:
        results = []
        for size in SIZES:
            for burst in BURSTS:
                for transport in (t for t in TRANSPORTS if t in chosen):
                    if burst == 1 and transport.endswith("/views"):
                        continue  # one message per call: recv(), the same as the bytes row
                    t0 = time.monotonic()
                    raw = run_case(transport, size, burst, plan)
                    row = summarise(transport, size, burst, raw, plan.repeats)
                    results.append(row)
                    print(
                        f"  {transport:<10} {size:>5} B x{burst:<2} "
                        + (f"FAILED {row['error']}" if row.get("error") else
                           f"{_si(row['msgs_per_s']):>8} msgs/s {row['mb_per_s']:9.1f} MB/s "
                           f"{row['lat_p50_us']:8.1f} µs")
                        + f"  ({time.monotonic() - t0:.1f} s)",
                        file=sys.stderr, flush=True,
                    )  # fmt: skip
        ceilings: dict[str, Any] = {"memcpy_mb_s": None, "tcp_loopback_mb_s": None}
        if not args.no_ceilings:
            errors = []
            for key, fn in (
                ("memcpy_mb_s", measure_memcpy),
                ("memcpy_cached_mb_s", measure_memcpy_cached),
                ("memcpy_ring_mb_s", measure_memcpy_ring),
                ("tcp_loopback_mb_s", measure_tcp_loopback),
                ("tcp_loopback_128k_mb_s", measure_tcp_loopback_128k),
            ):
                try:
                    xs = fn(plan)
                except Exception as err:
                    errors.append(f"{key}: {type(err).__name__}: {err}")
                    continue
                ceilings[key] = statistics.median(xs)
                ceilings[f"{key}_min"], ceilings[f"{key}_max"] = min(xs), max(xs)
                print(f"  ceiling {key}: {ceilings[key]:.0f}", file=sys.stderr, flush=True)
            if errors:
                ceilings["error"] = "; ".join(errors)
        report = {
            "machine": machine_info(plan, args.quick),
            "results": results,
            "ceilings": ceilings,
            "targets": targets(results, ceilings),
        }
        report["machine"]["run"]["seconds"] = round(time.monotonic() - started, 1)
    except KeyboardInterrupt:
        print("interrupted: children killed, temp dirs removed", file=sys.stderr)
        return 130
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp_out, args.out)
    render(report)
    print(f"wrote {args.out} in {report['machine']['run']['seconds']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
