#!/usr/bin/env python3
"""Live migration against the raw CRIU CLI: downtime, frozen time and total time, in one run.

    sudo .venv/bin/python benchmarks/migration.py            # full run, 20 MiB..1 GiB, ~4-5 min
    sudo .venv/bin/python benchmarks/migration.py --quick    # 20 and 200 MiB, 1 sample, ~1 min
    sudo .venv/bin/python benchmarks/migration.py --strategies statesync   # one strategy only

Needs root (network namespaces, CRIU, a tmpfs mount). Prints the machine, one table of every
case (median of the samples and their min-max), the targets with met / not met, and writes
``benchmarks/results/migration.json`` (``--out`` to write elsewhere). Nothing is asserted:
a target that is not met is reported as such.

Cases
    A stage holding about 20 MiB, 200 MiB and 1 GiB (``--quick``: 20 and 200 MiB), times
    three ways of moving it, measured one size after the other in this order:

    * ``criu-cli``: the baseline. A plain Python process holding the same ballast (below) in
      its own PID namespace, started as the runtime starts stages (``unshare --pid --fork
      --kill-child setsid``, stdio on /dev/null) inside a network namespace this benchmark
      makes; ``criu dump -t PID -D DIR --network-lock nftables`` into a tmpfs, then ``criu
      restore -D DIR`` from it, both run through ``nsenter --net`` with the project's CRIU
      (``DPMIGRATE_CRIU``). The restoring criu stays the restored process's parent (no
      ``-d``): the process was started by ``unshare --kill-child`` and CRIU restores its
      parent-death signal, so a detached restore would kill it as soon as criu exits. CRIU
      runs with its default log level, as a user would run it. A fresh process per sample.
    * ``stop-and-copy`` and ``post-copy``: ``LocalCluster.migrate`` of the flow-table stage of
      ``benchmarks/apps/ballast`` (the flows pipeline, generator paced at 20,000 packets/s and
      endless) on a 3-node local cluster: node2 → node1 → node2 → ... under traffic, one
      sample per migration, a fresh cluster and app per size and strategy.

    * ``statesync``: the same, with the ``StateBallastTable`` stage, whose *explicit state*
      grows to N MiB during its first batches (16 keys of 64 KiB per batch); the benchmark
      waits until it is full (bounded), then watches the checker for ``IDLE_WINDOW_S`` with no
      migration (``idle_gap_s``: the longest input gap a stage holding that state causes on
      its own), then migrates. Nodes: 3 + one per migration; the table goes node2 → node4 →
      node5 → ..., each time to a node that never held it, so that every target starts empty
      and receives a snapshot (a node that held the stage resumes from its journal: points
      only). Every ring stays tcp, no peer changes transport. Its ballast is 0: the state is
      the memory that moves. No CRIU.

    After the statesync cases, in the same run: ``statesync_snapshot.measure()`` at the
    largest size — raw loopback TCP between two processes (``tcp_loopback_mb_s``) and the
    same snapshot between two plain processes, no cluster (``standalone_snapshot_mb_s``).

    The ballast (``benchmarks/apps/ballast/ballast.py``) is N MiB of a bytearray, every page
    written once so it is resident, not in the stage's explicit state: the stage's memory —
    what CRIU moves — grows by N MiB while its state stays a few KiB. The stage process holds
    ~20 MiB more than the baseline process (the runtime, msgpack, the rings), so the "20 MiB"
    stage is about 40 MiB of pages and the baseline about 30; ``pages`` in the table shows it.

Where the images go
    A tmpfs this benchmark mounts (and unmounts) holds the baseline's images and the cluster's
    state folder (``DPMIGRATE_STATE_DIR``), where the migration's images land: both sides
    write to memory, as the DESIGN's CRIU figures were measured.

What is measured (field names as in ``MigrationReport``, CRIU, QEMU)
    * ``downtime_s``: how long the service was not doing its work, as its user saw it. For a
      migration, the report's own figure: the longest input gap of the stage's downstream
      peer (the checker) during the migration — quiesce, dump, transfer, restore, reconnect
      and wake. For the baseline, the longest gap between two consecutive ``time.time()``
      stamps of the process itself, which rewrites a file (by rename: no growing file held
      open across the dump) every ~1 ms: dump, restore and resume.
    * ``frozen_time_s``: CRIU's ``frozen_time`` (stats-dump) — how long the tasks were
      frozen by CRIU. For post-copy that lasts until the destination pulled every page.
    * ``total_time_s``: the report's total (preflight to cleanup, post-copy's page pull
      included); for the baseline, the dump's wall time plus the restore's wall time up to
      the restored process's first new stamp (polled every 2 ms).
    * ``lost`` / ``duplicated``: the checker's counts during the migration (the report's);
      ``checker_lost`` / ``checker_duplicated``: its totals at the end of the run. The
      baseline moves no messages: 0 by construction.
    * statesync only: ``snapshot_mb_s`` (the target's snapshot: payload bytes over the time
      from its HELLO to synced, the report's), ``final_delta_bytes`` (what the source sent
      after the target had caught up, the report's), ``catch_up_s``, ``asleep_s``,
      ``cutover_gap_s`` (the checker's longest input gap overlapping quiesce..verify, counted
      from the quiesce's start: the cutover alone, where ``downtime_s`` also counts any gap
      while the target catches up) and ``idle_gap_s`` (above).

Targets (reported, not asserted)
    (1) stop-and-copy downtime ≤ 1.1 x the raw CRIU CLI's, at each size (medians);
    (2) post-copy downtime flat across sizes: the largest per-size median ≤ 1.25 x the
        smallest (our reading of "flat");
    (3) post-copy downtime ≤ 150 ms at every size (the largest per-size median);
    (4) lost = duplicated = 0 in every migration and in the checker's end totals;
    (5) statesync downtime ≤ 30 ms at every size (the largest per-size median);
    (6) statesync downtime flat: the largest per-size median ≤ 1.25 x the smallest;
    (7) statesync snapshot throughput (median of the migrations at the largest size) ≥ 0.6 x
        raw loopback TCP measured in the same run.

Cleanup
    Every process the benchmark starts is tracked by PID and start time and killed at the end
    of its sample (and on failure, SIGTERM or Ctrl-C); the baseline's network namespace (and
    so any ``CRIU-*`` nftables table in it), the clusters (``with LocalCluster`` and
    ``dpmigrate.runtime.cluster.clean``), the tmpfs and the temporary folder are removed.
    Every wait has a deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import statesync_snapshot  # beside this file
from rich.console import Console
from rich.table import Table

from dpmigrate import config
from dpmigrate.checkpoint.criu_binary import HARMLESS_LINES, CriuBinary
from dpmigrate.checkpoint.criu_rpc import read_stats, remove_network_lock, run_id
from dpmigrate.migrate import LocalCluster, MigrationReport
from dpmigrate.runtime.cluster import clean
from dpmigrate.runtime.manifest import App
from dpmigrate.runtime.multinode import MultiNodeRun

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "migration.json"
APP_DIR = HERE / "apps" / "ballast"
FLOWS_STAGES = HERE.parent / "examples" / "flows" / "stages.py"
STRATEGIES = ("criu-cli", "stop-and-copy", "post-copy", "statesync")
MIGRATION_STRATEGIES = STRATEGIES[1:]
MiB = 1 << 20
RATE = 20000  # packets/s from the generator
STAGE = "table"
#: The table starts on node2; migrations go to node1, node2, node1, ...
HOPS = ("node1", "node2")
#: Messages the table must take in before a migration (and after one, before the next).
WARMUP_MSGS = 5000
AGAIN_MSGS = 3000
#: Pause between migrations once traffic flows again, so that one's gap cannot overlap the
#: next's measuring window (the report looks 0.5 s past its end).
SETTLE_S = 1.0
FLOW_TIMEOUT_S = 60.0  # traffic must flow within this (the 1 GiB fill takes a few s)
STATE_FILL_TIMEOUT_S = 300.0  # statesync: the table's state must be full within this
IDLE_WINDOW_S = 6.0  # statesync: checker watched this long, no migration, once full
SNAPSHOT_REPEAT = 3  # raw loopback TCP vs snapshot, at the largest size
CLI_WARMUP_STAMPS = 300  # baseline: stamps written before the dump (~0.3 s of running)
CLI_TIMEOUT_S = 300.0  # one criu dump / restore
CLI_POLL_S = 0.002
WORKER_MARK = "dpmbm-worker"  # in the baseline worker's argv: PID identity check

TARGET_SC_VS_CLI = 1.1
TARGET_PC_FLAT = 1.25
TARGET_PC_MAX_S = 0.150
TARGET_SS_MAX_S = 0.030
TARGET_SS_FLAT = 1.25
TARGET_SNAPSHOT_VS_TCP = 0.6

DASH = "\u2013"  # en dash, for ranges in the tables

#: The baseline process: the same ballast as the stage, then a stamp every ~1 ms. It keeps
#: the largest gap between two consecutive stamps: the freeze, once it has been restored (a
#: fresh process per sample, so nothing earlier is bigger than scheduling noise). It ends on
#: its own after a while, in case everything else failed.
WORKER = r"""
import os, sys, time
app_dir, folder, mib = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path.insert(0, app_dir)
from ballast import fill
data = fill(mib, 7)
path, tmp = folder + "/stamp", folder + "/stamp.tmp"
n, max_gap, last = 0, 0.0, time.time()
deadline = time.monotonic() + 900
while time.monotonic() < deadline:
    n += 1
    now = time.time()
    max_gap, last = max(max_gap, now - last), now
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, f"{n} {now!r} {max_gap!r}\n".encode())
    os.close(fd)
    os.replace(tmp, path)
    time.sleep(0.001)
