"""Rings: one interface, one transport per deployment model.

    from dpmigrate.transports import open_sender, open_receiver, MemoryResolver

    resolver = MemoryResolver()
    tx = open_sender("tcp", "flows", resolver=resolver, capacity=1024)
    rx = open_receiver("tcp", "flows", resolver=resolver)

``mem`` (in-process), ``shm`` (shared memory, C core) and ``tcp`` implement the same
:class:`RingSender` / :class:`RingReceiver` interface (see :mod:`.base`); the modules are
imported on first use so that, say, the mem ring does not need the C extension.
"""

from __future__ import annotations

import importlib
from typing import Any

from dpmigrate.errors import ConfigError
from dpmigrate.transports.base import (
    DEFAULT_CAPACITY,
    DEFAULT_RECONNECT_TIMEOUT,
    MAX_MESSAGE,
    RingReceiver,
    RingSender,
    RingStatistics,
)
from dpmigrate.transports.resolver import DirectoryResolver, Endpoint, MemoryResolver, Resolver

TRANSPORTS = ("mem", "shm", "tcp")

__all__ = [
    "DEFAULT_CAPACITY",
    "DEFAULT_RECONNECT_TIMEOUT",
    "MAX_MESSAGE",
    "TRANSPORTS",
    "DirectoryResolver",
    "Endpoint",
    "MemoryResolver",
    "Resolver",
    "RingReceiver",
    "RingSender",
    "RingStatistics",
    "module",
    "open_receiver",
    "open_sender",
]


def module(transport: str) -> Any:
    """The module implementing ``transport`` (it has open_sender and open_receiver)."""
    if transport not in TRANSPORTS:
        raise ConfigError(
            f"unknown ring transport {transport!r}; choose one of {', '.join(TRANSPORTS)}"
        )
    return importlib.import_module(f"dpmigrate.transports.{transport}")


def open_sender(transport: str, name: str, **options: Any) -> RingSender:
    """Create the producer end of ring ``name`` (it registers itself in ``resolver``)."""
    return module(transport).open_sender(name, **options)


def open_receiver(transport: str, name: str, **options: Any) -> RingReceiver:
    """Attach the consumer end of ring ``name`` (found through ``resolver``)."""
    return module(transport).open_receiver(name, **options)
