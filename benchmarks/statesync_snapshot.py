#!/usr/bin/env python3
"""Snapshot throughput of the statesync protocol against raw loopback TCP, in one run.

    .venv/bin/python benchmarks/statesync_snapshot.py                   # 20 MiB, 200 MiB, 1 GiB
    .venv/bin/python benchmarks/statesync_snapshot.py --sizes 20,200 --repeat 5
    .venv/bin/python benchmarks/statesync_snapshot.py --json

``measure(size_bytes, repeat)`` is what the migration benchmark imports; ``__main__`` prints
the machine, one line per size (medians and min-max of the repeats) and the target.

Cases, each repeat measured in the order (b), (a), (c), with fresh processes:

(a) ``tcp_loopback_mb_s``: two processes on 127.0.0.1; one ``sendall()``s 1 MiB buffers, the
    other ``recv_into()``s a 1 MiB buffer, the same byte count as (b) moved on the wire;
    timed by the receiver from its first byte to its last. The sending process holds the
    same State as in (b), built before the clock starts, so memory is as in (b).
(c) ``tcp_keep_floor_mb_s``: as (a), but the receiver also keeps every 64 KiB it receives as
    a new bytes object, as any replica must to hold the state: the ceiling of a Python
    replica that builds the state in memory, whatever its protocol (allocating the new
    memory and faulting its pages in costs more than the receive itself; a fresh process has
    no freed memory to reuse).
(b) ``snapshot_mb_per_s``: a StateSender in one process holding a State of ``size_bytes``
    (64 KiB bytes values, each a distinct object), a StateReceiver in another, from the
    replica's HELLO to its ``synced`` (the receiver's ``snapshot_seconds``: the handshake, the
    primary's snapshot copy and every chunk), over the snapshot's payload bytes. The
    primary's stage thread calls ``poll()`` every millisecond, as an idle stage does.

MB/s are 10^6 bytes per second. ``ratio`` = snapshot / loopback (medians); the target is
``ratio >= 0.6``. ``ratio_to_keep_floor`` = snapshot / (c): how much of what a replica can
reach at all the protocol reaches (its own costs: crc32 of every byte on both sides, msgpack
decoding, acks). Nothing is asserted: a missed target is reported as such.

Processes: the parent only starts children (``sys.executable`` running this file with
``--child ROLE``), reads one JSON line from each and waits; a child exits when its stdin
closes (the parent is gone), its sockets have timeouts, and the parent kills any child still
running at the end of a case by its PID. On a 2-core machine the two children get a core
each.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import select
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

MiB = 1 << 20
VALUE_SIZE = 64 << 10
CHILD_TIMEOUT = 120.0  # seconds any one child may take
TARGET_RATIO = 0.6
STAGE = "bench/snapshot"
TOKEN = "statesync-benchmark"


# --------------------------------------------------------------------------- children


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _child_raw_receiver(nbytes: int, keep: bool = False) -> None:
    """Receive ``nbytes``; with ``keep``, also keep each 64 KiB received as a new bytes object
    (what any replica must do to hold the state: allocate it, fault its pages in, copy)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(CHILD_TIMEOUT)
    _emit({"port": listener.getsockname()[1]})
    conn, _ = listener.accept()
    conn.settimeout(CHILD_TIMEOUT)
    buf = memoryview(bytearray(MiB))
    kept: list[bytes] = []
    got = 0
    t0 = 0.0
    while got < nbytes:
        n = conn.recv_into(buf)
        if not n:
            break
        if not got:
            t0 = time.perf_counter()
        got += n
        if keep:
            kept.extend(
                bytes(buf[o : o + VALUE_SIZE]) for o in range(0, n - VALUE_SIZE + 1, VALUE_SIZE)
            )
    seconds = time.perf_counter() - t0
    _emit({"bytes": got, "seconds": seconds})


