"""Explicit state: deltas per batch, versions, idempotent apply, snapshots, digests."""

from __future__ import annotations

import pytest

from dpmigrate.errors import ConfigError
from dpmigrate.statesync.state import Delta, State


def test_commit_records_only_the_batch_changes() -> None:
    state = State()
    assert state.commit() is None and state.version == 0
    state["a"] = 1
    state["b"] = [1, 2]
    d1 = state.commit()
    assert d1 == Delta(1, {"a": 1, "b": [1, 2]}, ())
    state["a"] = 2
    del state["b"]
    d2 = state.commit()
    assert d2 == Delta(2, {"a": 2}, ("b",))
    assert dict(state) == {"a": 2} and state.version == 2


def test_replica_follows_by_deltas_idempotently() -> None:
    primary, replica = State(), State()
    deltas = []
    for i in range(5):
        primary[f"k{i % 3}"] = i
        if i == 3:
            del primary["k0"]
        deltas.append(Delta.decode(primary.commit().encode()))
    for delta in deltas:
        assert replica.apply(delta)
    assert not replica.apply(deltas[2]), "an old delta must be ignored"
    assert dict(replica) == dict(primary) and replica.digest() == primary.digest()
    gap = State()
    with pytest.raises(ConfigError, match="does not follow"):
        gap.apply(deltas[3])


def test_snapshot_roundtrip_and_digest_ignores_insertion_order() -> None:
    a, b = State(), State()
    a["x"], a["y"] = 1, {"n": b"\x00"}
    b["y"], b["x"] = {"n": b"\x00"}, 1
    a.commit(), b.commit()
    assert a.digest() == b.digest()
    restored = State.restore(a.snapshot())
    assert dict(restored) == dict(a) and restored.version == a.version
    b["x"] = 2
    b.commit()
    assert a.digest() != b.digest()


def test_rollback_undoes_the_failed_batch() -> None:
    state = State({"keep": 1, "gone": 2})
    state["keep"] = 10
    state["new"] = 3
    del state["gone"]
    state.rollback()
    assert dict(state) == {"keep": 1, "gone": 2} and state.commit() is None


def test_unserialisable_value_names_the_key() -> None:
    state = State()
    state["sock"] = object()
    with pytest.raises(ConfigError, match="'sock'"):
        state.commit()
    with pytest.raises(ConfigError, match="uncommitted"):
        state.snapshot()


def test_malformed_bytes_are_refused() -> None:
    with pytest.raises(ConfigError):
        Delta.decode(b"\xc1garbage")
    with pytest.raises(ConfigError):
        State.restore(b"\x93\x01")


def test_the_digest_follows_every_change_without_rehashing_the_state() -> None:
    """Kept up to date incrementally (commit, apply, rollback): always the digest a fresh
    State with the same content computes from scratch, whatever the order of the keys."""
    import random

    rng = random.Random(7)
    primary, replica = State(), State()
    replica.digest()  # its digest is kept from here on, through apply()
    for batch in range(60):
        for _ in range(rng.randint(1, 6)):
            key = f"k{rng.randint(0, 20)}"
            if key in primary and rng.random() < 0.3:
                del primary[key]
            else:
                primary[key] = rng.choice([batch, f"v{batch}", b"x" * batch, [batch, 1]])
        if batch % 7 == 3:
            primary.rollback()
            continue
        delta = primary.commit()
        if delta is not None:
            replica.apply(delta)
        if batch % 5 == 0:
            fresh = State(dict(reversed(list(primary.items()))), primary.version)
            assert primary.digest() == fresh.digest() == replica.digest()
    assert primary.digest() == replica.digest() == State(dict(primary.items())).digest()
    assert primary.digest() != State().digest()
