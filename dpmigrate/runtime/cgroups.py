"""Per-stage resource limits in control groups: one interface, a v1 and a v2 backend.

A stage with ``resources`` in its manifest runs in a control group of its own, created by the
process that starts it (the node agent, or the CLI of a multi-process run) and moved into
before the stage runs its code (the supervisor's spawn writes the child's PID into the group
between fork and exec; a restored stage is moved in by the agent before it is woken). A
stage without ``resources`` gets no group: it runs exactly as before.

Limits, named as users know them (Docker's ``run`` flags unless said otherwise):

=============  ==========================  =================================  ================
key            means                       v1 file                            v2 file
=============  ==========================  =================================  ================
``cpus``       CPUs it may run on          cpuset.cpus (+ cpuset.mems)        cpuset.cpus
               (docker ``--cpuset-cpus``)
``cpu_quota``  CPUs' worth of time, e.g.   cpu.cfs_quota_us / cfs_period_us   cpu.max
               0.5 (docker ``--cpus``)
``memory``     bytes, "256M" (docker       memory.limit_in_bytes, and         memory.max, and
               ``--memory``)               memory.memsw.limit_in_bytes        memory.swap.max 0
``io_weight``  10..1000 (systemd           blkio.weight, else                 io.weight
               ``IOWeight``, default 100)  blkio.bfq.weight
``pids``       tasks (docker               pids.max                           pids.max
               ``--pids-limit``)
=============  ==========================  =================================  ================

``memory`` also caps swap (memsw / memory.swap.max = 0), unlike Docker's default of as much
swap again: a stage over its limit must be killed and restarted from its journal (the OOM
path, which loses nothing) rather than slowed down by swapping while its peers wait.

Where groups live: ``<the creating process's own group>/dpmigrate/<scope>.<stage>`` in each
v1 hierarchy (a process manages only the subtree below its own group, as systemd delegates;
the stages stay inside whatever memory accounting the agent itself is under), and
``<unified root>/dpmigrate/<scope>.<stage>`` on v2 (the no-internal-process rule forbids
child groups with controllers below a group that holds processes, such as the agent's).
``scope`` names the run and the node (``<run>.<node>``): a local cluster's nodes share one
host's cgroup tree, and during a migration the frozen source and the restored copy must be
charged to different groups.

Every group (and the ``dpmigrate`` parent, when this process made it) is written to a record
file *before* it is created; :func:`remove_recorded` removes exactly what a record lists —
never a group found by name — first killing what still runs in it (the stage's own group:
nothing else is ever put there).

A stage restored by CRIU is *born* in its group: the agent makes the destination's group
before the restore, the restore's ``criu swrk`` is written into the group's memory hierarchy
(the whole group on v2) before it gets its request, and CRIU is told to leave cgroups alone
(``manage_cgroups`` off, mode IGNORE), so the tree it forks starts there and every page it
restores is charged there (``checkpoint.criu_rpc.restore(cgroup_procs=...)``,
``migrate.stage_checkpoint.restore_group``). Measured after a stop-and-copy of the flows
table: 14.5 MB of 14.5 MB anonymous memory charged to the destination's group (1.2 MB when
the agent moved the task in after the restore). The agent then moves it into the group's
other hierarchies before it is woken (``Supervisor.adopt``): CRIU's own work is held to the
stage's memory limit, not its CPU quota or task limit. Why not CRIU's own cgroup handling
(``--manage-cgroups``): CRIU records the *source's* group paths in the images and, in its
default ``soft`` mode, restores the task into those paths (measured here: "cgroup dir
pids/dpmigrate/... already exist, Skip restoring properties", and the restored pages charged
to the source's group) — on one host that is the frozen source's group, on another it would
create that path, a group nobody recorded; ``--cgroup-root`` only moves the prefix, and the
node is part of a group's name, so it cannot name the destination's group.

Backends are chosen by what the host has (:func:`detect`): v2 when the unified hierarchy has
the memory controller, else v1 when the memory and cpu hierarchies are mounted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from dpmigrate import atomic
from dpmigrate.errors import ConfigError, EnvironmentProblem

#: The parent of every group this project creates (below the base, see the module docstring).
PARENT = "dpmigrate"
#: The record file a node agent keeps in its own folder (``cluster down`` reads it too).
RECORD = "cgroups.json"
#: CFS period used for ``cpu_quota`` (the kernel's default, and Docker's).
CFS_PERIOD_US = 100_000
#: Bounds: a quota below 0.01 CPU starves a stage's own heartbeat; io weight as systemd.
MIN_CPU_QUOTA = 0.01
IO_WEIGHT_RANGE = (10, 1000)
MAX_PIDS = 1 << 22
#: The smallest memory limit: a Python stage needs ~20 MiB before its first batch.
MIN_MEMORY = 8 << 20
_SIZE_RE = re.compile(r"([0-9]{1,20})([KMGT]?)(i?B)?", re.IGNORECASE)
_CPUS_RE = re.compile(r"[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_KEYS = ("cpus", "cpu_quota", "memory", "io_weight", "pids")


@dataclasses.dataclass(frozen=True)
class Limits:
    """A stage's limits; ``None`` means not limited. Built by :func:`parse_limits`."""

    cpus: str | None = None
    cpu_quota: float | None = None
    memory: int | None = None
    io_weight: int | None = None
    pids: int | None = None

    @property
    def empty(self) -> bool:
        return all(getattr(self, key) is None for key in _KEYS)

    def as_dict(self) -> dict[str, Any]:
        """Only the limits that are set (what a manifest, status and report show)."""
        return {key: getattr(self, key) for key in _KEYS if getattr(self, key) is not None}