"""


@dataclasses.dataclass(frozen=True)
class Plan:
    mode: str
    sizes: tuple[int, ...]
    migrations: int  # per size and strategy (one cluster, one app run)
    cli_samples: int  # per size
    strategies: tuple[str, ...] = STRATEGIES


QUICK = Plan("quick", (20, 200), 1, 1)
FULL = Plan("full", (20, 200, 1024), 4, 4)


class BenchError(Exception):
    """A case failed; its row says why and the other cases still run."""


# --------------------------------------------------------------------------- scratch


def _start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat; None if gone or a zombie. With the PID it names one
    process for good: a PID reused meanwhile has another start time and is left alone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _alive(pid: int, start: int | None) -> bool:
    return start is not None and _start_time(pid) == start


class Scratch:
    """Everything the benchmark makes outside its own process, removed on exit whatever
    happened: a tmpfs on a temporary folder, network namespaces, processes (by PID and start
    time, never by name)."""

    def __init__(self, tmpfs_mib: int) -> None:
        self.tmpfs_mib = tmpfs_mib
        self.root = Path()
        self._mounted = False
        self._netns: list[str] = []
        self._popens: list[subprocess.Popen[bytes]] = []
        self._pids: list[tuple[int, int]] = []  # not our children: (pid, start time)

    def __enter__(self) -> Scratch:
        # short: the cluster's agents' unix socket paths live under it
        self.root = Path(tempfile.mkdtemp(prefix="dpmbm-"))
        try:
            _run(["mount", "-t", "tmpfs", "-o", f"size={self.tmpfs_mib}m,mode=0700", "tmpfs",
                  str(self.root)])  # fmt: skip
            self._mounted = True
        except BaseException:
            self.root.rmdir()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill_all()
        for name in reversed(self._netns):  # takes any CRIU-* nftables table with it
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30,
                           check=False)  # fmt: skip
        self._netns.clear()
        if self._mounted:
            result = subprocess.run(["umount", str(self.root)], capture_output=True, timeout=30,
                                    check=False)  # fmt: skip
            if result.returncode != 0:  # something still holds a file there: detach it
                subprocess.run(["umount", "-l", str(self.root)], capture_output=True, timeout=30,
                               check=False)  # fmt: skip
            self._mounted = False
        with contextlib.suppress(OSError):
            self.root.rmdir()

    def add_netns(self, name: str) -> str:
        """A network namespace of ours with loopback up (CRIU needs it); its /run/netns path."""
        if Path(f"/run/netns/{name}").exists():
            raise BenchError(f"network namespace {name} exists already (not ours)")
        _run(["ip", "netns", "add", name])
        self._netns.append(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"])
        return f"/run/netns/{name}"

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, close_fds=True, cwd="/", stdin=subprocess.DEVNULL, **kwargs)
        self._popens.append(proc)
        return proc

    def track(self, pid: int) -> None:
        """A process that is not our child (a restored copy); killed at the end if it lives."""
        start = _start_time(pid)
        if start is not None:
            self._pids.append((pid, start))

    def kill(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
        if proc in self._popens and proc.poll() is not None:
            self._popens.remove(proc)

    def kill_pids(self, timeout: float = 10.0) -> None:
        for pid, start in self._pids:
            if _alive(pid, start):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_alive(p, s) for p, s in self._pids):
            time.sleep(0.01)
        self._pids = [(p, s) for p, s in self._pids if _alive(p, s)]

    def kill_all(self) -> None:
        self.kill_pids()
        for proc in list(self._popens):
            self.kill(proc)


def _run(argv: list[str], timeout: float = 30.0) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise BenchError(f"`{' '.join(argv)}` failed: {result.stderr.strip()}")


def _wait(check: Callable[[], bool], what: str, timeout: float, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


# --------------------------------------------------------------------------- criu-cli


@dataclasses.dataclass
class Stamp:
    count: int
    time: float
    max_gap: float


def _read_stamp(path: Path) -> Stamp | None:
    try:
        fields = path.read_text().split()
    except OSError:
        return None
    if len(fields) != 3:
        return None
    return Stamp(int(fields[0]), float(fields[1]), float(fields[2]))


def _child(pid: int, timeout: float = 10.0) -> int:
    """The first child of ``pid`` (unshare's forked child: the worker)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(path.read_text().split()[0])
        time.sleep(0.01)
    raise BenchError(f"process {pid} started no child within {timeout:.0f} s")


def _criu_log_errors(log: Path) -> str:
    with contextlib.suppress(OSError):
        lines = [
            line.strip()
            for line in log.read_text(errors="replace").splitlines()
            if "Error" in line and not any(h in line for h in HARMLESS_LINES)
        ]
        return "; ".join(lines[-3:]) or "no error line in the log"
    return "no log"


def criu_cli_sample(scratch: Scratch, netns: str, mib: int, index: int) -> dict[str, Any]:
    """One dump + restore of a fresh baseline process holding ``mib`` MiB."""
    criu = config.load().criu
    work = scratch.root / f"cli-{mib}-{index}"
    images = work / "images"
    images.mkdir(parents=True)
    stamp_file, pidfile = work / "stamp", work / "restored.pid"
    worker = scratch.popen(
        ["nsenter", f"--net={netns}", "--", "unshare", "--pid", "--fork", "--kill-child",
         "setsid", sys.executable, "-c", WORKER, str(APP_DIR), str(work), str(mib), WORKER_MARK],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    restore: subprocess.Popen[bytes] | None = None
    try:
        inner = _child(worker.pid)  # python, PID 1 of its namespace
        _wait(lambda: (_read_stamp(stamp_file) or Stamp(0, 0, 0)).count >= CLI_WARMUP_STAMPS,
              "the baseline worker to fill its ballast and run", FLOW_TIMEOUT_S)  # fmt: skip

        started = time.monotonic()
        dump = subprocess.run(
            ["nsenter", f"--net={netns}", "--", criu, "dump", "-t", str(inner), "-D",
             str(images), "-o", "dump.log", "--network-lock", "nftables"],
            capture_output=True, timeout=CLI_TIMEOUT_S, check=False,
        )  # fmt: skip
        dump_wall = time.monotonic() - started
        if dump.returncode != 0:
            raise BenchError(f"criu dump failed: {_criu_log_errors(images / 'dump.log')}")
        worker.wait(10)  # the dump killed the worker; unshare follows its child
        frozen = _read_stamp(stamp_file)
        if frozen is None:
            raise BenchError("the baseline worker left no stamp")
        dumped = read_stats(str(images), "dump")
        # The lock table this dump leaves (the restore makes its own), by the dump's run id.
        lock = remove_network_lock(netns, run_id=run_id(str(images), str(images / "dump.log")))
        if not lock.ok:
            raise BenchError(str(lock))

        started = time.monotonic()
        with open(work / "restore.out", "wb") as out:
            restore = scratch.popen(
                ["nsenter", f"--net={netns}", "--", criu, "restore", "-D", str(images),
                 "-o", "restore.log", "--pidfile", str(pidfile)],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

        def resumed() -> bool:
            if restore is not None and restore.poll() is not None:
                why = _criu_log_errors(images / "restore.log")
                raise BenchError(f"criu restore ended ({restore.returncode}): {why}")
            return (_read_stamp(stamp_file) or frozen).count > frozen.count

        _wait(resumed, "the restored worker to run", CLI_TIMEOUT_S, poll=CLI_POLL_S)
        restore_wall = time.monotonic() - started
        with contextlib.suppress(OSError, ValueError):
            scratch.track(int(pidfile.read_text()))
        _wait(lambda: (_read_stamp(stamp_file) or frozen).count > frozen.count + 20,
              "the restored worker to run on", 30)  # fmt: skip
        after = _read_stamp(stamp_file) or frozen
        restored = read_stats(str(images), "restore")
        return {
            "downtime_s": round(after.max_gap, 4),
            "frozen_time_s": round(dumped.get("frozen_time", 0) / 1e6, 4),
            "total_time_s": round(dump_wall + restore_wall, 4),
            "dump_s": round(dump_wall, 4),
            "restore_s": round(restore_wall, 4),
            "criu_restore_time_s": round(restored.get("restore_time", 0) / 1e6, 4),
            "pages_written": int(dumped.get("pages_written", 0)),
            "lost": 0,
            "duplicated": 0,
        }
    finally:
        scratch.kill_pids()  # the restored copy first: its criu then reaps it and exits
        if restore is not None:
            scratch.kill(restore)
        scratch.kill(worker)
        shutil.rmtree(work, ignore_errors=True)


def run_criu_cli(scratch: Scratch, netns: str, mib: int, samples: int) -> list[dict[str, Any]]:
    out = []
    for index in range(samples):
        t0 = time.monotonic()
        try:
            sample = criu_cli_sample(scratch, netns, mib, index)
        except (BenchError, OSError, subprocess.SubprocessError) as err:
            sample = {"error": f"{type(err).__name__}: {err}"}
        out.append(sample)
        _progress("criu-cli", mib, index, sample, time.monotonic() - t0)
    return out


# --------------------------------------------------------------------------- migrations


def _make_app(scratch: Scratch, mib: int, strategy: str, plan: Plan) -> Path:
    """The ballast app, in a folder of its own on the tmpfs: ``ballast_mib = mib`` (process
    memory), or for statesync the StateBallastTable with ``state_mib = mib`` (explicit state)."""
    folder = scratch.root / f"app-{mib}"
    folder.mkdir(exist_ok=True)
    for name in ("stages.py", "ballast.py"):
        shutil.copyfile(APP_DIR / name, folder / name)
    shutil.copyfile(FLOWS_STAGES, folder / "flows.py")  # the pipeline BallastTable extends
    text = (APP_DIR / "app.toml").read_text()
    entry = 'entry = "stages:BallastTable"'
    if "ballast_mib = 20" not in text or f"rate = {RATE}" not in text or entry not in text:
        raise BenchError(f"{APP_DIR / 'app.toml'} no longer has {entry}, ballast_mib = 20, "
                         f"rate = {RATE}")  # fmt: skip
    if strategy == "statesync":
        text = text.replace(entry, 'entry = "stages:StateBallastTable"').replace(
            "ballast_mib = 20", f"ballast_mib = 0, state_mib = {mib}"
        )  # fmt: skip
    else:
        text = text.replace("ballast_mib = 20", f"ballast_mib = {mib}")
    (folder / "app.toml").write_text(text)
    return folder / "app.toml"


def _sample(report: MigrationReport) -> dict[str, Any]:
    r = report.as_dict()
    keys = ("downtime_s", "frozen_time_s", "total_time_s", "lost", "duplicated",
            "pages_written", "transferred_bytes", "source", "destination", "rolled_back",
            "error", "phases", "reconnect_after_placement_s")  # fmt: skip
    sample = {key: r[key] for key in keys}
    if report.strategy == "statesync":
        for key in ("asleep_s", "snapshot_bytes", "snapshot_mb_s", "catch_up_s",
                    "final_delta_bytes"):  # fmt: skip
            sample[key] = r[key]
    sample["state_intact"] = (
        r["state_digest_before"] is not None and r["state_digest_before"] == r["state_digest_after"]
    )
    if report.rolled_back:
        sample["error"] = f"rolled back: {report.error}"
    elif r["downtime_s"] is None or r["lost"] is None:
        sample["error"] = "the report has no downtime or no checker counts"
    return sample


def _cross_check(sample: dict[str, Any], report: MigrationReport, check: dict[str, Any]) -> None:
    """Second reading of the downtime, for information (``downtime_s`` stays the report's):
    the checker's longest input gap overlapping the migration, read from its status well
    after the migration (the report reads it 0.6 s after). ``downtime_suspect``: the report's
    downtime is shorter than the time the stage was certainly asleep (quiesce to the end of
    the restore, for stop-and-copy), which cannot be."""
    gaps = [
        end - start
        for start, end in check.get("input_gaps") or []
        if end >= report.started_at and start <= report.ended_at
    ]
    sample["downtime_checker_s"] = round(max(gaps), 4) if gaps else None
    times = report.phase_times
    if "quiesce" in times and "verify" in times:
        # the cutover alone: from the quiesce's start (a gap that began earlier, while the
        # target caught up, counts from there) to the input's resumption
        cut_from, cut_to = times["quiesce"][0], times["verify"][0]
        cut = [end - max(start, cut_from) for start, end in check.get("input_gaps") or []
               if end >= cut_from and start <= cut_to]  # fmt: skip
        sample["cutover_gap_s"] = round(max(cut), 4) if cut else 0.0
    sample["checker_restarts"] = check.get("restarts")
    asleep = sum(report.phases.get(p, 0.0) for p in ("quiesce", "transfer", "restore"))
    sample["asleep_at_least_s"] = round(asleep, 4)
    sample["downtime_suspect"] = (
        report.strategy == "stop-and-copy"
        and report.downtime_s is not None
        and report.downtime_s < asleep - 0.05
    )


def _fill_state(stage: Callable[[str], dict[str, Any]], extra: dict[str, Any], t0: float) -> None:
    """statesync: wait until the table's state is full (bounded), then watch the checker for
    IDLE_WINDOW_S with no migration; the fill time (since ``t0``, the app's start) and the
    longest idle gap go to ``extra``."""
    _wait(lambda: bool(stage(STAGE).get("metrics", {}).get("state_full")),
          "the table's state to fill", STATE_FILL_TIMEOUT_S, poll=0.1)  # fmt: skip
    extra["fill_s"] = round(time.monotonic() - t0, 2)
    extra["state_fill_mib"] = stage(STAGE).get("metrics", {}).get("state_fill_mib")
    watched_from = time.time()
    time.sleep(IDLE_WINDOW_S)
    watched_to = time.time()
    # a gap is recorded when input resumes: wait for the checker's next input (bounded)
    received = stage("check").get("metrics", {}).get("received", 0)
    _wait(lambda: stage("check").get("metrics", {}).get("received", 0) > received,
          "the checker's input to resume after the idle window", FLOW_TIMEOUT_S)  # fmt: skip
    gaps = [end - start for start, end in stage("check").get("input_gaps") or []
            if watched_from <= start <= watched_to]  # fmt: skip
    extra["idle_gap_s"] = round(max(gaps), 4) if gaps else 0.0
    extra["idle_gaps_over_100ms"] = sum(1 for g in gaps if g > 0.1)


def run_migrations(scratch: Scratch, mib: int, strategy: str, plan: Plan, run_no: int
                   ) -> tuple[list[dict[str, Any]], dict[str, Any]]:  # fmt: skip
    """One cluster, one app run, ``plan.migrations`` migrations of the table under traffic.
    Returns the samples and the checker's totals at the end (with, for statesync, the fill
    time and the idle gap)."""
    state_dir = str(scratch.root / f"s{run_no}")
    os.environ["DPMIGRATE_STATE_DIR"] = state_dir  # MultiNodeRun reads it through config
    app = App.load(_make_app(scratch, mib, strategy, plan))
    samples: list[dict[str, Any]] = []
    checker: dict[str, Any] = {}
    statesync = strategy == "statesync"
    # statesync: a fresh destination per migration (node4, node5, ...): each one a snapshot
    nodes = 3 + plan.migrations if statesync else 3
    try:
        with LocalCluster(nodes, state_dir=state_dir) as cluster:
            run = MultiNodeRun(app, cluster)

            def stage(name: str) -> dict[str, Any]:
                return next((s for s in run.status() if s["name"] == name), {})

            def flowing(at_least: int) -> None:
                _wait(lambda: stage(STAGE).get("msgs_in", 0) >= at_least,
                      f"{at_least} messages into the table", FLOW_TIMEOUT_S)  # fmt: skip

            started = time.monotonic()
            run.start()
            try:
                flowing(WARMUP_MSGS)
                if statesync:
                    _fill_state(stage, checker, started)
                for index in range(plan.migrations):
                    where = stage(STAGE).get("node")
                    if statesync:
                        to = f"node{4 + index}"
                    else:
                        to = HOPS[0] if where != HOPS[0] else HOPS[1]
                    t0 = time.monotonic()
                    report = cluster.migrate(STAGE, to=to, strategy=strategy)
                    sample = _sample(report)
                    took = time.monotonic() - t0
                    flowing(stage(STAGE).get("msgs_in", 0) + AGAIN_MSGS)
                    time.sleep(SETTLE_S)
                    _cross_check(sample, report, stage("check"))
                    samples.append(sample)
                    _progress(strategy, mib, index, sample, took)
                metrics = stage("check").get("metrics", {})
                checker.update({
                    "checker_received": metrics.get("received"),
                    "checker_lost": metrics.get("lost"),
                    "checker_duplicated": metrics.get("duplicated"),
                })  # fmt: skip
            finally:
                run.stop()
                run.cleanup()
    finally:
        clean(state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)
        shutil.rmtree(scratch.root / f"app-{mib}", ignore_errors=True)
    return samples, checker


# --------------------------------------------------------------------------- reporting


def _progress(strategy: str, mib: int, index: int, s: dict[str, Any], took: float) -> None:
    if s.get("error"):
        text = f"FAILED {s['error']}"
    else:
        text = (f"downtime {s['downtime_s']:.3f} s  frozen {s['frozen_time_s']:.3f} s  "
                f"total {s['total_time_s']:.3f} s  lost {s['lost']} dup {s['duplicated']}"
                + (f"  snapshot {s['snapshot_mb_s'] or 0:.0f} MB/s  cutover gap "
                   f"{s.get('cutover_gap_s', 0):.3f} s  final delta "
                   f"{(s['final_delta_bytes'] or 0) / 1024:.0f} KiB" if strategy == "statesync"
                   else "")
                + (f"  SUSPECT (asleep >= {s['asleep_at_least_s']:.3f} s, checker "
                   f"{s['downtime_checker_s']})" if s.get("downtime_suspect") else ""))  # fmt: skip
    print(f"  {strategy:<13} {mib:>5} MiB #{index + 1}  {text}  ({took:.1f} s)",
          file=sys.stderr, flush=True)  # fmt: skip


def _spread(row: dict[str, Any], key: str, good: list[dict[str, Any]]) -> None:
    """``key``'s median, min and max over the samples that have it (None if none has)."""
    xs = [float(s[key]) for s in good if s.get(key) is not None]
    row[key] = round(statistics.median(xs), 4) if xs else None
    row[f"{key}_min"] = round(min(xs), 4) if xs else None
    row[f"{key}_max"] = round(max(xs), 4) if xs else None


def summarise(strategy: str, mib: int, samples: list[dict[str, Any]],
              extra: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    good = [s for s in samples if not s.get("error")]
    row: dict[str, Any] = {"strategy": strategy, "state_mib": mib, "repeats": len(good)}
    for key in ("downtime_s", "frozen_time_s", "total_time_s"):
        _spread(row, key, good)
    if strategy == "statesync":
        for key in ("snapshot_mb_s", "final_delta_bytes", "cutover_gap_s", "asleep_s",
                    "catch_up_s"):  # fmt: skip
            _spread(row, key, good)
    row["lost"] = sum(int(s["lost"]) for s in good) if good else None
    row["duplicated"] = sum(int(s["duplicated"]) for s in good) if good else None
    pages = [int(s["pages_written"]) for s in good if s.get("pages_written")]
    row["pages_written"] = int(statistics.median(pages)) if pages else None
    if strategy != "criu-cli":
        row["state_intact"] = all(s.get("state_intact") for s in good) if good else None
        phases: dict[str, list[float]] = {}
        for s in good:
            for name, took in (s.get("phases") or {}).items():
                phases.setdefault(name, []).append(float(took))
        row["phases_median_s"] = {k: round(statistics.median(v), 4) for k, v in phases.items()}
        second = [s["downtime_checker_s"] for s in good if s.get("downtime_checker_s") is not None]
        row["downtime_checker_s"] = round(statistics.median(second), 4) if second else None
        row["downtime_suspect_samples"] = sum(1 for s in good if s.get("downtime_suspect"))
        pushed = [float(s["reconnect_after_placement_s"]) for s in good
                  if s.get("reconnect_after_placement_s") is not None]  # fmt: skip
        row["reconnect_after_placement_s"] = round(statistics.median(pushed), 4) if pushed else None
    else:
        row["phases_median_s"] = {
            k: round(statistics.median(float(s[k]) for s in good), 4)
            for k in ("dump_s", "restore_s")
            if good
        }
    row.update(extra or {})
    errors = [s["error"] for s in samples if s.get("error")]
    row["errors"] = errors
    row["samples"] = samples
    return row


def targets(results: list[dict[str, Any]], sizes: tuple[int, ...], ran: tuple[str, ...],
            snapshot: dict[str, Any] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """The targets of the strategies that ran (``--strategies``)."""

    def median(strategy: str, mib: int) -> float | None:
        for r in results:
            if (r["strategy"], r["state_mib"]) == (strategy, mib):
                return r["downtime_s"]
        return None

    out: list[dict[str, Any]] = []
    for mib in sizes:
        sc, cli = median("stop-and-copy", mib), median("criu-cli", mib)
        ratio = sc / cli if sc is not None and cli else None
        out.append({
            "name": f"stop-and-copy downtime vs raw CRIU CLI, {mib} MiB",
            "needs": ("stop-and-copy", "criu-cli"),
            "value": None if ratio is None else round(ratio, 3),
            "detail": f"{_s(sc)} vs {_s(cli)}",
            "required": f"<= {TARGET_SC_VS_CLI}x",
            "met": ratio is not None and ratio <= TARGET_SC_VS_CLI,
        })  # fmt: skip
    pc = [median("post-copy", mib) for mib in sizes]
    have = [x for x in pc if x is not None]
    complete = len(have) == len(sizes) and bool(have)
    flat = max(have) / min(have) if complete and min(have) > 0 else None
    out.append({
        "name": "post-copy downtime flat across sizes (largest / smallest median)",
        "needs": ("post-copy",),
        "value": None if flat is None else round(flat, 3),
        "detail": ", ".join(f"{m} MiB {_s(x)}" for m, x in zip(sizes, pc, strict=True)),
        "required": f"<= {TARGET_PC_FLAT}x",
        "met": flat is not None and flat <= TARGET_PC_FLAT,
    })  # fmt: skip
    worst = max(have) if complete else None
    out.append({
        "name": "post-copy downtime at every size (largest median)",
        "needs": ("post-copy",),
        "value": worst,
        "detail": _s(worst),
        "required": f"<= {TARGET_PC_MAX_S} s",
        "met": worst is not None and worst <= TARGET_PC_MAX_S,
    })  # fmt: skip
    ss = [median("statesync", mib) for mib in sizes]
    have = [x for x in ss if x is not None]
    complete = len(have) == len(sizes) and bool(have)
    worst = max(have) if complete else None
    out.append({
        "name": "statesync downtime at every size (largest median)",
        "needs": ("statesync",),
        "value": worst,
        "detail": ", ".join(f"{m} MiB {_s(x)}" for m, x in zip(sizes, ss, strict=True)),
        "required": f"<= {TARGET_SS_MAX_S} s",
        "met": worst is not None and worst <= TARGET_SS_MAX_S,
    })  # fmt: skip
    flat = max(have) / min(have) if complete and min(have) > 0 else None
    out.append({
        "name": "statesync downtime flat across sizes (largest / smallest median)",
        "needs": ("statesync",),
        "value": None if flat is None else round(flat, 3),
        "detail": ", ".join(f"{m} MiB {_s(x)}" for m, x in zip(sizes, ss, strict=True)),
        "required": f"<= {TARGET_SS_FLAT}x",
        "met": flat is not None and flat <= TARGET_SS_FLAT,
    })  # fmt: skip
    snap, tcp = (snapshot or {}).get("snapshot_mb_per_s"), (snapshot or {}).get("tcp_loopback_mb_s")
    ratio = snap / tcp if snap is not None and tcp else None
    out.append({
        "name": f"statesync snapshot vs raw loopback TCP, {max(sizes)} MiB (medians)",
        "needs": ("statesync",),
        "value": None if ratio is None else round(ratio, 3),
        "detail": "-" if ratio is None else f"{snap:.0f} vs {tcp:.0f} MB/s",
        "required": f">= {TARGET_SNAPSHOT_VS_TCP}x",
        "met": ratio is not None and ratio >= TARGET_SNAPSHOT_VS_TCP,
    })  # fmt: skip
    bad, missing = 0, 0
    for r in results:
        if r["strategy"] == "criu-cli":
            continue
        for s in r["samples"]:
            if s.get("lost") is None or s.get("duplicated") is None:
                missing += 1
            else:
                bad += int(s["lost"]) + int(s["duplicated"])
        for key in ("checker_lost", "checker_duplicated"):
            if r.get(key) is None:
                missing += 1
            else:
                bad += int(r[key])
    out.append({
        "name": "lost = duplicated = 0 in every migration and every run's checker totals",
        "needs": (),
        "value": bad,
        "detail": f"{bad} lost+duplicated" + (f", {missing} counts missing" if missing else ""),
        "required": "0",
        "met": bad == 0 and missing == 0,
    })  # fmt: skip
    return [t for t in out if set(t.pop("needs")) <= set(ran)]


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f} s"


def machine_info(plan: Plan) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError):
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    criu = config.load().criu
    try:
        criu_version = CriuBinary(criu).version_text
    except Exception as err:  # reported, not fatal: the cases then fail with the reason
        criu_version = f"unknown ({err})"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": mem_gib,
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "criu": criu,
        "criu_version": criu_version,
        "run": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "mode": plan.mode,
            "sizes_mib": list(plan.sizes),
            "migrations_per_case": plan.migrations,
            "criu_cli_samples": plan.cli_samples,
            "strategies": list(plan.strategies),
            "statesync_hops": "node2 -> node4 -> node5 -> ... (a fresh target each time)",
            "generator_rate": RATE,
            "images_on": "tmpfs (mounted by the benchmark)",
            "downtime": "migration: longest input gap of the downstream checker (report); "
            "criu-cli: longest gap between the process's own ~1 ms time.time() stamps",
            "frozen_time": "CRIU stats-dump frozen_time",
            "total_time": "migration: report total_time; criu-cli: dump wall + restore wall "
            "until the first new stamp",
        },
    }


def render(report: dict[str, Any]) -> None:
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    m = report["machine"]
    console.print(
        f"[bold]dpmigrate migration benchmark[/] ({m['run']['mode']}; median of the samples, "
        f"range = min{DASH}max)\nmachine: {m['cpu']}, {m['cores']} cores "
        f"({m['cores_usable']} usable), {m['memory_gib']} GiB, Linux {m['kernel']}, "
        f"CRIU {m['criu_version']}, {m['python']}",
        highlight=False,
    )
    table = Table(title="downtime, frozen time and total time by state size (seconds)")
    for col, just in (
        ("state", "right"), ("strategy", "left"), ("n", "right"), ("downtime", "right"),
        ("range", "right"), ("frozen", "right"), ("range", "right"), ("total", "right"),
        ("range", "right"), ("pages", "right"), ("lost", "right"), ("dup", "right"),
        ("reconnect", "right"),
    ):  # fmt: skip
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    last = None
    for r in report["results"]:
        if last is not None and r["state_mib"] != last:
            table.add_section()
        last = r["state_mib"]
        size = f"{r['state_mib']} MiB" if r["state_mib"] < 1024 else f"{r['state_mib'] // 1024} GiB"
        if r["downtime_s"] is None:
            table.add_row(size, r["strategy"], "0", "[red]failed[/]")
            continue

        def cell(key: str, row: dict[str, Any] = r) -> tuple[str, str]:
            return f"{row[key]:.3f}", f"{row[key + '_min']:.3f}{DASH}{row[key + '_max']:.3f}"

        table.add_row(
            size, r["strategy"], str(r["repeats"]), *cell("downtime_s"), *cell("frozen_time_s"),
            *cell("total_time_s"), f"{r['pages_written'] or 0:,}", str(r["lost"]),
            str(r["duplicated"]),
            "" if r.get("reconnect_after_placement_s") is None
            else f"{r['reconnect_after_placement_s'] * 1000:.1f} ms",
        )  # fmt: skip
    console.print(table)
    order = ("dump_s", "restore_s", "preflight", "prepare", "quiesce", "transfer", "restore",
             "reconnect", "verify", "cleanup")  # fmt: skip
    phases = Table(title="where the time goes: median per phase (seconds; criu-cli: dump, "
                   "restore until running; downtime spans quiesce..verify)")  # fmt: skip
    phases.add_column("state", justify="right")
    phases.add_column("strategy")
    for name in order:
        label = f"cli {name.removesuffix('_s')}" if name.endswith("_s") else name
        phases.add_column(label, justify="right")
    for r in report["results"]:
        got = r.get("phases_median_s") or {}
        if not got:
            continue
        cells = [f"{got[n]:.3f}" if n in got else "" for n in order]
        phases.add_row(f"{r['state_mib']} MiB", r["strategy"], *cells)
    console.print(phases)
    render_statesync(console, report)
    for r in report["results"]:
        for i, smp in enumerate(r["samples"], 1):
            if smp.get("downtime_suspect"):
                console.print(
                    f"[yellow]suspect[/] {r['strategy']} {r['state_mib']} MiB #{i}: the report's "
                    f"downtime {smp['downtime_s']:.3f} s < {smp['asleep_at_least_s']:.3f} s the "
                    f"stage was asleep (quiesce..restore); checker's gaps read later: "
                    f"{smp['downtime_checker_s']} s",
                    highlight=False,
                )
        for err in r["errors"]:
            console.print(f"[red]failed[/] {r['strategy']} {r['state_mib']} MiB: {err}",
                          highlight=False)  # fmt: skip
    tgt = Table(title="targets (same run)")
    for col in ("target", "value", "detail", "required", "met"):
        tgt.add_column(col)
    for t in report["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:g}"
        met = "[green]met[/]" if t["met"] else "[red]not met[/]"
        tgt.add_row(t["name"], value, t["detail"], t["required"], met)
    console.print(tgt)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:,.0f}"


def _range(row: dict[str, Any], key: str, scale: float = 1000) -> str:
    lo, hi = row.get(f"{key}_min"), row.get(f"{key}_max")
    return "-" if lo is None or hi is None else f"{lo * scale:,.0f}{DASH}{hi * scale:,.0f}"


def render_statesync(console: Console, report: dict[str, Any]) -> None:
    rows = [r for r in report["results"] if r["strategy"] == "statesync" and r["repeats"]]
    if not rows:
        return
    table = Table(title="statesync: where the downtime comes from (ms unless said; median, "
                  f"range = min{DASH}max)")  # fmt: skip
    for col in ("state", "n", "downtime", "range", "cutover gap", "asleep", "idle gap",
                "snapshot MB/s", "range", "catch-up s", "final delta KiB", "reconnect",
                "fill s"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        rng = functools.partial(_range, r)
        table.add_row(
            f"{r['state_mib']} MiB", str(r["repeats"]), _ms(r["downtime_s"]), rng("downtime_s"),
            _ms(r["cutover_gap_s"]), _ms(r["asleep_s"]), _ms(r.get("idle_gap_s")),
            "-" if r["snapshot_mb_s"] is None else f"{r['snapshot_mb_s']:,.0f}",
            rng("snapshot_mb_s", 1), "-" if r["catch_up_s"] is None else f"{r['catch_up_s']:.2f}",
            "-" if r["final_delta_bytes"] is None else f"{r['final_delta_bytes'] / 1024:,.0f}",
            _ms(r.get("reconnect_after_placement_s")), str(r.get("fill_s", "-")),
        )  # fmt: skip
    console.print(table)
    snap = report.get("snapshot_vs_tcp")
    if snap:
        console.print(
            f"same run, {snap['size_bytes'] >> 20} MiB: statesync snapshot in the cluster "
            f"{report['snapshot_mb_per_s']} MB/s (median of the migrations); raw loopback TCP "
            f"{snap['tcp_loopback_mb_s']} MB/s; the same snapshot between two plain processes "
            f"{snap['snapshot_mb_per_s']} MB/s; raw TCP keeping every 64 KiB "
            f"{snap['tcp_keep_floor_mb_s']} MB/s (medians of {snap['repeat']})",
            highlight=False,
        )


# --------------------------------------------------------------------------- main


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through every finally: processes, netns, mounts


def _cases(plan: Plan) -> Iterator[tuple[int, str]]:
    for mib in plan.sizes:
        for strategy in STRATEGIES:
            if strategy in plan.strategies:
                yield mib, strategy


def snapshot_vs_tcp(plan: Plan, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Top-level numbers: the statesync migrations' snapshot throughput at the largest size
    (median) and, measured now, raw loopback TCP and a snapshot between plain processes."""
    largest = max(plan.sizes)
    rates = [float(s["snapshot_mb_s"]) for r in results
             if r["strategy"] == "statesync" and r["state_mib"] == largest
             for s in r["samples"] if not s.get("error") and s.get("snapshot_mb_s")]  # fmt: skip
    print(f"  raw loopback TCP vs snapshot, {largest} MiB, {SNAPSHOT_REPEAT} repeats",
          file=sys.stderr, flush=True)  # fmt: skip
    try:
        measured = statesync_snapshot.measure(largest * MiB, SNAPSHOT_REPEAT)
    except Exception as err:  # reported: the targets then say not met
        measured = {"error": f"{type(err).__name__}: {err}"}
    return {
        "snapshot_mb_per_s": round(statistics.median(rates), 1) if rates else None,
        "snapshot_mb_per_s_range": [round(min(rates), 1), round(max(rates), 1)] if rates else None,
        "tcp_loopback_mb_s": measured.get("tcp_loopback_mb_s"),
        "snapshot_vs_tcp": measured,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 and 200 MiB, one sample each")
    parser.add_argument("--samples", type=int, help="migrations / CRIU CLI runs per case")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON file ({RESULTS})")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help=f"comma-separated subset of {','.join(STRATEGIES)} (all)")  # fmt: skip
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.samples:
        n = max(1, min(20, args.samples))
        plan = dataclasses.replace(plan, migrations=n, cli_samples=n)
    chosen = tuple(x.strip() for x in args.strategies.split(",") if x.strip())
    unknown = sorted(set(chosen) - set(STRATEGIES))
    if unknown or not chosen:
        parser.error(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    plan = dataclasses.replace(plan, strategies=chosen)
    if os.geteuid() != 0:
        print("needs root (network namespaces, CRIU, a tmpfs mount)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.pop("DPMIGRATE_TOKEN", None)  # each cluster makes its own
    started = time.monotonic()
    load_before = [round(x, 2) for x in os.getloadavg()]
    results: list[dict[str, Any]] = []
    # room for the largest images twice over (baseline, or a migration's) plus logs; for
    # statesync, every node that held the stage keeps its journal (a snapshot and records)
    tmpfs_mib = 2 * max(plan.sizes) + 1024
    if "statesync" in plan.strategies:
        tmpfs_mib = max(tmpfs_mib, 2 * (plan.migrations + 1) * max(plan.sizes) + 1024)
    try:
        with Scratch(tmpfs_mib) as scratch:
            netns = scratch.add_netns(f"dpmbm-{os.getpid()}")
            run_no = 0
            for mib, strategy in _cases(plan):
                if strategy == "criu-cli":
                    samples = run_criu_cli(scratch, netns, mib, plan.cli_samples)
                    results.append(summarise(strategy, mib, samples))
                    continue
                run_no += 1
                try:
                    samples, checker = run_migrations(scratch, mib, strategy, plan, run_no)
                except Exception as err:  # the case fails; the others still run
                    samples, checker = [{"error": f"{type(err).__name__}: {err}"}], {}
                    _progress(strategy, mib, 0, samples[0], 0.0)
                results.append(summarise(strategy, mib, samples, checker))
        top = snapshot_vs_tcp(plan, results) if "statesync" in plan.strategies else {}
        report = {
            "machine": machine_info(plan),
            **{k: v for k, v in top.items() if k != "snapshot_vs_tcp"},
            "results": results,
            "snapshot_vs_tcp": top.get("snapshot_vs_tcp"),
            "targets": targets(results, plan.sizes, plan.strategies, top),
        }
        report["machine"]["run"]["seconds"] = round(time.monotonic() - started, 1)
        # other work on the machine distorts every figure: say how busy it was
        report["machine"]["run"]["loadavg_before"] = load_before
        report["machine"]["run"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    except KeyboardInterrupt:
        print("interrupted: processes killed, namespaces, clusters and the tmpfs removed",
              file=sys.stderr)  # fmt: skip
        return 130
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp_out, args.out)
    render(report)
    print(f"wrote {args.out} in {report['machine']['run']['seconds']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
