"""What a checkpoint of an arbitrary process tree cannot carry, found *before* freezing it.

Why: CRIU refuses (or a restore later fails) on a few kinds of resources that tie a process
to the world outside its tree. Freezing a process only to learn that from CRIU's log costs the
process a pause; a look at ``/proc`` and the socket tables costs nothing. The scan is a
best-effort preview — CRIU stays the judge — and reports:

* ``tcp``: an open TCP connection (any state but LISTEN). CRIU refuses it without
  ``--tcp-established``, and even with it the restore needs the same IP addresses.
* ``unix``: a unix socket connected to a peer outside the tree (CRIU: "external socket").
* ``terminal``: a terminal as an open file (CRIU needs ``--shell-job``, restore needs a tty).
* ``session``: the session leader is outside the tree (start the tree under ``setsid``).
* ``file-size`` (not blocking): a regular file open for writing. A restore needs it at the
  size it had at dump time ("bad size" otherwise): nothing may append to it in between.

Stages started by dpmigrate avoid all of these by design (DESIGN.md §4: quiesce, setsid,
output on /dev/null or an append-only log nobody else writes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import shutil
import subprocess
from typing import Any

#: A tree larger than this is not scanned further (the scan stays bounded).
MAX_PROCESSES = 4096

_TCP_STATES = {
    "01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1",
    "05": "FIN_WAIT2", "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK",
    "0A": "LISTEN", "0B": "CLOSING",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Limit:
    """One resource the checkpoint cannot carry (``blocking``) or must be careful with."""

    kind: str
    pid: int
    fd: int | None
    detail: str
    blocking: bool

    def __str__(self) -> str:
        where = f"pid {self.pid}" + (f" fd {self.fd}" if self.fd is not None else "")
        return f"{self.kind} ({where}): {self.detail}"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (host PIDs), from /proc/*/task/*/children."""
    found, queue = [], [pid]
    while queue and len(found) < MAX_PROCESSES:
        current = queue.pop(0)
        found.append(current)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with (
                    contextlib.suppress(OSError),
                    open(f"/proc/{current}/task/{task}/children") as children,
                ):
                    queue.extend(int(c) for c in children.read().split())
    return found


def _fds(pid: int) -> list[tuple[int, str]]:
    out = []
    with contextlib.suppress(OSError):
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                out.append((int(name), os.readlink(f"/proc/{pid}/fd/{name}")))
    return sorted(out)


def _writable(pid: int, fd: int) -> bool:
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/fdinfo/{fd}") as info:
        for line in info:
            if line.startswith("flags:"):
                return int(line.split()[1], 8) & os.O_ACCMODE != os.O_RDONLY
    return False


def _hex_address(text: str) -> str:
    address, port = text.split(":")
    raw = bytes.fromhex(address)
    if len(raw) == 4:
        ip: Any = ipaddress.IPv4Address(raw[::-1])
    else:  # four host-order 32-bit words
        ip = ipaddress.IPv6Address(b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
    return f"{ip}:{int(port, 16)}"


def _tcp_table(pid: int) -> dict[str, tuple[str, str, str]]:
    """inode → (state, local, remote) of the TCP sockets in ``pid``'s network namespace."""
    table = {}
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{name}") as listing:
            next(listing, None)
            for line in listing:
                parts = line.split()
                if len(parts) < 10:
                    continue
                with contextlib.suppress(ValueError):
                    table[parts[9]] = (
                        _TCP_STATES.get(parts[3], parts[3]),
                        _hex_address(parts[1]),
                        _hex_address(parts[2]),
                    )
    return table


def _unix_peers(pid: int) -> dict[str, tuple[str, str]]:
    """inode → (peer inode, users text) of unix sockets, from ``ss`` in ``pid``'s netns."""
    ss, nsenter = shutil.which("ss"), shutil.which("nsenter")
    if ss is None or nsenter is None:
        return {}
    try:
        listing = subprocess.run(
            [nsenter, f"--net=/proc/{pid}/ns/net", "--", ss, "-xanpH"],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return {}
    peers = {}
    for line in listing.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 8:
            users = " ".join(parts[8:])
            peers[parts[5]] = (parts[7], users)
    return peers


def scan(pid: int) -> list[Limit]:
    """Everything in the tree rooted at ``pid`` that a plain dump cannot carry (see module)."""
    pids = tree(pid)
    limits: list[Limit] = []
    sockets: dict[str, tuple[int, int]] = {}
    for member in pids:
        for fd, target in _fds(member):
            if target.startswith("socket:["):
                sockets[target[8:-1]] = (member, fd)
            elif target.startswith(("/dev/pts/", "/dev/tty", "/dev/console")):
                limits.append(
                    Limit("terminal", member, fd, f"{target} is open; CRIU needs a shell job "
                          "and the restore a terminal; start the tree with stdio on files",
                          True)
                )  # fmt: skip
            elif target.startswith("/") and not target.startswith("/dev/"):
                with contextlib.suppress(OSError):
                    if os.path.isfile(target) and _writable(member, fd):
                        limits.append(
                            Limit("file-size", member, fd, f"{target} is open for writing; "
                                  "the restore needs it at its dump-time size (nothing may "
                                  "append to it before the restore)", False)
                        )  # fmt: skip
    session = _session(pid)
    if session and session not in pids:
        limits.append(
            Limit("session", pid, None, f"its session leader (pid {session}) is outside the "
                  "tree; CRIU cannot dump it: start the tree under `setsid`", True)
        )  # fmt: skip
    if sockets:
        tcp = _tcp_table(pid)
        for inode, (member, fd) in sorted(sockets.items(), key=lambda kv: kv[1]):
            if inode in tcp and tcp[inode][0] != "LISTEN":
                state, local, remote = tcp[inode]
                limits.append(
                    Limit("tcp", member, fd, f"TCP connection {local} -> {remote} ({state}); "
                          "CRIU refuses open connections: close it before the checkpoint",
                          True)
                )  # fmt: skip
        peers = _unix_peers(pid)
        connected = _connected_unix(pid)
        for inode, (member, fd) in sorted(sockets.items(), key=lambda kv: kv[1]):
            peer = peers.get(inode, ("0", ""))[0]
            if inode not in peers and inode in connected:
                limits.append(
                    Limit("unix", member, fd, "connected unix socket whose peer the socket "
                          "table does not show (not accepted yet?); CRIU cannot dump a "
                          "connection to outside the tree", True)
                )  # fmt: skip
            elif peer not in ("0", "*") and peer not in sockets:
                owner = peers.get(peer, ("", ""))[1]  # the peer's own line names its process
                limits.append(
                    Limit("unix", member, fd, f"unix socket connected to a peer outside the "
                          f"tree (peer inode {peer}{', ' + owner if owner else ''}); CRIU "
                          "cannot dump it: disconnect first", True)
                )  # fmt: skip
    return limits


def _connected_unix(pid: int) -> set[str]:
    """Inodes of connected unix sockets (state SS_CONNECTED) in ``pid``'s network namespace."""
    found = set()
    with contextlib.suppress(OSError), open(f"/proc/{pid}/net/unix") as listing:
        next(listing, None)
        for line in listing:
            parts = line.split()
            if len(parts) >= 7 and parts[5] == "03":
                found.add(parts[6])
    return found


def _session(pid: int) -> int:
    """Session ID of ``pid`` as the host sees it (field 6 of /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return int(fields[3])
    except (OSError, IndexError, ValueError):
        return 0
