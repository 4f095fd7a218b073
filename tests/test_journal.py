"""The stage journal and the runner's commit protocol: a point is persisted, and the inputs
acknowledged, only once downstream acknowledged every output before it."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpmigrate.errors import ConfigError
from dpmigrate.runtime import journal as journal_mod
from dpmigrate.runtime.journal import StageJournal
from dpmigrate.runtime.runner import StageRunner
from dpmigrate.runtime.stage import Emit, Service
from dpmigrate.statesync.state import State
from dpmigrate.transports import mem
from dpmigrate.transports.resolver import MemoryResolver


def _points(j: StageJournal, state: State, count: int) -> None:
    for i in range(count):
        state[f"k{i}"] = i
        delta = state.commit()
        assert delta is not None
        j.append([delta], {"in": i + 1}, {"out": 2 * (i + 1)}, state)


def test_load_replays_points(tmp_path: Path) -> None:
    j, state = StageJournal(tmp_path), State()
    _points(j, state, 5)
    j.close()
    loaded, inputs, outputs = StageJournal(tmp_path).load()
    assert dict(loaded) == dict(state) and loaded.version == 5
    assert (inputs, outputs) == ({"in": 5}, {"out": 10})


def test_a_torn_last_record_is_dropped_and_cut(tmp_path: Path) -> None:
    j, state = StageJournal(tmp_path), State()
    _points(j, state, 3)
    j.close()
    path = tmp_path / "journal"
    whole = path.stat().st_size
    with open(path, "ab") as f:  # a process killed inside its write
        f.write(b"\x40\x00\x00\x00\x01\x02\x03")
    loaded, inputs, _ = StageJournal(tmp_path).load()
    assert loaded.version == 3 and inputs == {"in": 3}
    assert path.stat().st_size == whole, "the torn tail must be cut so new records follow"


def test_compaction_snapshots_and_empties_the_journal(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(journal_mod, "COMPACT_EVERY", 4)
    j, state = StageJournal(tmp_path), State()
    _points(j, state, 6)
    j.close()
    assert (tmp_path / "snapshot").exists()
    loaded, inputs, outputs = StageJournal(tmp_path).load()
    assert dict(loaded) == dict(state) and (inputs, outputs) == ({"in": 6}, {"out": 12})


def test_a_large_state_is_not_rewritten_until_the_journal_is_as_large(
    tmp_path: Path, monkeypatch
) -> None:
    """Compaction rewrites the whole state: with a 2 MiB snapshot it waits until the journal
    holds 2 MiB too, however many records that takes; then it compacts, and loads the same."""
    monkeypatch.setattr(journal_mod, "COMPACT_EVERY", 4)
    j, state = StageJournal(tmp_path), State({"big": b"x" * (2 << 20)})
    j.start_at(state, {"in": 0}, {"out": 0})
    snapshot = (tmp_path / "snapshot").stat().st_mtime_ns
    for i in range(40):  # ~40 small records: far fewer bytes than the snapshot
        state[f"k{i}"] = i
        j.append([state.commit()], {"in": i + 1}, {"out": i + 1}, state)  # type: ignore[list-item]
    assert (tmp_path / "snapshot").stat().st_mtime_ns == snapshot, "rewritten too early"
    state["bulk"] = b"y" * (2 << 20)  # one record as large as the snapshot
    j.append([state.commit()], {"in": 41}, {"out": 41}, state)  # type: ignore[list-item]
    assert (tmp_path / "journal").stat().st_size == 0, "compacted once it paid for itself"
    j.close()
    loaded, inputs, _ = StageJournal(tmp_path).load()
    assert dict(loaded) == dict(state) and inputs == {"in": 41}


def test_start_at_holds_exactly_that_point(tmp_path: Path) -> None:
    """A migration's destination takes over a stage: whatever the folder held before (a stale
    journal of an earlier stay), it then holds the shipped point only, and goes on from it."""
    stale, state = StageJournal(tmp_path), State()
    _points(stale, state, 3)
    stale.close()
    shipped = State({"a": 1, "b": [2, 3]}, version=40)
    j = StageJournal(tmp_path)
    j.start_at(shipped, {"in": 77}, {"out": 91})
    loaded, inputs, outputs = StageJournal(tmp_path).load()
    assert dict(loaded) == dict(shipped) and loaded.version == 40
    assert (inputs, outputs) == ({"in": 77}, {"out": 91})
    assert (tmp_path / "journal").stat().st_size == 0
    loaded["c"] = 4
    delta = loaded.commit()
    assert delta is not None and delta.version == 41
    j.append([delta], {"in": 78}, {"out": 92}, loaded)  # the stage goes on from the point
    j.close()
    again, inputs, _ = StageJournal(tmp_path).load()
    assert again.version == 41 and again["c"] == 4 and inputs == {"in": 78}
    dirty = State()
    dirty["x"] = 1
    with pytest.raises(ValueError, match="committed state"):
        j.start_at(dirty, {}, {})


def test_a_corrupt_snapshot_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "snapshot").write_bytes(b"\xc1 not msgpack")
    with pytest.raises(ConfigError, match=r"snapshot .* is corrupt"):
        StageJournal(tmp_path).load()


class _Double(Service):
    inputs = ("in",)
    outputs = ("out",)

    def process(self, port: str, batch: list[bytes], emit: Emit) -> None:
        self.state["n"] = self.state.get("n", 0) + len(batch)
        for msg in batch:
            emit("out", msg)
            emit("out", msg)


def test_inputs_are_acknowledged_only_when_downstream_acknowledged(tmp_path: Path) -> None:
    resolver = MemoryResolver()
    up_tx = mem.open_sender("up", resolver=resolver, capacity=64)
    up_rx = mem.open_receiver("up", resolver=resolver, auto_commit=False)
    down_tx = mem.open_sender("down", resolver=resolver, capacity=64)
    down_rx = mem.open_receiver("down", resolver=resolver, auto_commit=False)
    j = StageJournal(tmp_path)
    runner = StageRunner("double", _Double(), {"in": up_rx}, {"out": down_tx}, batch=8, journal=j)
    assert up_tx.send_burst([b"m%d" % i for i in range(8)]) == 8
    assert runner.step()
    assert len(down_rx.recv_burst(16, timeout=0)) == 16
    runner.persist()
    assert up_tx.acked == 0, "the input was acknowledged before downstream committed"
    assert not (tmp_path / "journal").exists() or StageJournal(tmp_path).load()[0].version == 0
    down_rx.commit()
    runner.persist()
    assert up_tx.acked == 8
    state, inputs, outputs = StageJournal(tmp_path).load()
    assert state["n"] == 8 and inputs == {"in": 8} and outputs == {"out": 16}
    assert runner.settled
