"""Reaching an address that exists only inside a network namespace, from the host's.

The local cluster's etcd listens only on its own bridge, inside the hub's namespace, so the
CLI (in the host's namespace) cannot connect to it directly. A network namespace is a property
of a *thread* (setns(2) with CLONE_NEWNET), and a socket stays in the namespace it was made
in: :class:`NetnsExecutor` keeps one worker thread that has entered the namespace, and runs
the calls that open connections there. Nothing is added to the host's own namespace.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
from collections.abc import Callable
from typing import TypeVar

from dpmigrate.errors import EnvironmentProblem

CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def _enter(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise EnvironmentProblem(f"setns({path}, CLONE_NEWNET) failed: {os.strerror(err)}")
    finally:
        os.close(fd)


class NetnsExecutor:
    """One thread living in network namespace ``name`` (``/run/netns/NAME``)."""

    def __init__(self, name: str) -> None:
        self.path = f"/run/netns/{name}"
        if not os.path.exists(self.path):
            raise EnvironmentProblem(
                f"network namespace {name} is gone; is the cluster up? (`dpmigrate cluster status`)"
            )
        self._pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"netns-{name}", initializer=_enter, initargs=(self.path,)
        )

    def run(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        return self._pool.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        self._pool.shutdown(wait=False)
