"""The ballast: N MiB of deterministic, non-zero process memory.

Shared by the benchmark app's flow table (``stages.py``) and the raw-CRIU baseline worker of
``benchmarks/migration.py``, so that both hold the same bytes. Standard library only: the
baseline worker must stay a plain Python process.

Why not zeros: a page never written is not backed by memory and CRIU skips it; every page
here is written once, so it is resident and CRIU has to move it. Why a repeated block: making
a GiB of random bytes in Python takes seconds; one 1 MiB block of BLAKE2b output, copied into
each MiB with that MiB's index stamped in its first 8 bytes, takes a fraction of that (the
slice copies are memcpy) and no two MiB are equal.
"""

from __future__ import annotations

import hashlib

MIB = 1 << 20


def block(seed: int) -> bytes:
    """1 MiB of BLAKE2b output in counter mode, keyed by ``seed``."""
    key = seed.to_bytes(8, "little")
    return b"".join(
        hashlib.blake2b(i.to_bytes(8, "little"), key=key, digest_size=64).digest()
        for i in range(MIB // 64)
    )


def fill(mib: int, seed: int) -> bytearray:
    """``mib`` MiB, every page written (so resident)."""
    if mib <= 0:  # nothing to compute: a stage woken by a promotion runs setup in its downtime
        return bytearray()
    pattern = block(seed)
    data = bytearray(mib * MIB)
    for i in range(mib):
        start = i * MIB
        data[start : start + MIB] = pattern
        data[start : start + 8] = i.to_bytes(8, "little")
    return data
