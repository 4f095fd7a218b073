"""Where a stage's committed state survives a crash: a snapshot plus a journal of deltas.

Each record commits one *persisted point* of the stage: the state deltas up to it, the input
positions (``next_expected`` per input port) and the output positions (``next_seq`` per output
port). A stage persists a point only once its downstream peers have acknowledged every output
sent before it (see :mod:`dpmigrate.runtime.runner`), and acknowledges its inputs only up to
that point, so after a crash the upstream producers still retain every input the restarted
stage must process again, and its regenerated outputs carry the same sequence numbers, which
the downstream consumers drop as duplicates. Nothing lost, nothing duplicated.

Files (in the stage's folder): ``snapshot`` (written to a temporary name, then renamed) and
``journal`` (append-only; records are ``u32 length, u32 crc32, msgpack body``). A torn last
record (the process died inside a write) fails its checksum and is ignored: it was never
acknowledged to anyone. Both are mode 0600 in a 0700 folder: they hold the stage's state,
which may be as secret as the packets it was built from.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

from dpmigrate import atomic
from dpmigrate.errors import ConfigError
from dpmigrate.statesync.state import Delta, State, pack, unpack

_HEADER = struct.Struct("<II")
#: Rewrite the snapshot (and empty the journal) after this many records — and only once the
#: journal holds at least as many bytes as the snapshot: rewriting a GiB of state every 256
#: batches stalled such a stage for seconds each time; this way compaction costs at most
#: about one byte written per byte journaled, whatever the state's size.
COMPACT_EVERY = 256

Positions = dict[str, int]


def _private(path: Path, mode: int) -> None:
    """Give ``path`` (if it is there, and not a symbolic link) ``mode``."""
    if not path.is_symlink() and path.exists():
        os.chmod(path, mode)


class StageJournal:
    """Persistent committed points of one stage instance."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        _private(self.folder, 0o700)
        for path in (self.folder / "journal", self.folder / "snapshot"):
            _private(path, 0o600)  # written by an older dpmigrate with the umask's mode
        self._journal_path = self.folder / "journal"
        self._snapshot_path = self.folder / "snapshot"
        self._fd: int | None = None
        self._records = 0
        self._journal_bytes = 0  # written since the last snapshot
        self._snapshot_size = self._snapshot_bytes()

    def is_empty(self) -> bool:
        """Nothing was ever persisted here (a new instance starts from empty state)."""
        if self._snapshot_path.exists():
            return False
        try:
            return self._journal_path.stat().st_size == 0
        except FileNotFoundError:
            return True

    def load(self) -> tuple[State, Positions, Positions]:
        """The last persisted point: (state, input positions, output positions)."""
        self._records = 0
        self._journal_bytes = 0
        state, inputs, outputs = State(), {}, {}
        if self._snapshot_path.exists():
            try:
                _version, snap, inputs, outputs = unpack(self._snapshot_path.read_bytes())
                state = State.restore(snap)
            except (ValueError, TypeError) as err:
                raise ConfigError(
                    f"stage snapshot {self._snapshot_path} is corrupt ({err}); move it away to "
                    "start the stage from empty state"
                ) from err
        data = self._journal_path.read_bytes() if self._journal_path.exists() else b""
        offset = 0
        while offset + _HEADER.size <= len(data):
            length, crc = _HEADER.unpack_from(data, offset)
            body = data[offset + _HEADER.size : offset + _HEADER.size + length]
            if len(body) != length or zlib.crc32(body) != crc:
                break  # a torn final record: never acknowledged, safe to drop
            deltas, inputs, outputs = unpack(body)
            for raw in deltas:
                state.apply(Delta.decode(raw))
            offset += _HEADER.size + length
            self._records += 1
        if offset != len(data):  # cut the torn tail so new records follow valid ones
            with open(self._journal_path, "r+b") as f:
                f.truncate(offset)
        self._journal_bytes = offset
        self._snapshot_size = self._snapshot_bytes()
        return state, dict(inputs), dict(outputs)

    def append(
        self, deltas: list[Delta], inputs: Positions, outputs: Positions, state: State | None
    ) -> None:
        """Persist a point. Pass ``state`` only when it is exactly at this point (nothing
        processed after it): only then can the journal be compacted into a snapshot."""
        body = pack([[d.encode() for d in deltas], inputs, outputs])
        if self._fd is None:
            self._fd = os.open(self._journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(self._fd, _HEADER.pack(len(body), zlib.crc32(body)) + body)
        self._records += 1
        self._journal_bytes += _HEADER.size + len(body)
        if (
            self._records >= COMPACT_EVERY
            and state is not None
            and not state.dirty
            and self._journal_bytes >= self._snapshot_size
        ):
            self._compact(state, inputs, outputs)

    def _snapshot_bytes(self) -> int:
        try:
            return self._snapshot_path.stat().st_size
        except FileNotFoundError:
            return 0

    def start_at(self, state: State, inputs: Positions, outputs: Positions) -> None:
        """Make this journal hold exactly one point — ``state`` with these positions — and
        nothing else: how a node takes over a stage whose committed state it may never have
        had (a migration's destination, before the stage runs there). The snapshot is
        replaced first (fsynced, renamed over), then the journal emptied. Stopped between the
        two, a load gives this state, and this point's positions when the journal left there
        ended at this point (a folder the source shares: its records re-apply only deltas the
        snapshot covers, ignored by version); a stale journal's positions otherwise — so call
        this before anything runs from the folder, and let a failure end the takeover."""
        if state.dirty:
            raise ValueError("start_at takes a committed state, not one inside a batch")
        self.close()
        tmp = self._snapshot_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)  # a .tmp left by an older dpmigrate keeps its mode otherwise
        with os.fdopen(fd, "wb") as out:
            out.write(pack([state.version, state.snapshot(), inputs, outputs]))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self._snapshot_path)
        fd = os.open(
            self._journal_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
        )
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        atomic.fsync_dir(self.folder)
        self._records = 0
        self._journal_bytes = 0
        self._snapshot_size = self._snapshot_bytes()

    def _compact(self, state: State, inputs: Positions, outputs: Positions) -> None:
        tmp = self._snapshot_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)  # a .tmp left by an older dpmigrate keeps its mode otherwise
        with os.fdopen(fd, "wb") as out:
            out.write(pack([state.version, state.snapshot(), inputs, outputs]))
        os.replace(tmp, self._snapshot_path)
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
        self._records = 0
        self._journal_bytes = 0
        self._snapshot_size = self._snapshot_bytes()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