def parse_size(value: Any, where: str) -> int:
    """``"256M"``, ``"1G"``, ``"512MiB"`` or an integer of bytes, as Docker's ``--memory``
    reads it (binary units)."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and (match := _SIZE_RE.fullmatch(value.strip())):
        number = int(match.group(1)) * _UNITS[match.group(2).upper()]
    else:
        raise ConfigError(
            f"{where}: must be a size such as \"256M\" or \"1G\" (K, M, G, T: binary units) or "
            f"a number of bytes, got {ascii(value)[:80]}"
        )
    if not MIN_MEMORY <= number <= 1 << 50:
        raise ConfigError(
            f"{where}: {ascii(value)[:40]} is out of range: at least {MIN_MEMORY >> 20}M (a "
            "stage needs that much to start) and at most 1P"
        )
    return number


def parse_limits(raw: Any, where: str) -> Limits:
    """A manifest's ``resources`` table as :class:`Limits`; one ConfigError per problem,
    naming the key and what would be accepted."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table such as {{ cpu_quota = 0.5, memory = "
                          f"\"256M\" }}, got {type(raw).__name__}")  # fmt: skip
    extra = sorted(str(k) for k in set(raw) - set(_KEYS))
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {[ascii(k)[1:-1][:40] for k in extra]}; "
                          f"expected {', '.join(_KEYS)}")  # fmt: skip
    out: dict[str, Any] = {}
    if "cpus" in raw:
        cpus = raw["cpus"]
        if not isinstance(cpus, str) or not _CPUS_RE.fullmatch(cpus):
            raise ConfigError(f"{where}.cpus: must be a CPU list such as \"0-1\" or \"0,2\" "
                              f"(docker --cpuset-cpus), got {ascii(cpus)[:80]}")  # fmt: skip
        for part in cpus.split(","):
            low, _, high = part.partition("-")
            if high and int(high) < int(low):
                raise ConfigError(f"{where}.cpus: range {part!r} runs backwards")
        out["cpus"] = cpus
    if "cpu_quota" in raw:
        quota = raw["cpu_quota"]
        if isinstance(quota, bool) or not isinstance(quota, int | float):
            raise ConfigError(f"{where}.cpu_quota: must be a number of CPUs such as 0.5 "
                              f"(docker --cpus), got {ascii(quota)[:80]}")  # fmt: skip
        if not MIN_CPU_QUOTA <= quota <= (os.cpu_count() or 1):
            raise ConfigError(f"{where}.cpu_quota: {quota} is out of range {MIN_CPU_QUOTA}.."
                              f"{os.cpu_count()} (the CPUs of this host)")  # fmt: skip
        out["cpu_quota"] = float(quota)
    if "memory" in raw:
        out["memory"] = parse_size(raw["memory"], f"{where}.memory")
    for key, low, high, like in (("io_weight", *IO_WEIGHT_RANGE, "systemd IOWeight"),
                                 ("pids", 8, MAX_PIDS, "docker --pids-limit")):  # fmt: skip
        if key in raw:
            value = raw[key]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"{where}.{key}: must be an integer {low}..{high} ({like}), "
                                  f"got {ascii(value)[:80]}")  # fmt: skip
            out[key] = value
    return Limits(**out)


