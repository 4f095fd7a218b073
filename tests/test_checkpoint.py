"""Checkpoint core on real CRIU: bundles of a plain process tree, verify, restore, inspect.

The test process counts in a loop and writes its counter to a file named after its PID
namespace, so the original and a restored copy (which CRIU puts in a new PID namespace) each
write their own file. It is started the way the supervisor starts stages: ``unshare --pid
--fork --kill-child setsid``, stdio on /dev/null (a file appended to after the dump would fail
the restore with "bad size").
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import Restored, alive, pid_namespace, require, wait_until

from dpmigrate.checkpoint import criu_rpc
from dpmigrate.errors import CheckpointError

COUNTER = r"""
import os, sys, time
folder = sys.argv[1]
n = 0
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    n += 1
    ns = os.readlink("/proc/self/ns/pid")[5:-1]
    fd = os.open(f"{folder}/counter-{ns}", os.O_WRONLY | os.O_CREAT, 0o600)
    os.pwrite(fd, b"%020d\n" % n, 0)
    os.close(fd)
    time.sleep(0.005)
"""


class Counter:
    """One counting process tree: ``unshare`` (ours) and the python inside (PID 1 there)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--kill-child", "setsid", sys.executable, "-c",
             COUNTER, str(folder)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=True, cwd="/",
        )  # fmt: skip
        self.pid = self._inner_pid()
        self.file = self.folder / f"counter-{pid_namespace(self.pid)}"
        _wait_for(lambda: self.file.exists() and read(self.file) > 0, "the counter to start")

    def _inner_pid(self) -> int:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                children = path.read_text().split()
                if children and _comm(int(children[0])).startswith("python"):
                    return int(children[0])
            time.sleep(0.01)
        raise AssertionError("the counter process did not start")

    def alive(self) -> bool:
        return alive(self.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # --kill-child takes the python with it
        self.proc.wait(10)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def read(path: Path) -> int:
    try:
        text = path.read_text().strip()
    except OSError:
        return 0
    return int(text) if text else 0


def _wait_for(check: Callable[[], object], what: str) -> None:
    wait_until(check, what, timeout=5.0, interval=0.02)


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The checkpoint commands under the main group's error handling."""
    return subprocess.run(
        [sys.executable, "-m", "dpmigrate.cli_checkpoint", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


@pytest.fixture
def workdir() -> Iterator[Path]:
    require("root", "criu")
    folder = Path(tempfile.mkdtemp(prefix="dpmigrate-test-ckpt-"))
    before = set(criu_rpc.network_lock_tables())
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        for table in set(criu_rpc.network_lock_tables()) - before:  # only what the test made
            family, name = table.split()
            subprocess.run(["nft", "delete", "table", family, name], check=False, timeout=10)


@pytest.fixture
def counter(workdir: Path) -> Iterator[Counter]:
    (workdir / "run").mkdir()
    proc = Counter(workdir / "run")
    try:
        yield proc
    finally:
        proc.stop()


def _restored_file(counter: Counter, pid: int) -> Path:
    return counter.folder / f"counter-{pid_namespace(pid)}"


def test_leave_running_then_restore_beside_the_original(
    counter: Counter, workdir: Path, restored: Restored
) -> None:
    out = workdir / "bundle"
    before = read(counter.file)
    done = cli("checkpoint", "--pid", str(counter.pid), "--out", str(out), "--leave-running",
               "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["dump"]["frozen_time"] > 0 and report["dump"]["pages_written"] > 0
    assert counter.alive()
    after_dump = read(counter.file)
    _wait_for(lambda: read(counter.file) > after_dump, "the original to go on counting")
    assert not list(workdir.glob(".bundle.partial-*"))
    assert oct(out.stat().st_mode & 0o777) == "0o700"

    done = cli("restore", str(out), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    restored.add(result["pid"], result["keeper_pid"])
    assert result["pid"] != counter.pid and counter.alive()
    copy = _restored_file(counter, result["pid"])
    assert copy != counter.file
    _wait_for(lambda: read(copy) > 0, "the restored copy to write its counter")
    first = read(copy)
    # It starts from the checkpointed value: not below what was counted before the dump, not
    # above what the original had reached when the dump returned.
    assert before <= first <= after_dump + 50
    _wait_for(lambda: read(copy) > first + 10, "the restored copy to count on")
    assert alive(result["pid"]) and counter.alive()
    assert cli("verify", str(out)).returncode == 0  # the restore left the bundle intact


def test_checkpoint_stops_the_process_and_restore_continues_it(
    counter: Counter, workdir: Path, restored: Restored
) -> None:
    out = workdir / "bundle"
    done = cli("checkpoint", "--pid", str(counter.pid), "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    _wait_for(lambda: not counter.alive(), "the dumped process to end")
    last = read(counter.file)

    done = cli("restore", str(out), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    restored.add(result["pid"], result["keeper_pid"])
    assert result["restore_time"] > 0
    copy = _restored_file(counter, result["pid"])
    _wait_for(lambda: read(copy) > last + 10, "the restored process to count on")
    assert read(copy) > last


@pytest.fixture
def bundle_copy(counter: Counter, workdir: Path) -> Path:
    out = workdir / "good"
    done = cli("checkpoint", "--pid", str(counter.pid), "--out", str(out), "--leave-running",
               "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out


def _damage(bundle: Path, how: str) -> str:
    """Damage one file of the bundle; returns its name as the manifest lists it."""
    pages = sorted((bundle / "images").glob("pages-*.img"))[0]
    name = f"images/{pages.name}"
    if how == "flip":
        data = bytearray(pages.read_bytes())
        data[len(data) // 2] ^= 0x01
        pages.write_bytes(bytes(data))
    elif how == "missing":
        name = "images/core-1.img"
        (bundle / name).unlink()
    elif how == "truncate":
        with open(pages, "r+b") as f:
            f.truncate(pages.stat().st_size // 2)
    return name


@pytest.mark.parametrize("how", ["flip", "missing", "truncate"])
def test_damaged_bundle_is_refused(
    bundle_copy: Path, how: str, counter: Counter, restored: Restored
) -> None:
    name = _damage(bundle_copy, how)
    files_before = sorted(p.name for p in bundle_copy.rglob("*"))
    expected = {"flip": "checksum mismatch", "missing": "missing", "truncate": "truncated"}[how]

    done = cli("verify", str(bundle_copy))
    assert done.returncode == 1
    assert any(name in line and expected in line for line in done.stdout.splitlines()), done.stdout

    children = set(_children_of_init_named("python"))
    done = cli("restore", str(bundle_copy))
    assert done.returncode == 1
    assert done.stderr.startswith("dpmigrate: error:") and name in done.stderr
    assert expected in done.stderr and "Nothing was restored" in done.stderr
    assert sorted(p.name for p in bundle_copy.rglob("*")) == files_before  # nothing deleted
    new = set(_children_of_init_named("python")) - children
    restored.add(*new)
    assert not new, "a refused bundle must not restore anything"


def _children_of_init_named(prefix: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _comm(int(entry)).startswith(prefix):
            found.append(int(entry))
    return found


def test_inspect_decodes_tree_and_memory(bundle_copy: Path) -> None:
    done = cli("inspect", str(bundle_copy), "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["verify"]["ok"]
    names = {p["name"] for p in data["processes"]}
    assert any(name.startswith("python") for name in names)
    root = data["processes"][0]
    assert root["pid"] == 1 and root["threads"] == [1]
    assert data["memory"]["anon_private"]["dumped_bytes"] > 0
    assert data["memory_total"]["mapped_bytes"] > 0
    assert data["memory_total"]["dumped_bytes"] == data["memory_total"]["pages_files_bytes"]
    assert {f["path"] for f in data["files"] if f["type"] == "file"} >= {"/dev/null"}
    assert not data["errors"]
    text = cli("inspect", str(bundle_copy))
    assert text.returncode == 0 and "anon_private" in text.stdout


def test_bundle_keeps_state_and_rings(counter: Counter, workdir: Path) -> None:
    import msgpack

    from dpmigrate.checkpoint import bundle
    from dpmigrate.checkpoint.inspect import inspect

    state = msgpack.packb([7, {"a": 1, "b": 2}])
    made, result = bundle.create(workdir / "b", counter.pid, leave_running=True, state=state,
                                 rings={"in": {"next_expected": 42}}, stage="s1", node="n1")  # fmt: skip
    loaded = bundle.load(made.path)
    assert loaded.state == state and loaded.rings == {"in": {"next_expected": 42}}
    assert loaded.stage == "s1" and loaded.node == "n1" and loaded.root_pid == counter.pid
    assert result.frozen_time > 0
    data = inspect(made.path)
    assert data["state"] == {"bytes": len(state), "decodes": True, "version": 7, "keys": 2}
    assert data["rings"] == {"in": {"next_expected": 42}}
    refused = cli("restore", str(made.path))
    assert refused.returncode == 1 and "stage 's1'" in refused.stderr


def test_extra_file_and_incompatible_host(bundle_copy: Path) -> None:
    from dpmigrate.checkpoint import bundle

    (bundle_copy / "images" / "stray.img").write_bytes(b"x")
    report = bundle.verify(bundle_copy)
    assert [str(p) for p in report.problems] == [
        "images/stray.img: extra file, not listed in the manifest"
    ]
    (bundle_copy / "images" / "stray.img").unlink()
    here = bundle.HostFacts.local()
    old = bundle.HostFacts("4.1", here.cpu_flags[1:], "5.10.0", here.arch)
    report = bundle.verify(bundle_copy, host=old)
    kinds = sorted(p.kind for p in report.problems)
    assert kinds == ["incompatible", "incompatible"]
    assert here.cpu_flags[0] in str(report.problems[1]) or here.cpu_flags[0] in str(
        report.problems[0]
    )
    assert report.warnings and "5.10.0" in report.warnings[0]


def test_criu_failure_quotes_the_log(workdir: Path) -> None:
    images = workdir / "images"
    images.mkdir()
    with pytest.raises(CheckpointError) as caught:
        criu_rpc.restore(images)
    err = caught.value
    assert err.log_file == str(images / "restore.log") and os.path.exists(err.log_file)
    assert "Error" in str(err) and err.log_file in str(err)
    assert "RLIMIT_NOFILE" not in str(err)

    dead = _dead_pid()
    done = cli("checkpoint", "--pid", str(dead), "--out", str(workdir / "b"))
    assert done.returncode == 1
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("dpmigrate: error: criu dump failed") and "Error" in line
    kept = workdir / "b.dump-failed.log"
    assert kept.exists() and str(kept) in line
    assert not (workdir / "b").exists() and not list(workdir.glob(".b.partial-*"))


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid
