"""A stage's explicit state: a dict whose changes are recorded per batch as versioned deltas.

The runtime commits the state at every batch boundary together with the batch's outputs and
input positions (DESIGN.md §3). ``commit()`` turns the changes of the batch into a
:class:`Delta` with the next version; the statesync protocol ships those deltas to replicas
and migration targets, and a restart replays them onto the last snapshot.

Changes are recorded on assignment and deletion of top-level keys. A value mutated in place
(``state["k"].append(1)``) is *not* seen: assign it again (``state["k"] = v``). Keep values
small and numerous (one key per flow) rather than one huge nested value, so deltas stay small.
Values must be msgpack-serialisable: a bad value is reported at commit, naming the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, MutableMapping
from typing import Any

import msgpack

from dpmigrate.errors import ConfigError

_DELETED = object()
_DIGEST_MOD = 1 << 128


def pack(value: Any) -> bytes:
    """msgpack with the options every state byte in dpmigrate uses (deterministic maps)."""
    return msgpack.packb(value, use_bin_type=True, strict_types=False)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)


@dataclasses.dataclass(frozen=True)
class Delta:
    """The changes of one committed batch: ``set`` keys with new values, ``deleted`` keys."""

    version: int
    set: dict[str, Any]
    deleted: tuple[str, ...]

    def encode(self) -> bytes:
        return pack([self.version, self.set, list(self.deleted)])

    @classmethod
    def decode(cls, data: bytes) -> Delta:
        try:
            version, changes, deleted = unpack(data)
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError) as err:
            raise ConfigError(f"state delta is malformed: {err}") from err
        if (
            not isinstance(version, int)
            or not isinstance(changes, dict)
            or not isinstance(deleted, list)
        ):
            raise ConfigError("state delta is malformed: wrong field types")
        return cls(version, changes, tuple(deleted))


class State(MutableMapping[str, Any]):
    """Dict-like explicit state with a version and per-batch change recording."""

    def __init__(self, data: dict[str, Any] | None = None, version: int = 0) -> None:
        self._data: dict[str, Any] = dict(data or {})
        self._version = version
        self._pending: dict[str, Any] = {}
        self._undo: dict[str, Any] = {}  # value before the batch first touched the key
        #: The digest as a sum of per-key hashes (None: not computed yet), and the keys
        #: changed since, with their value then: a digest costs what changed, not the state.
        self._sum: int | None = None
        self._since: dict[str, Any] = {}

    # -- mapping protocol ------------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if not isinstance(key, str):
            raise TypeError(f"state keys are strings, got {type(key).__name__}")
        if key not in self._undo:
            self._undo[key] = self._data.get(key, _DELETED)
        self._data[key] = value
        self._pending[key] = value

    def __delitem__(self, key: str) -> None:
        if key not in self._undo and key in self._data:
            self._undo[key] = self._data[key]
        del self._data[key]
        self._pending[key] = _DELETED

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    # -- versions and deltas ---------------------------------------------------------------
    @property
    def version(self) -> int:
        """Number of committed batches that changed something since the state was created."""
        return self._version

    @property
    def dirty(self) -> bool:
        return bool(self._pending)

    def commit(self) -> Delta | None:
        """Close the batch: return its changes as the next version (None if it changed nothing)."""
        if not self._pending:
            return None
        changes = {k: v for k, v in self._pending.items() if v is not _DELETED}
        deleted = tuple(k for k, v in self._pending.items() if v is _DELETED)
        for key, value in changes.items():
            try:
                pack(value)
            except (TypeError, ValueError) as err:
                raise ConfigError(
                    f"state key {key!r} holds a {type(value).__name__}, which msgpack cannot "
                    f"serialise ({err}); store numbers, strings, bytes, lists or dicts"
                ) from err
        self._version += 1
        self._note_changes(self._undo)
        self._pending = {}
        self._undo = {}
        return Delta(self._version, changes, deleted)

    def _note_changes(self, before: dict[str, Any]) -> None:
        """Keys about to differ from the last digest, with their value at that digest."""
        if self._sum is None:
            return
        since = self._since
        for key, old in before.items():
            if key not in since:
                since[key] = old

    def rollback(self) -> None:
        """Undo the uncommitted changes of the current batch (the batch failed)."""
        for key, old in self._undo.items():
            if old is _DELETED:
                self._data.pop(key, None)
            else:
                self._data[key] = old
        self._pending = {}
        self._undo = {}

    def apply(self, delta: Delta) -> bool:
        """Apply a delta from elsewhere. Idempotent: a version already covered is ignored."""
        if delta.version <= self._version:
            return False
        if delta.version != self._version + 1:
            raise ConfigError(
                f"state delta version {delta.version} does not follow version {self._version}; "
                "resynchronise from a snapshot"
            )
        if self._sum is not None:
            data = self._data
            self._note_changes({k: data.get(k, _DELETED) for k in (*delta.set, *delta.deleted)})
        self._data.update(delta.set)
        for key in delta.deleted:
            self._data.pop(key, None)
        self._version = delta.version
        return True

    def snapshot(self) -> bytes:
        """The whole committed state and its version, as bytes."""
        if self._pending:
            raise ConfigError("snapshot of a state with uncommitted changes; commit() first")
        return pack([self._version, self._data])

    def committed_copy(self) -> dict[str, Any]:
        """A shallow copy of the committed data: what a snapshot at ``version`` holds.

        The uncommitted changes of a batch in progress are left out (undone in the copy), so
        this is safe to call at any moment. Values are shared, not copied: a value is never
        changed in place (see the module docstring), so the copy stays exactly at this version
        while the stage goes on. Costs one dict copy (pointers), never a serialisation.
        """
        data = self._data.copy()
        for key, old in self._undo.items():
            if old is _DELETED:
                data.pop(key, None)
            else:
                data[key] = old
        return data

    @classmethod
    def adopt(cls, data: dict[str, Any], version: int) -> State:
        """A State that takes ``data`` over without copying it (a replica that has just received
        a whole snapshot into a fresh dict); the caller must not use ``data`` afterwards."""
        state = cls(None, version)
        state._data = data
        return state

    @classmethod
    def restore(cls, data: bytes) -> State:
        try:
            version, values = unpack(data)
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError) as err:
            raise ConfigError(f"state snapshot is malformed: {err}") from err
        if not isinstance(version, int) or not isinstance(values, dict):
            raise ConfigError("state snapshot is malformed: wrong field types")
        return cls(values, version)

    def digest(self) -> str:
        """A content hash of the committed state, independent of insertion order: the sum of
        a hash of each (key, value), kept up to date by what changed since the last call — so
        a stage holding a GiB reports its digest every status without hashing it each time.
        Inside a batch it is the digest of the committed state (computed afresh: rare)."""
        if self._pending:
            return State(self.committed_copy(), self._version).digest()
        if self._sum is None:
            self._sum = sum(_entry_hash(k, v) for k, v in self._data.items()) % _DIGEST_MOD
            self._since = {}
        elif self._since:
            total, data = self._sum, self._data
            for key, old in self._since.items():
                if old is not _DELETED:
                    total -= _entry_hash(key, old)
                now = data.get(key, _DELETED)
                if now is not _DELETED:
                    total += _entry_hash(key, now)
            self._sum = total % _DIGEST_MOD
            self._since = {}
        return f"{self._sum:032x}"


def _entry_hash(key: str, value: Any) -> int:
    return int.from_bytes(hashlib.blake2b(pack([key, value]), digest_size=16).digest(), "big")