def limits_from_dict(data: Any) -> Limits:
    """Limits as :meth:`Limits.as_dict` wrote them (a record, a reply): validated again."""
    return parse_limits(data if isinstance(data, dict) else {}, "resources")


# -- the interface --------------------------------------------------------------------------
class Group(Protocol):
    """One stage's control group (in one or several hierarchies)."""

    name: str
    limits: Limits
    #: what was applied, and what could not be on this host (with why)
    applied: dict[str, Any]
    unsupported: dict[str, str]

    def procs_files(self) -> list[str]:
        """The files a PID is written to to move a process in (every hierarchy)."""
        ...

    def add(self, pid: int) -> None: ...

    def memory_procs_files(self) -> list[str]:
        """The file(s) that put a process under the group's memory accounting only (v1: the
        memory hierarchy; v2: the group), e.g. the ``criu swrk`` of a restore."""
        ...

    def pids(self) -> list[int]: ...

    def usage(self) -> dict[str, Any]: ...

    def oom_kills(self) -> int: ...

    def dirs(self) -> list[str]:
        """The group's folders (one per hierarchy), as the record lists them."""
        ...


class Backend(Protocol):
    name: str

    def create(self, name: str, limits: Limits, record: Record) -> Group: ...

    def describe(self) -> dict[str, Any]: ...


def _write(path: Path, value: str) -> None:
    """Write a cgroup file; an error names the file and the value."""
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as err:
        raise EnvironmentProblem(
            f"cannot write {value!r} to {path}: {err.strerror}; the limit is not supported "
            "here or out of range (run as root; see `dpmigrate doctor`)"
        ) from err


def _read(path: Path, default: str = "") -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return default


def _flat(path: Path) -> dict[str, int]:
    """A "key value" file (cpu.stat, memory.events, memory.oom_control) as a dict."""
    out = {}
    for line in _read(path).splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[key] = int(value)
    return out


def _procs(path: Path) -> list[int]:
    return [int(p) for p in _read(path / "cgroup.procs").split() if p.isdigit()]


# -- the record -----------------------------------------------------------------------------
class Record:
    """The groups one process created, in a JSON file written before each ``mkdir``:
    ``{"groups": [[dir, ...], ...], "parents": [dir, ...]}`` (parents: made by us, removed
    only when empty, after the groups)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def _load(self) -> dict[str, list[Any]]:
        return load_record(self.path)

    def add(self, dirs: Iterable[str], parent: bool = False) -> None:
        with self._lock:
            data = self._load()
            key = "parents" if parent else "groups"
            entry = list(dirs)
            if parent:
                data[key] = [*data[key], *(d for d in entry if d not in data[key])]
            elif entry not in data[key]:
                data[key].append(entry)
            atomic.write_json(self.path, data)

    def forget(self, dirs: Iterable[str], parent: bool = False) -> None:
        with self._lock:
            data = self._load()
            gone = set(dirs)
            if parent:
                data["parents"] = [d for d in data["parents"] if d not in gone]
            else:
                data["groups"] = [g for g in data["groups"] if not gone & set(g)]
            atomic.write_json(self.path, data)


def load_record(path: Path) -> dict[str, list[Any]]:
    """A record file as dicts of lists of absolute paths under a cgroup mount; anything else
    in it is ignored (never a path outside /sys/fs/cgroup is removed)."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {"groups": [], "parents": []}
    except (OSError, ValueError) as err:
        raise EnvironmentProblem(
            f"cgroup record {path} is unreadable ({err}); remove its groups by hand, then the file"
        ) from err

    def ok(p: Any) -> bool:
        return isinstance(p, str) and _is_cgroup_dir(p)

    groups = [[p for p in g if ok(p)] for g in raw.get("groups", []) if isinstance(g, list)]
    parents = [p for p in raw.get("parents", []) if ok(p)]
    return {"groups": [g for g in groups if g], "parents": parents}


