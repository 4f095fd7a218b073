"""Memory transfer on real CRIU between two network namespaces the test creates: stop-and-copy
through the page server and post-copy through lazy pages, plus the post-copy rollback.

The migrated process holds 32 MiB of deterministic data and loops: it hashes one MiB of it per
round (publishing the digest after each full pass) and rewrites, by rename, a status file
named after its PID namespace: ``counter time_ns max_gap_ns passes digest``. A restored copy
lives in a new PID namespace, so the original and the copy each write their own file. It is
started the way the supervisor starts stages (``unshare --pid --fork --kill-child setsid``,
stdio on /dev/null), inside the source namespace.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import Restored, alive, pid_namespace, process_state, require, wait_until

from dpmigrate.checkpoint import criu_rpc, transfer
from dpmigrate.errors import CheckpointError

MIB = 32
SEED = 1234
SRC_IP, DST_IP = "10.214.0.1", "10.214.0.2"

WORKER = r"""
import hashlib, os, random, sys, time
folder, mib, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = random.Random(seed).randbytes(mib << 20)
view = memoryview(data)
chunk = 1 << 20
n = passes = pos = max_gap = 0
digest = "-"
h = hashlib.sha256()
last = time.time_ns()
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    n += 1
    h.update(view[pos:pos + chunk])
    pos += chunk
    if pos >= len(data):
        passes, digest, h, pos = passes + 1, h.hexdigest(), hashlib.sha256(), 0
    now = time.time_ns()
    max_gap, last = max(max_gap, now - last), now
    path = f"{folder}/status-" + os.readlink("/proc/self/ns/pid")[5:-1]
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, f"{n} {now} {max_gap} {passes} {digest}\n".encode())
    os.close(fd)
    os.replace(path + ".tmp", path)
    time.sleep(0.005)
