"""`dpmigrate doctor`: can checkpoint and migration work on this machine, and if not, why.

Each check is a small function returning a :class:`Check` with a status (ok / warn / fail) and
a detail that says what to do next. "fail" means checkpoint or migration cannot work;
"warn" means something optional is missing (pre-copy, hugepages, RDMA). The report is ok
when no check failed.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dpmigrate.checkpoint.criu_binary import CriuBinary
from dpmigrate.config import Config
from dpmigrate.errors import DpmigrateError, EnvironmentProblem

OK, WARN, FAIL = "ok", "warn", "fail"

#: Lazy pages move a stage's memory through pipes of up to this size (DESIGN.md §4).
PIPE_MAX_NEEDED = 4 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Report:
    criu_path: str
    criu_version: str
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "criu": {"path": self.criu_path, "version": self.criu_version},
            "checks": [c.as_dict() for c in self.checks],
        }


def _criu_check(criu: CriuBinary) -> Check:
    result = criu.check()
    if result.ok:
        return Check("criu check", OK, result.output.splitlines()[-1] if result.output else "ok")
    return Check("criu check", FAIL, f"`criu check` failed: {result.output[-300:]}")


def _feature(criu: CriuBinary, name: str, feature: str, missing: str, severity: str) -> Check:
    result = criu.check(feature)
    if result.ok:
        return Check(name, OK, f"criu feature {feature} supported")
    return Check(name, severity, missing)


def _root() -> Check:
    if os.geteuid() == 0:
        return Check("root", OK, "running as root")
    return Check("root", FAIL, "checkpoint, namespaces and nftables need root; run as root")


def _run_quiet(args: list[str]) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _netns() -> Check:
    unshare = shutil.which("unshare")
    if not unshare:
        return Check("network namespaces", FAIL, "`unshare` missing; apt-get install util-linux")
    result = _run_quiet([unshare, "--net", "true"])
    if result and result.returncode == 0:
        return Check("network namespaces", OK, "a new network namespace can be created")
    why = result.stderr.strip() if result else "unshare did not run"
    return Check(
        "network namespaces", FAIL, f"cannot create a network namespace ({why}); run as root"
    )


def _nftables() -> Check:
    nft, unshare = shutil.which("nft"), shutil.which("unshare")
    if not nft:
        return Check("nftables network lock", FAIL, "`nft` missing; apt-get install nftables")
    if not unshare:
        return Check("nftables network lock", FAIL, "`unshare` missing; apt-get install util-linux")
    # A table created inside a throw-away namespace disappears with it: nothing to clean up.
    result = _run_quiet([unshare, "--net", nft, "add", "table", "inet", "dpmigrate_doctor"])
    if result and result.returncode == 0:
        return Check(
            "nftables network lock",
            OK,
            "nftables tables can be created (criu --network-lock nftables)",
        )
    why = result.stderr.strip() if result else "nft did not run"
    return Check("nftables network lock", FAIL, f"nft cannot create a table ({why}); run as root")


def _meminfo() -> dict[str, int]:
    values = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0])
    return values


def _hugepages() -> Check:
    info = _meminfo()
    total, free, size_kb = (
        info.get("HugePages_Total", 0),
        info.get("HugePages_Free", 0),
        info.get("Hugepagesize", 0),
    )
    if total > 0:
        return Check("hugepages", OK, f"{free} of {total} pages of {size_kb} kB free for shm rings")
    return Check(
        "hugepages",
        WARN,
        f"none configured ({size_kb} kB pages available); shm rings use 4 KB pages. "
        "To use them: `dpmigrate cluster up --hugepages N` (3 per ring; given back by "
        "`cluster down`), or sysctl -w vm.nr_hugepages=N by hand",
    )


def _cgroups() -> Check:
    """Which control-group backend stage ``resources`` use here, and where groups go."""
    from dpmigrate.runtime import cgroups

    info = cgroups.describe()
    if info["backend"] == "v1":
        where = ", ".join(f"{c} {p}" for c, p in sorted(info["controllers"].items()))
        return Check("cgroups", OK, f"cgroup v1 (separate hierarchies): stage groups under {where}")
    if info["backend"] == "v2":
        return Check("cgroups", OK, f"cgroup v2 (unified): stage groups under {info['root']}, "
                     f"controllers {' '.join(info['controllers'])}")  # fmt: skip
    return Check("cgroups", WARN, "no cgroup v1 cpu+memory hierarchies and no unified v2 "
                 "hierarchy with memory: stages with `resources` cannot start; mount "
                 "cgroups")  # fmt: skip


def _pipe_max_size() -> Check:
    value = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    if value >= PIPE_MAX_NEEDED:
        return Check("pipe-max-size", OK, f"fs.pipe-max-size = {value}")
    return Check(
        "pipe-max-size",
        FAIL,
        f"fs.pipe-max-size = {value}, post-copy needs >= {PIPE_MAX_NEEDED}; run scripts/setup "
        f"or sysctl -w fs.pipe-max-size={PIPE_MAX_NEEDED}",
    )


def _rdma() -> Check:
    devices = sorted(p.name for p in Path("/sys/class/infiniband").glob("*"))
    if devices:
        return Check("rdma devices", OK, ", ".join(devices))
    return Check("rdma devices", WARN, "no RDMA device; rings between nodes use TCP")


def _pycriu() -> Check:
    try:
        importlib.import_module("pycriu")
    except ImportError as err:
        return Check("pycriu", FAIL, f"pycriu not importable ({err}); run scripts/setup")
    try:
        version = importlib.metadata.version("pycriu")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown version"
    return Check("pycriu", OK, f"pycriu {version} importable")


def _etcd_binary(config: Config) -> Check:
    from dpmigrate.cluster import etcd

    try:
        path = etcd.binary(config.prefix)
    except EnvironmentProblem as err:
        return Check("etcd", FAIL, str(err))
    done = _run_quiet([path, "--version"])
    first = done.stdout.splitlines()[0] if done is not None and done.stdout else ""
    if done is None or done.returncode != 0 or "3." not in first:
        return Check("etcd", FAIL, f"{path} does not run (`{path} --version`); run scripts/setup")
    return Check("etcd", OK, f"{first.strip()} at {path}")


def _cluster_store(config: Config) -> Check:
    """The cluster store's health: DPMIGRATE_ETCD's, else the local cluster's member."""
    from dpmigrate.cluster.store import EtcdSettings, Store
    from dpmigrate.runtime.cluster import LocalCluster

    try:
        if config.etcd:
            settings = EtcdSettings.parse(config.etcd, config.etcd_ca, config.etcd_cert,
                                          config.etcd_key)  # fmt: skip
            where, store = config.etcd, Store(settings)
        else:
            cluster = LocalCluster.current(config.state_dir)
            where, store = f"local cluster {cluster.id}", cluster.store()
    except DpmigrateError as err:
        if config.etcd:
            return Check("cluster store", FAIL, str(err))
        return Check("cluster store", OK, "no cluster is up; `dpmigrate cluster up` starts one "
                     "etcd member (or set DPMIGRATE_ETCD)")  # fmt: skip
    try:
        health = store.health()
    except DpmigrateError as err:
        return Check("cluster store", FAIL, f"{where}: {err}")
    return Check("cluster store", OK, f"etcd {health['version']} of {where} answers "
                 f"({health['endpoint']}, revision {health['revision']})")  # fmt: skip