def _is_cgroup_dir(path: str) -> bool:
    p = Path(path)
    return p.is_absolute() and ".." not in p.parts and str(p).startswith(
        tuple(m + "/" for m in _cgroup_mounts())
    )


def _cgroup_mounts() -> list[str]:
    """Mount points of cgroup and cgroup2 file systems (from /proc/self/mountinfo)."""
    return [m for m, _fs, _opts in _mountinfo()]


def _mountinfo() -> list[tuple[str, str, set[str]]]:
    out = []
    for line in _read(Path("/proc/self/mountinfo")).splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3 or rfields[0] not in ("cgroup", "cgroup2"):
            continue
        out.append((fields[4], rfields[0], set(rfields[2].split(","))))
    return out


def remove_dirs(dirs: Iterable[str], timeout: float = 5.0) -> list[str]:
    """Remove one group's folders: SIGKILL what still runs in them (only a stage's own
    processes are ever put there), wait for them to leave, ``rmdir``. Returns a line per
    folder removed; raises EnvironmentProblem naming a folder that would not go."""
    removed, stuck = [], []
    for d in sorted(dirs, key=len, reverse=True):
        path = Path(d)
        if not path.is_dir():
            continue
        deadline = time.monotonic() + timeout
        while True:
            for pid in _procs(path):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            try:
                path.rmdir()
                removed.append(f"cgroup {d}")
                break
            except FileNotFoundError:
                break
            except OSError as err:
                if err.errno != errno.EBUSY or time.monotonic() > deadline:
                    stuck.append(f"{d} ({err.strerror}; processes {_procs(path)})")
                    break
                time.sleep(0.02)
    if stuck:
        raise EnvironmentProblem(
            "cgroup(s) not removed: " + "; ".join(stuck) + "; end those processes, then "
            "`rmdir` the folders"
        )
    return removed


def remove_recorded(path: Path) -> list[str]:
    """Remove every group a record lists, then its parents that are empty; then the record
    itself if nothing in it is left. For ``cluster down`` and ``clean``: needs no agent."""
    record = Record(path)
    data = load_record(path)
    removed: list[str] = []
    problems: list[str] = []
    for group in data["groups"]:
        try:
            removed += remove_dirs(group)
            record.forget(group)
        except EnvironmentProblem as err:
            problems.append(str(err))
    for parent in sorted(data["parents"], key=len, reverse=True):
        try:
            os.rmdir(parent)
            removed.append(f"cgroup {parent}")
        except FileNotFoundError:
            pass
        except OSError:
            continue  # another run's groups are still in it: theirs to remove it
        record.forget([parent], parent=True)
    if not problems and not load_record(path)["groups"] and not load_record(path)["parents"]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    if problems:
        raise EnvironmentProblem("; ".join(problems))
    return removed


def _mkdir_recorded(path: Path, base: Path, record: Record) -> None:
    """``mkdir -p`` from ``base`` down to ``path``; folders below ``path`` that this call
    makes are recorded as parents first (removed when empty)."""
    rel = path.relative_to(base)
    made = [str(base / r) for r in [*reversed(rel.parents), rel]
            if r != Path(".") and not (base / r).exists()]  # fmt: skip
    if made:
        record.add(made, parent=True)
    for d in made:
        with contextlib.suppress(FileExistsError):
            os.mkdir(d)