"""

EXPECTED = hashlib.sha256(random.Random(SEED).randbytes(MIB << 20)).hexdigest()


@dataclass
class Status:
    counter: int
    time_ns: int
    max_gap_ns: int
    passes: int
    digest: str


def read_status(path: Path) -> Status | None:
    try:
        fields = path.read_text().split()
    except OSError:
        return None
    if len(fields) != 5:
        return None
    return Status(int(fields[0]), int(fields[1]), int(fields[2]), int(fields[3]), fields[4])


@dataclass
class Nodes:
    src: str
    dst: str


@pytest.fixture
def nodes() -> Iterator[Nodes]:
    """Two network namespaces joined by a veth pair, 10.214.0.1/24 and 10.214.0.2/24."""
    require("root", "criu", "netns")
    tag = f"{os.getpid()}"
    names = (f"dpmt-{tag}-src", f"dpmt-{tag}-dst")
    veth = (f"dpt{tag}a", f"dpt{tag}b")

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, timeout=10, capture_output=True)

    try:
        for name in names:
            ip("netns", "add", name)
        ip("link", "add", veth[0], "netns", names[0], "type", "veth", "peer", "name", veth[1],
           "netns", names[1])  # fmt: skip
        for name, dev, address in zip(names, veth, (SRC_IP, DST_IP), strict=True):
            ip("-n", name, "addr", "add", f"{address}/24", "dev", dev)
            ip("-n", name, "link", "set", dev, "up")
            ip("-n", name, "link", "set", "lo", "up")
        yield Nodes(*(f"/run/netns/{name}" for name in names))
    finally:
        for name in names:  # removes the veth pair (and any nft table) with them
            subprocess.run(["ip", "netns", "del", name], check=False, timeout=10,
                           capture_output=True)  # fmt: skip


@pytest.fixture
def workdir() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="dpmigrate-test-transfer-"))
    for sub in ("src", "dst", "out", "logs"):
        (folder / sub).mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class Worker:
    """The migrated process: ``nsenter`` → ``unshare`` (ours) → python (PID 1 inside)."""

    def __init__(self, netns: str, out: Path) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            ["nsenter", f"--net={netns}", "--", "unshare", "--pid", "--fork", "--kill-child",
             "setsid", sys.executable, "-c", WORKER, str(out), str(MIB), str(SEED)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=True, cwd="/",
        )  # fmt: skip
        self.pid = self._inner_pid()
        self.status_file = out / f"status-{pid_namespace(self.pid)}"
        wait_until(lambda: self.status() and self.status().passes >= 1, "the worker's first pass")  # type: ignore[union-attr]

    def _inner_pid(self) -> int:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                children = path.read_text().split()
                if children:
                    return int(children[0])
            time.sleep(0.01)
        raise AssertionError("the worker did not start")

    def status(self) -> Status | None:
        return read_status(self.status_file)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # --kill-child takes the python with it
        self.proc.wait(10)


@pytest.fixture
def worker(nodes: Nodes, workdir: Path) -> Iterator[Worker]:
    proc = Worker(nodes.src, workdir / "out")
    try:
        yield proc
    finally:
        proc.stop()


def check_continues(pid: int, out: Path, before: Status, netns: str) -> Status:
    """The restored copy ``pid`` runs in ``netns``, counts on from ``before`` (the last value
    the original wrote) and completes a new pass over its data with the right digest."""
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(netns).st_ino
    path = out / f"status-{pid_namespace(pid)}"
    wait_until(lambda: read_status(path) is not None, "the restored copy to write its status")
    first = read_status(path)
    assert first is not None
    assert before.counter < first.counter <= before.counter + 20, (before, first)
    target = first.passes + 1
    wait_until(lambda: (read_status(path) or first).passes >= target, "a pass over restored data")
    last = read_status(path)
    assert last is not None and last.digest == EXPECTED and last.counter > first.counter
    return last


def assert_no_lock_tables(nodes: Nodes) -> None:
    assert criu_rpc.network_lock_tables(nodes.src) == []
    assert criu_rpc.network_lock_tables(nodes.dst) == []


# --------------------------------------------------------------------------- stop-and-copy


def test_stop_and_copy_through_page_server(
    nodes: Nodes, workdir: Path, worker: Worker, restored: Restored
) -> None:
    src, dst, logs = workdir / "src", workdir / "dst", workdir / "logs"
    assert worker.status() is not None and worker.status().digest == EXPECTED  # type: ignore[union-attr]
    with transfer.PageServer(dst, address=DST_IP, netns=nodes.dst, log_dir=logs) as server:
        assert server.port > 0 and server.pid
        result = transfer.dump_to_page_server(worker.pid, src, server.endpoint, netns=nodes.src)
        assert server.wait(30) == 0
    wait_until(lambda: not alive(worker.pid), "the dumped source to end")
    before = worker.status()
    assert before is not None
    worker.status_file.unlink()  # the copy's new PID namespace may reuse the inode number
    assert result.frozen_time > 0 and result.pages_written > (MIB << 20) // 4096

    # Memory went to the destination only: the source holds a few KiB of images, no pages.
    assert not list(src.glob("pages-*.img")) and not list(src.glob("pagemap-*.img"))
    assert 0 < transfer.images_bytes(src) < 256 * 1024
    assert transfer.images_bytes(dst, memory_only=True) >= result.pages_written * 4096
    copied = transfer.copy_images(src, dst)
    assert "inventory.img" in copied.files and copied.bytes == transfer.images_bytes(src)

    pid = restored.add(criu_rpc.restore(dst, netns=nodes.dst, log_dir=logs).pid)
    check_continues(pid, worker.out, before, nodes.dst)
    assert not alive(worker.pid)
    assert criu_rpc.remove_network_lock(nodes.src, run_id=result.criu_run_id).removed
    assert_no_lock_tables(nodes)


def test_stop_and_copy_leave_running_keeps_the_source(
    nodes: Nodes, workdir: Path, worker: Worker, restored: Restored
) -> None:
    src, dst, logs = workdir / "src", workdir / "dst", workdir / "logs"
    with transfer.PageServer(dst, address=DST_IP, netns=nodes.dst, log_dir=logs) as server:
        transfer.dump_to_page_server(
            worker.pid, src, server.endpoint, netns=nodes.src, leave_running=True
        )
        server.wait(30)
    # The source was frozen, then resumed: running (not stopped/traced), counting, unlocked.
    # D is a running process in a short uninterruptible wait (a clean-clone CI run caught the
    # source in D right after the resume); the count going on below proves that it runs.
    assert process_state(worker.pid) in ("R", "S", "D")
    at_dump = worker.status()
    assert at_dump is not None
    wait_until(lambda: worker.status().counter > at_dump.counter + 5, "the source to count on")  # type: ignore[union-attr]
    assert_no_lock_tables(nodes)  # CRIU unlocks when it resumes the source

    transfer.copy_images(src, dst)
    pid = restored.add(criu_rpc.restore(dst, netns=nodes.dst, log_dir=logs).pid)
    path = worker.out / f"status-{pid_namespace(pid)}"
    wait_until(lambda: read_status(path) is not None, "the restored copy to write its status")
    copy = read_status(path)
    assert copy is not None and copy.counter <= at_dump.counter + 20
    wait_until(lambda: (read_status(path) or copy).passes > copy.passes, "a pass in the copy")
    assert (read_status(path) or copy).digest == EXPECTED
    # Rollback is "do nothing": the source never stopped; its data is intact too.
    source = worker.status()
    assert source is not None and alive(worker.pid)
    wait_until(lambda: worker.status().passes > source.passes, "a pass in the source")  # type: ignore[union-attr]
    assert worker.status().digest == EXPECTED  # type: ignore[union-attr]
    assert_no_lock_tables(nodes)


# --------------------------------------------------------------------------- post-copy


@pytest.mark.parametrize("leave_running", [True, False])
def test_post_copy_with_lazy_pages(
    nodes: Nodes, workdir: Path, worker: Worker, restored: Restored, leave_running: bool
) -> None:
    src, dst, logs = workdir / "src", workdir / "dst", workdir / "logs"
    with transfer.LazySource(
        worker.pid, src, netns=nodes.src, leave_running=leave_running
    ) as source:
        assert source.port > 0 and "status-ready" in source.notifications
        assert process_state(worker.pid) == "t"  # frozen (held by ptrace) while serving
        before = worker.status()
        assert before is not None
        transfer.copy_images(src, dst)
        with transfer.LazyDestination(dst, (SRC_IP, source.port), netns=nodes.dst,
                                      log_dir=logs) as dest:  # fmt: skip
            pid = restored.add(dest.restore().pid)
            assert not source.done  # runs at once, pages still coming from the source
            check_continues(pid, worker.out, before, nodes.dst)
            dest.wait_done(30)
        result = source.wait_done(30)
    assert result.pages_lazy > (MIB << 20) // 4096 // 2
    assert 0 < result.frozen_time <= result.total_time
    if leave_running:  # resumed after the transfer; still the way back
        assert alive(worker.pid) and process_state(worker.pid) != "t"
        wait_until(lambda: worker.status().counter > before.counter, "the source to count on")  # type: ignore[union-attr]
    else:
        wait_until(lambda: not alive(worker.pid), "CRIU to end the source")
        assert criu_rpc.remove_network_lock(nodes.src, run_id=result.criu_run_id).removed
    assert_no_lock_tables(nodes)


def test_post_copy_abort_resumes_the_source(
    nodes: Nodes, workdir: Path, worker: Worker, restored: Restored
) -> None:
    """A destination failure mid-transfer: abort the source first (it runs on, memory intact),
    then stop the destination and kill its copy. leave_running=False, so only abort saves
    the source here."""
    src, dst, logs = workdir / "src", workdir / "dst", workdir / "logs"
    source = transfer.LazySource(worker.pid, src, netns=nodes.src, leave_running=False)
    dest = None
    try:
        source.start()
        frozen = worker.status()
        assert frozen is not None
        transfer.copy_images(src, dst)
        dest = transfer.LazyDestination(dst, (SRC_IP, source.port), netns=nodes.dst,
                                        log_dir=logs).start()  # fmt: skip
        pid = restored.add(dest.restore().pid)
        assert not source.done  # 32 MiB are still on their way
        lock = source.abort()
        assert lock.removed and lock.table in criu_rpc.network_lock_table(lock.run_id), lock
        os.kill(pid, signal.SIGKILL)  # the copy must not run on without its source
    finally:
        source.stop()
        if dest is not None:
            dest.stop()
    assert alive(worker.pid) and process_state(worker.pid) != "t"
    wait_until(lambda: worker.status().counter > frozen.counter + 5, "the source to run again")  # type: ignore[union-attr]
    wait_until(lambda: worker.status().passes > frozen.passes + 1, "a full pass after abort")  # type: ignore[union-attr]
    assert worker.status().digest == EXPECTED  # type: ignore[union-attr]
    with pytest.raises(CheckpointError, match="aborted"):
        source.wait_done(1)
    assert_no_lock_tables(nodes)


def test_page_server_stop_without_dump(nodes: Nodes, workdir: Path) -> None:
    server = transfer.PageServer(workdir / "dst", address=DST_IP, port=0, netns=nodes.dst)
    server.start()
    pid = server.pid
    assert pid and alive(pid)
    server.stop()
    wait_until(lambda: not alive(pid), "the page server to end")
    server.stop()  # idempotent
