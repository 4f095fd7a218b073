"""Finding a ring's producer end by the ring's name.

A producer end registers where it can be reached (an :class:`Endpoint`); a consumer end looks
the name up and connects. Nothing hard-codes an address, so after a producer moves (or
restarts on another port) the consumer finds it again by looking the name up again.

Two resolvers live here: :class:`MemoryResolver` for ends in one process, and
:class:`DirectoryResolver` for ends in several processes of one host (one small JSON file per
ring, replaced atomically). The cluster registry hosted by the node agents implements the same
interface and pushes moves to watchers instead of being polled.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from dpmigrate import atomic
from dpmigrate.errors import ConfigError, RingTimeout

#: The safe alphabet of ring names, and of the app, stage and node names the agents accept
#: (:data:`dpmigrate.runtime.operations.Name`): no ``/``, never ``.`` or ``..``, and no
#: leading ``-`` or ``.`` (an option, a hidden file).
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


def check_ring_name(name: str) -> str:
    """Ring names appear in socket names and file names: keep them to a safe alphabet."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ConfigError(
            f"ring name {name!r} is not valid: use 1-128 characters from A-Z a-z 0-9 _ . : -, "
            "starting with a letter or a digit"
        )
    return name


@dataclass(frozen=True)
class Endpoint:
    """Where a producer end listens: ``transport`` ("shm", "tcp") and an ``address``.

    For tcp the address is ``host:port``; for shm it is the name of an abstract unix socket
    (no leading NUL) on which the producer hands out the ring's memory file descriptor.
    ``generation`` grows each time the producer end is re-created, so a consumer can tell a
    fresh producer from the one it already knew.
    """

    transport: str
    address: str
    generation: int = 0
    #: the producing stage ("app/stage") and its placement epoch, stamped by the cluster's
    #: resolver; not part of the identity of an end (a transport compares without them)
    epoch: int = field(default=0, compare=False)
    owner: str = field(default="", compare=False)

    def as_dict(self) -> dict[str, object]:
        data: dict[str, object] = {"transport": self.transport, "address": self.address,
                                   "generation": self.generation}  # fmt: skip
        if self.owner:
            data.update(epoch=self.epoch, owner=self.owner)
        return data

    @classmethod
    def from_dict(cls, data: object) -> Endpoint:
        if not isinstance(data, dict):
            raise ConfigError(f"endpoint record must be an object, got {type(data).__name__}")
        transport, address, generation = (
            data.get("transport"),
            data.get("address"),
            data.get("generation", 0),
        )
        epoch, owner = data.get("epoch", 0), data.get("owner", "")
        if not isinstance(transport, str) or not isinstance(address, str):
            raise ConfigError(f"endpoint record {data!r} lacks a string transport and address")
        for name, value in (("generation", generation), ("epoch", epoch)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"endpoint record {data!r} has a non-integer {name}")
        if not isinstance(owner, str) or len(owner) > 257:
            raise ConfigError(f"endpoint record {data!r} has a bad owner")
        return cls(transport, address, generation, epoch, owner)


class Resolver(Protocol):
    """Name → endpoint registry shared by the two ends of a ring."""

    def register(self, ring: str, endpoint: Endpoint) -> None: ...

    def unregister(self, ring: str) -> None: ...

    def lookup(self, ring: str, timeout: float | None = 0) -> Endpoint:
        """Return the ring's endpoint, waiting up to ``timeout`` for one to be registered.

        Raises RingTimeout when there is none in time.
        """
        ...

    def wait_newer(self, ring: str, generation: int, timeout: float) -> Endpoint | None:
        """Wait up to ``timeout`` for an endpoint of ``ring`` newer than ``generation`` (a
        producer end re-created, maybe elsewhere); None if none came. A reconnecting consumer
        waits here instead of sleeping, so it learns of a moved producer the moment the
        registry does (push, not poll)."""
        ...


class MemoryResolver:
    """A resolver for ring ends that live in one process (threads)."""

    def __init__(self) -> None:
        self._entries: dict[str, Endpoint] = {}
        self._changed = threading.Condition()

    def register(self, ring: str, endpoint: Endpoint) -> None:
        check_ring_name(ring)
        with self._changed:
            self._entries[ring] = endpoint
            self._changed.notify_all()

    def unregister(self, ring: str) -> None:
        with self._changed:
            self._entries.pop(ring, None)
            self._changed.notify_all()

    def lookup(self, ring: str, timeout: float | None = 0) -> Endpoint:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while ring not in self._entries:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise RingTimeout(
                        f"ring {ring!r}: no producer registered within {timeout} s; "
                        "is the producing stage running?"
                    )
                self._changed.wait(remaining)
            return self._entries[ring]

    def wait_newer(self, ring: str, generation: int, timeout: float) -> Endpoint | None:
        deadline = time.monotonic() + max(0.0, timeout)
        with self._changed:
            while True:
                found = self._entries.get(ring)
                if found is not None and found.generation > generation:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._changed.wait(remaining)


class DirectoryResolver:
    """A resolver for processes on one host: ``DIR/<ring>.json``, written atomically.

    Lookups that must wait poll the directory every ``poll_interval`` seconds; this resolver is
    for tests, benchmarks and single-host use. The agents' registry pushes changes instead.
    """

    def __init__(self, directory: str | os.PathLike[str], poll_interval: float = 0.005) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.poll_interval = poll_interval

    def _path(self, ring: str) -> Path:
        return self.directory / f"{check_ring_name(ring)}.json"

    def register(self, ring: str, endpoint: Endpoint) -> None:
        atomic.write_json(self._path(ring), endpoint.as_dict())

    def unregister(self, ring: str) -> None:
        self._path(ring).unlink(missing_ok=True)

    def lookup(self, ring: str, timeout: float | None = 0) -> Endpoint:
        path = self._path(ring)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return Endpoint.from_dict(json.loads(path.read_text()))
            except FileNotFoundError:
                pass
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ConfigError(f"ring {ring!r}: registry file {path} is corrupt: {err}") from err
            if deadline is not None and time.monotonic() >= deadline:
                raise RingTimeout(
                    f"ring {ring!r}: no producer registered in {self.directory} within "
                    f"{timeout} s; is the producing stage running?"
                )
            time.sleep(self.poll_interval)

    def wait_newer(self, ring: str, generation: int, timeout: float) -> Endpoint | None:
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            try:
                found = self.lookup(ring, timeout=0)
                if found.generation > generation:
                    return found
            except RingTimeout:
                pass
            if time.monotonic() >= deadline:
                return None
            time.sleep(min(self.poll_interval, max(0.0, deadline - time.monotonic())))
