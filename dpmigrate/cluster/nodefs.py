"""A local node's own filesystem view: it sees its own state dir and no other node's.

Nodes share nothing but the network (DESIGN.md §7). On one host that is made true, not just
promised: the agent of a local node enters a mount namespace of its own before it does anything
else, covers the whole state dir with an empty tmpfs (the other nodes' folders, the cluster
record with its token, the etcd data all vanish from its view) and mounts its own folder back
at one fixed path, :func:`node_dir`. Its stages and its CRIU inherit that view.

The fixed path is the same on every node, so a stage restored by CRIU on another node finds
its run folder, journal and log at the path it had — each node's own copy, which the
migration wrote there through the agents. CRIU is unaffected: it runs in the agent's mount
namespace, the one its stages live in, so it dumps no mount namespace, and a quiesced stage
holds no open file under the state dir.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from dpmigrate.errors import EnvironmentProblem

CLONE_NEWNS = 0x00020000
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x1000, 0x4000, 0x40000


def node_dir(state_dir: str) -> Path:
    """Where a node's agent and stages see their own folder (inside their mount namespace)."""
    return Path(state_dir) / "node"


def host_dir(state_dir: str, node: str) -> Path:
    """Where that folder lies on the host (what `cluster up` creates and `down` removes)."""
    return Path(state_dir) / "nodes" / node


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    """mount(2) itself: mount(8) would resolve ``/proc/self/fd/N`` to a path we just hid."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                           ctypes.c_char_p]  # fmt: skip
    encoded = [None if v is None else v.encode() for v in (source, target, fstype)]
    if libc.mount(*encoded, flags, data.encode() or None) != 0:
        err = ctypes.get_errno()
        raise EnvironmentProblem(
            f"mount({source}, {target}, {fstype}) failed: {os.strerror(err)}; run as root"
        )


def isolate(state_dir: str, node: str) -> Path:
    """Enter a private mount namespace that shows only ``node``'s folder of ``state_dir``.

    Must run before the process starts a thread (unshare of the mount namespace needs a
    single-threaded caller). Returns :func:`node_dir`.
    """
    own = host_dir(state_dir, node)
    if not own.is_dir():
        raise EnvironmentProblem(f"node folder {own} is missing; `dpmigrate cluster up` makes it")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        raise EnvironmentProblem(
            f"unshare(CLONE_NEWNS) failed: {os.strerror(ctypes.get_errno())}; run as root"
        )
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount leaks to the host
    # Opened in the new namespace (a bind source must be one of its mounts) and before the
    # tmpfs hides the path: the bind then reaches the folder through the descriptor.
    fd = os.open(own, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _mount("dpmigrate-node", state_dir, "tmpfs", MS_NOSUID | MS_NODEV,
               "mode=0700,size=1m")  # fmt: skip
        target = node_dir(state_dir)
        target.mkdir(mode=0o700)
        _mount(f"/proc/self/fd/{fd}", str(target), None, MS_BIND)
    finally:
        os.close(fd)
    return target
