"""The strangers of the ``strangers`` drill, as a program run inside one of the cluster's own
network namespaces (``python -m dpmigrate.drill.stranger --seconds S --flood N HOST:PORT ...``).

Per target: random garbage, a plausible-looking frame header with a huge length, an HTTP
request, a few idle connections held open, then a connect-and-close flood of at most N
connections. Everything is bounded in count and time, and goes only to the addresses given
(the cluster's own agents and rings). Prints one JSON object: per target, how many
connections were made, refused, answered, and the first bytes of any answer.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import time
from typing import Any

_CONNECT_TIMEOUT_S = 0.5
_READ_TIMEOUT_S = 0.3
_IDLE = 4  # idle connections held open per target while the rest runs


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _probe(target: tuple[str, int], payload: bytes) -> dict[str, Any]:
    """Connect, send ``payload``, read what comes back (bounded)."""
    try:
        with socket.create_connection(target, timeout=_CONNECT_TIMEOUT_S) as s:
            s.sendall(payload)
            s.settimeout(_READ_TIMEOUT_S)
            try:
                answer = s.recv(200)
                return {"connected": True, "answer": answer[:80].hex(), "closed": answer == b""}
            except TimeoutError:
                return {"connected": True, "answer": "", "closed": False}
    except ConnectionResetError:
        return {"connected": True, "answer": "", "closed": True, "reset": True}
    except OSError as err:
        return {"connected": False, "error": err.strerror or str(err)}


def attack(target_text: str, deadline: float, flood: int) -> dict[str, Any]:
    target = _addr(target_text)
    payloads = {
        "garbage": os.urandom(4096),
        "huge_frame": struct.pack("!I", 0x7FFFFFF0) + b"\x01" * 64,
        "http": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        "json": b'{"op": "stop_app", "app": "flows"}\n',
    }
    result: dict[str, Any] = {"probes": {}}
    idle = []
    for _ in range(_IDLE):
        try:
            idle.append(socket.create_connection(target, timeout=_CONNECT_TIMEOUT_S))
        except OSError:
            break
    result["idle_held"] = len(idle)
    for name, payload in payloads.items():
        if time.monotonic() < deadline:
            result["probes"][name] = _probe(target, payload)
    made = refused = 0
    for _ in range(flood):
        if time.monotonic() >= deadline:
            break
        try:
            with socket.create_connection(target, timeout=_CONNECT_TIMEOUT_S) as s:
                s.sendall(b"\x00" * 16)
            made += 1
        except OSError:
            refused += 1
    for s in idle:
        s.close()
    result["flood_connections"], result["flood_refused"] = made, refused
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--flood", type=int, default=200)
    parser.add_argument("targets", nargs="+")
    args = parser.parse_args()
    share = max(0.2, min(args.seconds, 30.0) / len(args.targets))
    report = {}
    for target in args.targets:
        report[target] = attack(target, time.monotonic() + share, max(0, min(args.flood, 5000)))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