# -- the index of run records ---------------------------------------------------------------
#: In DPMIGRATE_STATE_DIR: the cgroup records of multi-process runs, each with the process
#: that owns it (PID and start time), so that `clean` and `cluster down` can remove the
#: groups of a run whose process was killed (SIGKILL: no stop ran) — from its record alone.
INDEX = "cgroup-records.json"


@contextlib.contextmanager
def _index(state_dir: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The index, read and written under an exclusive lock (runs start side by side)."""
    path = Path(state_dir) / INDEX
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(INDEX + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            data = {}
        except (OSError, ValueError) as err:
            raise EnvironmentProblem(
                f"cgroup index {path} is unreadable ({err}); remove the groups its records "
                "list by hand, then the file"
            ) from err
        runs = data.get("runs") if isinstance(data, dict) else None
        data = {"runs": [r for r in runs or [] if isinstance(r, dict)]}
        yield data
        atomic.write_json(path, data)


def register_record(state_dir: str | os.PathLike[str], record: Path, pid: int,
                    start_time: int | None) -> None:  # fmt: skip
    """List ``record`` (a run's, owned by process ``pid`` started at ``start_time``) in the
    state dir's index, before the run makes its first group."""
    with _index(state_dir) as data:
        data["runs"] = [r for r in data["runs"] if r.get("record") != str(record)]
        data["runs"].append({"record": str(record), "pid": pid, "start_time": start_time})


def unregister_record(state_dir: str | os.PathLike[str], record: Path) -> None:
    with _index(state_dir) as data:
        data["runs"] = [r for r in data["runs"] if r.get("record") != str(record)]


def remove_orphaned(state_dir: str | os.PathLike[str],
                    alive: Callable[[int, int | None], bool]) -> list[str]:  # fmt: skip
    """Remove the groups of every indexed run whose owner is gone (``alive(pid, start)``
    false): exactly what each record lists. A run whose owner still runs is left alone."""
    if not (Path(state_dir) / INDEX).exists():
        return []
    removed: list[str] = []
    problems: list[str] = []
    with _index(state_dir) as data:
        kept = []
        for run in data["runs"]:
            pid, start = run.get("pid"), run.get("start_time")
            if isinstance(pid, int) and alive(pid, start if isinstance(start, int) else None):
                kept.append(run)
                continue
            try:
                removed += remove_recorded(Path(str(run.get("record"))))
            except EnvironmentProblem as err:
                problems.append(str(err))
                kept.append(run)
        data["runs"] = kept
    if problems:
        raise EnvironmentProblem("; ".join(problems))
    return removed


# -- cgroup v1 ------------------------------------------------------------------------------
#: The v1 hierarchies a group joins: the first four always (usage and OOM are read from
#: them); cpuset and blkio only for a limit that needs them.
_V1_ALWAYS = ("cpu", "cpuacct", "memory", "pids")


@dataclasses.dataclass
class V1Group:
    name: str
    limits: Limits
    paths: dict[str, Path]  # controller -> folder
    applied: dict[str, Any] = dataclasses.field(default_factory=dict)
    unsupported: dict[str, str] = dataclasses.field(default_factory=dict)

    def procs_files(self) -> list[str]:
        return [str(p / "cgroup.procs") for p in self.paths.values()]

    def add(self, pid: int) -> None:
        for f in self.procs_files():
            _write(Path(f), str(pid))

    def memory_procs_files(self) -> list[str]:
        return [str(self.paths["memory"] / "cgroup.procs")]

    def pids(self) -> list[int]:
        return _procs(self.paths["memory"])

    def oom_kills(self) -> int:
        return _flat(self.paths["memory"] / "memory.oom_control").get("oom_kill", 0)

    def usage(self) -> dict[str, Any]:
        cpu = _flat(self.paths["cpu"] / "cpu.stat")
        mem = self.paths["memory"]
        return {
            "cpu_seconds": int(_read(self.paths["cpuacct"] / "cpuacct.usage", "0")) / 1e9,
            "memory_bytes": int(_read(mem / "memory.usage_in_bytes", "0")),
            "memory_peak_bytes": int(_read(mem / "memory.max_usage_in_bytes", "0")),
            "throttled_periods": cpu.get("nr_throttled", 0),
            "throttled_seconds": cpu.get("throttled_time", 0) / 1e9,
            "oom_kills": self.oom_kills(),
            "tasks": int(_read(self.paths["pids"] / "pids.current", "0")),
        }

    def dirs(self) -> list[str]:
        return [str(p) for p in self.paths.values()]


class V1:
    """Separate hierarchies per controller (these machines: cpu, cpuacct, cpuset, memory,
    blkio, pids each mounted on its own)."""

    name = "v1"

    def __init__(self, mounts: dict[str, Path], own: dict[str, str]) -> None:
        self.mounts = mounts  # controller -> mount point
        self.own = own  # controller -> this process's group in it

    def base(self, controller: str) -> Path:
        return self.mounts[controller] / self.own.get(controller, "/").lstrip("/") / PARENT

    def describe(self) -> dict[str, Any]:
        return {"backend": "v1", "controllers": {c: str(self.base(c)) for c in self.mounts}}

    def create(self, name: str, limits: Limits, record: Record) -> V1Group:
        wanted = [*_V1_ALWAYS]
        if limits.cpus is not None:
            wanted.append("cpuset")
        if limits.io_weight is not None:
            wanted.append("blkio")
        missing = [c for c in wanted if c not in self.mounts]
        if missing:
            raise EnvironmentProblem(
                f"cgroup v1 hierarchies {missing} are not mounted (needed for stage group "
                f"{name}); mount them under /sys/fs/cgroup or drop those limits"
            )
        paths = {c: self.base(c) / name for c in wanted}
        record.add(str(p) for p in paths.values())
        group = V1Group(name, limits, paths)
        try:
            for c, path in paths.items():
                root = self.mounts[c] / self.own.get(c, "/").lstrip("/")
                _mkdir_recorded(path.parent, root, record)
                if c == "cpuset":  # a new cpuset has no CPUs and no memory nodes: inherit them
                    _inherit_cpuset(path.parent, root)
                with contextlib.suppress(FileExistsError):
                    path.mkdir()
            self._apply(group)
        except BaseException:
            remove_dirs(group.dirs())
            record.forget(group.dirs())
            raise
        return group

    @staticmethod
    def _apply(group: V1Group) -> None:
        lim, p = group.limits, group.paths
        if lim.cpus is not None:
            _inherit_cpuset(p["cpuset"], p["cpuset"].parent)
            _write(p["cpuset"] / "cpuset.cpus", lim.cpus)
            group.applied["cpus"] = _read(p["cpuset"] / "cpuset.cpus")
        if lim.cpu_quota is not None:
            _write(p["cpu"] / "cpu.cfs_period_us", str(CFS_PERIOD_US))
            _write(p["cpu"] / "cpu.cfs_quota_us", str(int(lim.cpu_quota * CFS_PERIOD_US)))
            group.applied["cpu_quota"] = lim.cpu_quota
        if lim.memory is not None:
            _write(p["memory"] / "memory.limit_in_bytes", str(lim.memory))
            group.applied["memory"] = int(_read(p["memory"] / "memory.limit_in_bytes"))
            memsw = p["memory"] / "memory.memsw.limit_in_bytes"
            if memsw.exists():
                _write(memsw, str(lim.memory))
                group.applied["memory_swap"] = int(_read(memsw))
            else:
                group.unsupported["memory_swap"] = "no memsw accounting (swapaccount=0)"
        if lim.io_weight is not None:
            # blkio.bfq.weight exists whether or not a device uses bfq; it acts only where one does
            bfq = _bfq_devices()
            for fname, value in (("blkio.weight", str(lim.io_weight)),
                                 ("blkio.bfq.weight", str(lim.io_weight))):  # fmt: skip
                if fname == "blkio.bfq.weight" and not bfq:
                    continue
                if (p["blkio"] / fname).exists():
                    _write(p["blkio"] / fname, value)
                    group.applied["io_weight"] = lim.io_weight
                    break
            else:
                group.unsupported["io_weight"] = (
                    "no blkio.weight or blkio.bfq.weight: no block device of this host uses "
                    "the bfq I/O scheduler (echo bfq > /sys/block/DEV/queue/scheduler)"
                )
        if lim.pids is not None:
            _write(p["pids"] / "pids.max", str(lim.pids))
            group.applied["pids"] = lim.pids


def _bfq_devices() -> list[str]:
    """Block devices whose I/O scheduler is bfq (the only ones a bfq weight acts on)."""
    return [d.name for d in Path("/sys/block").glob("*")
            if "[bfq]" in _read(d / "queue" / "scheduler")]  # fmt: skip


def _inherit_cpuset(path: Path, root: Path) -> None:
    """Give every cpuset folder below ``root`` down to ``path`` its parent's CPUs and memory
    nodes where it has none (v1 refuses tasks in an empty cpuset)."""
    chain = [path, *path.parents]
    below_root = chain[: chain.index(root)] if root in chain else [path]
    for d in reversed(below_root):
        for fname in ("cpuset.cpus", "cpuset.mems"):
            if not _read(d / fname):
                _write(d / fname, _read(d.parent / fname))


# -- cgroup v2 ------------------------------------------------------------------------------
@dataclasses.dataclass
class V2Group:
    name: str
    limits: Limits
    path: Path
    applied: dict[str, Any] = dataclasses.field(default_factory=dict)
    unsupported: dict[str, str] = dataclasses.field(default_factory=dict)

    def procs_files(self) -> list[str]:
        return [str(self.path / "cgroup.procs")]

    def add(self, pid: int) -> None:
        _write(self.path / "cgroup.procs", str(pid))

    def memory_procs_files(self) -> list[str]:
        return self.procs_files()

    def pids(self) -> list[int]:
        return _procs(self.path)

    def oom_kills(self) -> int:
        return _flat(self.path / "memory.events").get("oom_kill", 0)

    def usage(self) -> dict[str, Any]:
        cpu = _flat(self.path / "cpu.stat")
        return {
            "cpu_seconds": cpu.get("usage_usec", 0) / 1e6,
            "memory_bytes": int(_read(self.path / "memory.current", "0")),
            "memory_peak_bytes": int(_read(self.path / "memory.peak", "0") or 0),
            "throttled_periods": cpu.get("nr_throttled", 0),
            "throttled_seconds": cpu.get("throttled_usec", 0) / 1e6,
            "oom_kills": self.oom_kills(),
            "tasks": int(_read(self.path / "pids.current", "0") or 0),
        }

    def dirs(self) -> list[str]:
        return [str(self.path)]


class V2:
    """One unified hierarchy: a stage's group holds all its limits."""

    name = "v2"
    CONTROLLERS = ("cpu", "cpuset", "io", "memory", "pids")

    def __init__(self, mount: Path) -> None:
        self.mount = mount

    @property
    def base(self) -> Path:
        return self.mount / PARENT

    def describe(self) -> dict[str, Any]:
        return {"backend": "v2", "root": str(self.base),
                "controllers": _read(self.mount / "cgroup.controllers").split()}  # fmt: skip

    def create(self, name: str, limits: Limits, record: Record) -> V2Group:
        available = set(_read(self.mount / "cgroup.controllers").split())
        wanted = [c for c in self.CONTROLLERS if c in available]
        path = self.base / name
        record.add([str(path)])
        group = V2Group(name, limits, path)
        try:
            _mkdir_recorded(self.base, self.mount, record)
            for d in (self.mount, self.base):  # let the children have the controllers
                enabled = set(_read(d / "cgroup.subtree_control").split())
                missing = [c for c in wanted if c not in enabled]
                if missing:
                    _write(d / "cgroup.subtree_control", " ".join(f"+{c}" for c in missing))
            with contextlib.suppress(FileExistsError):
                path.mkdir()
            self._apply(group, available)
        except BaseException:
            remove_dirs(group.dirs())
            record.forget(group.dirs())
            raise
        return group

    @staticmethod
    def _apply(group: V2Group, available: set[str]) -> None:
        lim, p = group.limits, group.path
        wants = {"cpus": "cpuset", "cpu_quota": "cpu", "memory": "memory", "io_weight": "io",
                 "pids": "pids"}  # fmt: skip
        for key, controller in wants.items():
            if getattr(lim, key) is not None and controller not in available:
                group.unsupported[key] = f"controller {controller} not in the unified hierarchy"
        if lim.cpus is not None and "cpuset" in available:
            _write(p / "cpuset.cpus", lim.cpus)
            group.applied["cpus"] = lim.cpus
        if lim.cpu_quota is not None and "cpu" in available:
            _write(p / "cpu.max", f"{int(lim.cpu_quota * CFS_PERIOD_US)} {CFS_PERIOD_US}")
            group.applied["cpu_quota"] = lim.cpu_quota
        if lim.memory is not None and "memory" in available:
            _write(p / "memory.max", str(lim.memory))
            group.applied["memory"] = lim.memory
            if (p / "memory.swap.max").exists():
                _write(p / "memory.swap.max", "0")
                group.applied["memory_swap"] = lim.memory
        if lim.io_weight is not None and "io" in available:
            if (p / "io.weight").exists():
                _write(p / "io.weight", f"default {lim.io_weight}")
                group.applied["io_weight"] = lim.io_weight
            else:
                group.unsupported["io_weight"] = "no io.weight (the bfq/iocost is not active)"
        if lim.pids is not None and "pids" in available:
            _write(p / "pids.max", str(lim.pids))
            group.applied["pids"] = lim.pids


# -- choosing a backend ---------------------------------------------------------------------
def detect() -> Backend | None:
    """The backend this host supports (v2 if its unified hierarchy has the memory
    controller, else v1 if the cpu and memory hierarchies are mounted), or None."""
    v1_mounts: dict[str, Path] = {}
    for mount, fstype, opts in _mountinfo():
        if fstype == "cgroup2":
            if "memory" in _read(Path(mount) / "cgroup.controllers").split():
                return V2(Path(mount))
            continue
        for c in ("cpu", "cpuacct", "cpuset", "memory", "blkio", "pids"):
            if c in opts:
                v1_mounts.setdefault(c, Path(mount))
    if "memory" in v1_mounts and "cpu" in v1_mounts:
        return V1(v1_mounts, _own_v1_groups())
    return None


def _own_v1_groups() -> dict[str, str]:
    """This process's group in each v1 hierarchy (/proc/self/cgroup)."""
    out = {}
    for line in _read(Path("/proc/self/cgroup")).splitlines():
        _id, controllers, path = line.split(":", 2)
        for c in controllers.split(","):
            if c:
                out[c] = path
    return out


def describe() -> dict[str, Any]:
    """For ``doctor``: which backend is in use and where groups go."""
    backend = detect()
    return {"backend": None} if backend is None else backend.describe()


class StageGroups:
    """The groups of one creator (an agent, a multi-process run): create per stage, remove
    exactly the recorded ones. ``warn`` is told once about each limit this host cannot
    apply."""

    def __init__(self, record_path: Path, backend: Backend | None = None) -> None:
        self.record = Record(record_path)
        self._backend = backend
        self._detected = backend is not None

    @property
    def backend(self) -> Backend:
        if not self._detected:
            self._backend, self._detected = detect(), True
        if self._backend is None:
            raise EnvironmentProblem(
                "no cgroup controllers are mounted on this host (neither a unified v2 "
                "hierarchy with memory nor v1 cpu and memory hierarchies), so stage resources "
                "cannot be applied; mount them, or remove `resources` from the manifest"
            )
        return self._backend

    def create(self, name: str, limits: Limits) -> Group:
        return self.backend.create(name, limits, self.record)

    def remove(self, group: Group) -> list[str]:
        removed = remove_dirs(group.dirs())
        self.record.forget(group.dirs())
        return removed

    def remove_all(self) -> list[str]:
        return remove_recorded(self.record.path)


def group_name(scope: str, stage: str) -> str:
    """A group's folder name: ``<scope>.<stage>``; '/' (app/stage keys) becomes '.'."""
    return f"{scope}.{stage}".replace("/", ".")