def _child_raw_sender(port: int, nbytes: int, hold: int) -> None:
    """Send ``nbytes`` from one 1 MiB buffer, while holding a State of ``hold`` bytes built
    beforehand (untimed), so the machine's memory is as in the snapshot case."""
    state = _make_state(hold) if hold else None
    sock = socket.create_connection(("127.0.0.1", port), timeout=CHILD_TIMEOUT)
    buf = memoryview(os.urandom(MiB))
    left = nbytes
    while left > 0:
        chunk = buf[: min(MiB, left)]
        sock.sendall(chunk)
        left -= len(chunk)
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)  # the receiver closes once it has everything
    sock.close()
    _emit({"sent": nbytes, "held": 0 if state is None else len(state)})


def _make_state(size_bytes: int) -> Any:
    from dpmigrate.statesync.state import State

    state = State()
    base = os.urandom(VALUE_SIZE)
    for i in range(max(1, size_bytes // VALUE_SIZE)):
        state[f"flow/{i:08d}"] = i.to_bytes(8, "big") + base[8:]
    state.commit()
    return state


def _child_snapshot_sender(size_bytes: int) -> None:
    from dpmigrate.statesync.point import Point
    from dpmigrate.statesync.sender import StateSender

    state = _make_state(size_bytes)
    start = Point(state.version, None, {"in": 0}, {"out": 0})
    sender = StateSender(STAGE, TOKEN, state, start)
    _emit({"port": sender.address[1], "items": len(state)})
    try:
        deadline = time.monotonic() + CHILD_TIMEOUT
        while time.monotonic() < deadline:
            ready, _, _ = select.select([sys.stdin], [], [], 0.001)  # the stage's idle loop
            if ready:
                break  # "stop" or EOF: either way we are done
            sender.poll(state)
        replicas = sender.replicas()
    finally:
        sender.close()
    _emit({"replicas": replicas})


def _child_snapshot_receiver(port: int) -> None:
    from dpmigrate.statesync.receiver import StateReceiver

    replica = StateReceiver(STAGE, TOKEN, "bench-replica", lambda: ("127.0.0.1", port))
    deadline = time.monotonic() + CHILD_TIMEOUT
    try:
        while not replica.synced and time.monotonic() < deadline:
            replica.step(1.0)
        stats = replica.stats()
        stats["items"] = len(replica.state)
    finally:
        replica.close()
    _emit(stats)


# --------------------------------------------------------------------------- parent


class _Children:
    """The children of one case; whatever happens, none outlives it."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, *args: object) -> subprocess.Popen[str]:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", *map(str, args)]
        env = {
            **os.environ,
            "PYTHONPATH": _repo_root() + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.procs.append(proc)
        return proc

    @staticmethod
    def read(proc: subprocess.Popen[str]) -> dict[str, Any]:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], CHILD_TIMEOUT)
        line = proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(
                f"benchmark child {proc.args[3:]} gave no answer (exit {proc.poll()})"
            )
        return json.loads(line)

    def __enter__(self) -> _Children:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for proc in self.procs:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):  # the child is gone already
                    proc.stdin.close()
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _raw_once(nbytes: int, hold: int, keep: bool = False) -> float:
    with _Children() as kids:
        receiver = kids.start("raw-receiver", nbytes, int(keep))
        port = kids.read(receiver)["port"]
        kids.start("raw-sender", port, nbytes, hold)
        result = kids.read(receiver)
    if result["bytes"] != nbytes:
        raise RuntimeError(f"raw loopback moved {result['bytes']} of {nbytes} bytes")
    return nbytes / result["seconds"] / 1e6


def _snapshot_once(size_bytes: int) -> dict[str, Any]:
    with _Children() as kids:
        sender = kids.start("snapshot-sender", size_bytes)
        hello = kids.read(sender)
        receiver = kids.start("snapshot-receiver", hello["port"])
        stats = kids.read(receiver)
        assert sender.stdin is not None
        sender.stdin.write("stop\n")
        sender.stdin.flush()
        primary = kids.read(sender)["replicas"]
    if not stats["synced"] or stats["items"] != hello["items"]:
        raise RuntimeError(f"the replica did not receive the whole state: {stats}")
    return {
        "mb_s": stats["snapshot_bytes"] / stats["snapshot_seconds"] / 1e6,
        "seconds": stats["snapshot_seconds"],
        "payload_bytes": stats["snapshot_bytes"],
        "wire_bytes": stats["bytes_received"],
        "chunks": stats["chunks"],
        "inflight_high_water": primary[0]["inflight_high_water"],
    }


def measure(size_bytes: int, repeat: int = 3) -> dict[str, Any]:
    """Raw loopback TCP and statesync snapshot throughput for a State of ``size_bytes``,
    medians of ``repeat`` runs each (interleaved: raw, snapshot, raw, snapshot, ...)."""
    raw: list[float] = []
    floor: list[float] = []
    snaps: list[dict[str, Any]] = []
    for _ in range(repeat):
        snap = _snapshot_once(size_bytes)
        snaps.append(snap)
        raw.append(_raw_once(snap["wire_bytes"], size_bytes))
        floor.append(_raw_once(snap["wire_bytes"], size_bytes, keep=True))
    rates = [s["mb_s"] for s in snaps]
    tcp = statistics.median(raw)
    kept = statistics.median(floor)
    snapshot = statistics.median(rates)
    return {
        "size_bytes": size_bytes,
        "repeat": repeat,
        "tcp_loopback_mb_s": round(tcp, 1),
        "snapshot_mb_per_s": round(snapshot, 1),
        "ratio": round(snapshot / tcp, 3),
        "tcp_keep_floor_mb_s": round(kept, 1),
        "ratio_to_keep_floor": round(snapshot / kept, 3),
        "tcp_loopback_range": [round(min(raw), 1), round(max(raw), 1)],
        "tcp_keep_floor_range": [round(min(floor), 1), round(max(floor), 1)],
        "snapshot_range": [round(min(rates), 1), round(max(rates), 1)],
        "snapshot_seconds_median": round(statistics.median(s["seconds"] for s in snaps), 4),
        "payload_bytes": snaps[0]["payload_bytes"],
        "wire_bytes": snaps[0]["wire_bytes"],
        "chunks": snaps[0]["chunks"],
        "inflight_high_water": max(s["inflight_high_water"] for s in snaps),
    }


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", default="20,200,1024", help="state sizes in MiB (default 20,200,1024)"
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        role, *rest = args.child
        children = {
            "raw-receiver": lambda: _child_raw_receiver(int(rest[0]), rest[1] == "1"),
            "raw-sender": lambda: _child_raw_sender(int(rest[0]), int(rest[1]), int(rest[2])),
            "snapshot-sender": lambda: _child_snapshot_sender(int(rest[0])),
            "snapshot-receiver": lambda: _child_snapshot_receiver(int(rest[0])),
        }
        children[role]()
        return 0
    sizes = [int(s) * MiB for s in args.sizes.split(",")]
    info = machine()
    results = []
    if not args.json:
        print(
            f"machine: {info['cpu']}, {info['cores']} cores, kernel {info['kernel']}, {info['python']}"
        )
        print(
            f"medians of {args.repeat} runs, MB/s (min-max); target: snapshot >= {TARGET_RATIO} x tcp"
        )
        print(
            f"{'state':>9} {'tcp':>17} {'tcp+keep floor':>17} {'snapshot':>17} {'ratio':>6} {'/floor':>6}"
        )
    for size in sizes:
        r = measure(size, args.repeat)
        results.append(r)
        if not args.json:
            cells = []
            for key, span in [
                ("tcp_loopback_mb_s", "tcp_loopback_range"),
                ("tcp_keep_floor_mb_s", "tcp_keep_floor_range"),
                ("snapshot_mb_per_s", "snapshot_range"),
            ]:
                lo, hi = r[span]
                cells.append(f"{r[key]:.0f} ({lo:.0f}-{hi:.0f})")
            met = "met" if r["ratio"] >= TARGET_RATIO else "NOT met"
            print(
                f"{size // MiB:>6} MiB {cells[0]:>17} {cells[1]:>17} {cells[2]:>17} "
                f"{r['ratio']:>6.2f} {r['ratio_to_keep_floor']:>6.2f}  {met}",
                flush=True,
            )
    if args.json:
        print(json.dumps({"machine": info, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
