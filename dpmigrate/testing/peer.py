"""A ring end in its own process, for conformance checks that need a real second process
(peer death, exactly-once across processes) and for benchmarks.

    python -m dpmigrate.testing.peer producer --transport shm --ring R --registry DIR \
        --count 1000 --seed 7 --then close
    python -m dpmigrate.testing.peer consumer --transport tcp --ring R --registry DIR \
        --count 1000 --seed 7 --then exit

The producer sends ``count`` deterministic messages (see :func:`message`); the consumer
receives and verifies them. ``--then`` says what to do afterwards: ``close`` the end cleanly,
``exit`` without closing (``os._exit``: the peer sees a death), or ``hang`` until killed.
The last line on stdout is a JSON summary. Exit status 0 means every check passed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import sys
import time

from dpmigrate import transports
from dpmigrate.cluster.pki import ring_tls_context
from dpmigrate.errors import DpmigrateError
from dpmigrate.transports.resolver import DirectoryResolver

#: Bound on how long a peer process may run: it must never outlive a test.
MAX_RUNTIME_S = 120.0


def message(seed: int, seq: int, max_size: int = 2048) -> bytes:
    """The deterministic payload number ``seq`` of a run: 8-byte seq + seeded filler.

    Sizes vary from 0 to ``max_size`` bytes; seq 0 of every run is zero-length.
    """
    if seq == 0:
        return b""
    size = random.Random(seed * 1_000_003 + seq).randrange(8, max_size + 1)
    head = seq.to_bytes(8, "little")
    filler = hashlib.blake2b(head, digest_size=32, key=seed.to_bytes(8, "little")).digest()
    body = (filler * (size // 32 + 1))[: size - 8]
    return head + body


def _then(action: str, end: transports.RingSender | transports.RingReceiver) -> None:
    if action == "close":
        end.close()
    elif action == "exit":
        sys.stdout.flush()
        os._exit(0)
    elif action == "hang":  # stay alive and serving (a producer has no thread of its own)
        sys.stdout.flush()
        signal.alarm(int(MAX_RUNTIME_S))  # never outlive the test that forgot to kill us
        while True:
            if isinstance(end, transports.RingSender):
                end.service(0.1)
            else:
                time.sleep(0.1)


def _tls(args: argparse.Namespace, server_side: bool) -> dict[str, object]:
    if args.tls_dir is None:
        return {}
    return {"tls": ring_tls_context(args.tls_dir, server_side=server_side)}


def _producer(args: argparse.Namespace) -> dict[str, object]:
    rng = random.Random(args.seed)
    tx = transports.open_sender(
        args.transport, args.ring, resolver=DirectoryResolver(args.registry),
        capacity=args.capacity, reconnect_timeout=args.reconnect_timeout,
        **_tls(args, server_side=True),
    )  # fmt: skip
    deadline = time.monotonic() + MAX_RUNTIME_S
    seq = 0
    while seq < args.count and time.monotonic() < deadline:
        burst = [
            message(args.seed, s, args.max_size)
            for s in range(seq, min(args.count, seq + rng.randint(1, 32)))
        ]
        sent = tx.send_burst(burst, timeout=1.0)
        seq += sent
        if args.break_prob and rng.random() < args.break_prob:
            tx._break_connection()  # type: ignore[attr-defined]
    print(json.dumps({"sent": seq}), flush=True)
    _then(args.then, tx)
    return {"sent": seq, "stats": tx.statistics().as_dict()}


def _consumer(args: argparse.Namespace) -> dict[str, object]:
    rng = random.Random(args.seed + 1)
    rx = transports.open_receiver(
        args.transport, args.ring, resolver=DirectoryResolver(args.registry),
        reconnect_timeout=args.reconnect_timeout, connect_timeout=30.0,
        **_tls(args, server_side=False),
    )  # fmt: skip
    deadline = time.monotonic() + MAX_RUNTIME_S
    received = bad = 0
    while received < args.count and time.monotonic() < deadline:
        for msg in rx.recv_burst(rng.randint(1, 64), timeout=1.0):
            if msg != message(args.seed, received, args.max_size):
                bad += 1
            received += 1
        if args.break_prob and rng.random() < args.break_prob:
            rx._break_connection()  # type: ignore[attr-defined]
    rx.commit()
    print(json.dumps({"received": received, "bad": bad}), flush=True)
    _then(args.then, rx)
    return {"received": received, "bad": bad, "stats": rx.statistics().as_dict()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpmigrate.testing.peer")
    parser.add_argument("role", choices=["producer", "consumer"])
    parser.add_argument("--transport", required=True, choices=transports.TRANSPORTS)
    parser.add_argument("--ring", required=True)
    parser.add_argument("--registry", required=True, help="DirectoryResolver folder")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-size", type=int, default=2048)
    parser.add_argument("--capacity", type=int, default=256)
    parser.add_argument("--reconnect-timeout", type=float, default=5.0)
    parser.add_argument("--break-prob", type=float, default=0.0)
    parser.add_argument("--then", choices=["close", "exit", "hang"], default="close")
    parser.add_argument("--tls-dir", help="tcp over TLS with the ring files here (pki.make)")
    args = parser.parse_args(argv)
    signal.alarm(int(MAX_RUNTIME_S) + 10)
    try:
        result = _producer(args) if args.role == "producer" else _consumer(args)
    except DpmigrateError as err:
        print(json.dumps({"error": type(err).__name__, "message": str(err)}), flush=True)
        return 1
    print(json.dumps(result), flush=True)
    ok = result.get("bad", 0) == 0 and result.get("received", args.count) == args.count
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
