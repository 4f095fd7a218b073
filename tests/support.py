"""Helpers shared by the tests: the capability gate and running the CLI.

``require(what)`` skips a test whose machine truly lacks something, with the reason. With
DPMIGRATE_STRICT=1 (CI sets it) a missing CRIU, root, network namespaces or nftables is a
failure instead: CI installs all of them, so such a skip would hide a broken set-up step. Only
what the hardware can lack (an RDMA device) may still skip there.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from dpmigrate import config

#: Capabilities a CI machine must have; missing one in strict mode fails the test.
_MANDATORY = {"root", "criu", "netns", "nftables", "etcd"}


def _has(what: str) -> tuple[bool, str]:
    if what == "root":
        return os.geteuid() == 0, "needs root"
    if what == "criu":
        cfg = config.load()
        if not os.access(cfg.criu, os.X_OK):
            return False, f"needs criu >= 4.2 at {cfg.criu} (run scripts/setup)"
        return True, ""
    if what == "netns":
        ok = shutil.which("unshare") is not None and os.geteuid() == 0
        return ok, "needs network namespaces (root and util-linux unshare)"
    if what == "nftables":
        ok = shutil.which("nft") is not None and os.geteuid() == 0
        return ok, "needs nftables (apt-get install nftables) and root"
    if what == "etcd":
        from dpmigrate.cluster import etcd
        from dpmigrate.errors import EnvironmentProblem

        try:
            etcd.binary(config.load().prefix)
        except EnvironmentProblem as err:
            return False, str(err)
        return True, ""
    if what == "rdma":
        return bool(os.listdir("/sys/class/infiniband")) if os.path.isdir(
            "/sys/class/infiniband"
        ) else False, "no RDMA device on this machine"
    raise ValueError(f"unknown capability {what!r}")


def require(*what: str) -> None:
    """Skip (or, in strict mode, fail) unless this machine has every capability in ``what``."""
    strict = config.load().strict
    for item in what:
        ok, reason = _has(item)
        if ok:
            continue
        if strict and item in _MANDATORY:
            pytest.fail(f"DPMIGRATE_STRICT: {reason}; scripts/setup should have provided it")
        pytest.skip(reason)


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the installed `dpmigrate` command as a user would."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    exe = os.path.join(os.path.dirname(sys.executable), "dpmigrate")
    if not os.path.exists(exe):
        exe = shutil.which("dpmigrate") or "dpmigrate"
    return subprocess.run(
        [exe, *args], capture_output=True, text=True, env=full_env, timeout=timeout, check=False
    )


EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "flows" / "app.toml"


def paced_flows(folder: Path, total: int, rate: int = 20000) -> Path:
    """The flows example with ``total`` packets at ``rate`` per second, written to ``folder``."""
    text = EXAMPLE.read_text().replace("total = 20000", f"total = {total}, rate = {rate}")
    assert f"total = {total}" in text
    (folder / "stages.py").write_text((EXAMPLE.parent / "stages.py").read_text())
    path = folder / "app.toml"
    path.write_text(text)
    return path


def checker_of(stages: list[dict]) -> dict:
    """The flows checker's metrics (received, lost, duplicated, digest) from a stage list."""
    return next(s["metrics"] for s in stages if s["name"] == "check")


def process_state(pid: int) -> str:
    """The process state letter from /proc ("" when it is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def alive(pid: int) -> bool:
    return process_state(pid) not in ("", "Z", "X")


def pid_namespace(pid: int) -> str:
    """The inode number of the process's PID namespace."""
    return os.readlink(f"/proc/{pid}/ns/pid")[5:-1]


def wait_until(
    check: Callable[[], object], what: str, timeout: float = 10.0, interval: float = 0.005
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


class Restored:
    """PIDs of processes restored by a test (and their keepers), killed and reaped at the end."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    def add(self, *pids: int | None) -> int:
        """Record ``pids`` (None ignored); returns the first (0 if none), for
        ``pid = restored.add(...)``."""
        self.pids.extend(p for p in pids if p)
        return next((p for p in pids if p), 0)

    def kill_all(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        for pid in self.pids:
            while time.monotonic() < deadline:
                try:  # our child: reap it; someone else's: wait until it is gone
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        break
                except ChildProcessError:
                    if not alive(pid):
                        break
                time.sleep(0.01)


def reference_checker(app: object) -> dict:
    """The checker's metrics of an uninterrupted in-process run of ``app`` (the digest every
    other run must match)."""
    from dpmigrate.runtime import inprocess

    return checker_of(inprocess.summary(inprocess.run(app))["stages"])  # type: ignore[arg-type]


def stage_status(run: object, name: str = "table") -> dict:
    """A stage's status in a running app ({} when it does not run)."""
    return next((s for s in run.status() if s["name"] == name), {})  # type: ignore[attr-defined]


def wait_for_input(run: object, at_least: int, name: str = "table") -> None:
    """Until stage ``name`` took in ``at_least`` messages (bounded: 60 s)."""
    deadline = time.monotonic() + 60
    while stage_status(run, name).get("msgs_in", 0) < at_least:
        assert time.monotonic() < deadline, run.status()  # type: ignore[attr-defined]
        time.sleep(0.05)


def in_mount_ns(pid: int, *cmd: str) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in the mount namespace of ``pid``: what that process sees (bounded)."""
    return subprocess.run(["nsenter", f"--mount=/proc/{pid}/ns/mnt", *cmd],
                          capture_output=True, text=True, timeout=30, check=False)  # fmt: skip


T = TypeVar("T")


def in_netns(pid: int, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a thread that entered ``pid``'s network namespace: the sockets it makes
    live there (setns changes only the calling thread)."""
    result: list[Any] = []

    def run() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
        try:
            if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                result.append(OSError(ctypes.get_errno(), "setns"))
                return
        finally:
            os.close(fd)
        try:
            result.append(fn())
        except BaseException as err:
            result.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    assert result, "the namespace thread did not finish"
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]