def run(config: Config, progress: Callable[[str], None] | None = None) -> Report:
    """Run every check. Raises CriuNotFound when the configured criu cannot run at all."""
    criu = CriuBinary(config.criu)
    version = criu.version_text
    checks: list[Check] = []

    def add(name: str, fn: Callable[[], Check]) -> None:
        if progress:
            progress(name)
        checks.append(fn())

    try:
        criu.require_supported()
        checks.append(Check("criu version", OK, f"criu {version} at {criu.path}"))
    except Exception as err:  # report the too-old version as a failed check, not a crash
        checks.append(Check("criu version", FAIL, str(err)))
    add("root", _root)
    is_root = os.geteuid() == 0
    if is_root:
        add("criu check", lambda: _criu_check(criu))
        add(
            "lazy pages",
            lambda: _feature(
                criu,
                "lazy pages (userfaultfd)",
                "uffd-noncoop",
                "userfaultfd unavailable: no post-copy migration; enable CONFIG_USERFAULTFD",
                FAIL,
            ),
        )
        add(
            "dirty tracking",
            lambda: _feature(
                criu,
                "memory dirty tracking",
                "mem_dirty_track",
                "soft-dirty tracking is off in this kernel: no pre-copy (pre-dump); "
                "stop-and-copy, post-copy and statesync still work",
                WARN,
            ),
        )
        add(
            "tcp repair",
            lambda: _feature(
                criu,
                "tcp repair",
                "tcp_half_closed",
                "TCP repair incomplete: established connections cannot be checkpointed; "
                "dpmigrate closes ring connections before a dump, so this only limits --pid",
                WARN,
            ),
        )
    add("nftables", _nftables)
    add("netns", _netns)
    add("hugepages", _hugepages)
    add("cgroups", _cgroups)
    add("pipe-max-size", _pipe_max_size)
    add("rdma", _rdma)
    add("pycriu", _pycriu)
    add("etcd", lambda: _etcd_binary(config))
    if is_root:
        add("cluster store", lambda: _cluster_store(config))
    return Report(criu.path, version, checks)
