"""The faults a drill injects, each one a small object that injects, shows that it happened
(evidence for the report) and heals — also when the drill fails half-way.

Everything here acts only on what the drill's own local cluster created: processes by the PID
that the cluster's record or an agent's status names, links and firewall rules inside the
cluster's own network namespaces (``nsenter --net=/run/netns/NS``), never the host's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dpmigrate.cluster import etcd
from dpmigrate.errors import DpmigrateError
from dpmigrate.runtime.cluster import LocalCluster

log = logging.getLogger("dpmigrate.drill")

_CMD_TIMEOUT_S = 15.0
#: The nftables table a partition adds in a node's namespace (removed by its heal).
PARTITION_TABLE = "dpmdrill"
#: The tmpfs a disk-full drill mounts: small enough that a stage's images cannot fit.
FULL_TMPFS_SIZE = "64k"


class FaultError(DpmigrateError):
    """A fault could not be injected or healed (the drill reports it as failed)."""


def run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """A bounded command; a failure names the command and its stderr."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=_CMD_TIMEOUT_S,
                              check=False)  # fmt: skip
    except subprocess.TimeoutExpired as err:
        raise FaultError(f"`{' '.join(cmd)}` hung for {_CMD_TIMEOUT_S:.0f} s") from err
    if check and done.returncode != 0:
        raise FaultError(f"`{' '.join(cmd)}` failed: {done.stderr.strip()}")
    return done


def in_netns(netns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``cmd`` in the network namespace ``netns`` only (nsenter: no extra mount namespace)."""
    return run(["nsenter", f"--net=/run/netns/{netns}", *cmd], check=check)


def process_state(pid: int) -> str:
    """The state letter of ``pid`` from /proc ("" when gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def alive(pid: int) -> bool:
    return process_state(pid) not in ("", "Z", "X")


def wait_for(check: Callable[[], object], what: str, timeout: float, poll: float = 0.05) -> None:
    """Bounded wait; FaultError naming ``what`` when it does not come."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise FaultError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


class Faults:
    """The heal steps of one drill, run newest first; each failure is logged and kept (a heal
    that fails leaves the shared cluster unclean, which the next invariant check reports)."""

    def __init__(self) -> None:
        self._heal: list[tuple[str, Callable[[], None]]] = []
        self.heal_failures: list[str] = []

    def on_heal(self, what: str, step: Callable[[], None]) -> None:
        self._heal.append((what, step))

    def heal(self) -> None:
        while self._heal:
            what, step = self._heal.pop()
            try:
                step()
            except Exception as err:  # every heal runs, whatever the one before did
                log.warning("drill: could not heal %s: %s", what, err)
                self.heal_failures.append(f"{what}: {err}")


# -- processes ---------------------------------------------------------------------------


def kill(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    """Signal one PID that the cluster named (never a name pattern)."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError as err:
        raise FaultError(f"process {pid} is already gone: nothing to {sig.name}") from err


def pause(faults: Faults, pids: list[int]) -> None:
    """SIGSTOP each of ``pids`` until the heal (or :func:`resume`) SIGCONTs them."""
    for pid in pids:
        kill(pid, signal.SIGSTOP)
        faults.on_heal(f"SIGCONT {pid}", lambda pid=pid: _cont(pid))
    wait_for(lambda: all(process_state(p) == "T" for p in pids), f"{pids} stopped", 5)


def _cont(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


def agent_env(pid: int) -> dict[str, str]:
    """A process's environment as /proc shows it: evidence of what its criu inherits."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def restart_agent_with(cluster: LocalCluster, node: str, extra_env: dict[str, str]) -> int:
    """SIGKILL ``node``'s keeper and agent and start a new keeper with ``extra_env`` added to
    (or, for an empty value, removed from) its environment; returns the new agent's PID. The
    keeper passes its environment to the agent, and the agent to its criu (CRIU_FAULT).
    Only between runs: a new keeper makes a new mount namespace, in which a stage left
    running by the old agent could not be dumped."""
    entry = cluster.node(node)
    doomed = [p for p in (entry.keeper_pid, entry.agent_pid) if p]
    if not doomed:
        raise FaultError(f"the cluster records no agent PID for {node}")
    for pid in doomed:  # the keeper first, or it would restart the agent
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not any(alive(p) for p in doomed), f"{node}'s keeper and agent to die", 10)
    saved = {k: os.environ.get(k) for k in extra_env}
    try:
        for key, value in extra_env.items():
            if value:
                os.environ[key] = value
            else:
                os.environ.pop(key, None)
        # a new keeper is spawned with this process's environment plus the cluster's settings
        if not cluster.restart_agent(node):
            raise FaultError(f"{node}'s agent did not restart")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    new = cluster.node(node).agent_pid
    assert new is not None
    return new


# -- etcd --------------------------------------------------------------------------------


def etcd_pid(cluster: LocalCluster) -> int:
    pid = cluster.status()["store"].get("pid")
    if not isinstance(pid, int):
        raise FaultError("the cluster's etcd is not the embedded member: no PID to restart")
    return pid


def restart_etcd(cluster: LocalCluster, down_s: float) -> dict[str, Any]:
    """SIGKILL the cluster's etcd member, wait ``down_s``, start it again on its own data dir
    (same command) and record its new PID in the cluster record, so that ``down`` stops it.

    LocalCluster has no public restart of its store, so this rewrites the record's etcd entry
    through the cluster's own save (the one place that knows the record's format)."""
    from dpmigrate import config
    from dpmigrate.runtime.supervisor import process_start_time

    record = cluster._require_record()
    entry = record["etcd"]
    old = int(entry["pid"])
    kill(old)
    wait_for(lambda: not alive(old), f"etcd {old} to die", 10)
    time.sleep(down_s)  # the fault: the store is away this long
    data = str(Path(cluster.state_dir) / "cluster" / "etcd")
    from dpmigrate.runtime.cluster import STORE_ADDRESS

    # the record keeps the member's command line (with its TLS files) since mutual TLS
    cmd = list(entry.get("cmd") or etcd.command(etcd.binary(config.load().prefix), data,
                                                 STORE_ADDRESS))
    proc = etcd.spawn(cmd, entry["log"], prefix=["nsenter", f"--net=/run/netns/{entry['netns']}"])
    entry["pid"], entry["start_time"] = proc.pid, process_start_time(proc.pid)
    cluster._save()
    cluster._procs[proc.pid] = proc
    wait_for(lambda: _store_answers(cluster), "the restarted etcd to answer", 30)
    return {"killed_etcd": old, "new_etcd": proc.pid, "down_s": down_s}


def _store_answers(cluster: LocalCluster) -> bool:
    try:
        cluster.store().health()
        return True
    except DpmigrateError:
        return False


# -- network -------------------------------------------------------------------------------


def netem(faults: Faults, netns: str, spec: list[str], dev: str = "eth0") -> str:
    """``tc qdisc add dev eth0 root netem SPEC`` inside ``netns``; returns the qdisc as tc
    shows it (evidence). Healed by deleting the qdisc."""
    in_netns(netns, "tc", "qdisc", "add", "dev", dev, "root", "netem", *spec)
    faults.on_heal(f"netem on {netns}/{dev}",
                   lambda: in_netns(netns, "tc", "qdisc", "del", "dev", dev, "root"))  # fmt: skip
    return qdisc(netns, dev)


#: The nftables table of the netem stand-in (random loss and duplication).
LOSSY_TABLE = "dpmdrill_lossy"


def netem_supported(err: FaultError) -> bool:
    """False when tc said this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM unset)."""
    return "qdisc kind is unknown" not in str(err)


def lossy_link(faults: Faults, netns: str, loss_pct: int, dup_pct: int, rate: str,
               dev: str = "eth0") -> str:  # fmt: skip
    """What a kernel without netem still offers: a tbf bandwidth limit (its queue delays
    bursts) and nftables rules that drop ``loss_pct`` % of packets each way at random and
    send ``dup_pct`` % of outgoing ones twice. Returns the qdisc and rules as seen."""
    in_netns(netns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst",
             "32kbit", "latency", "100ms")  # fmt: skip
    faults.on_heal(f"tbf on {netns}/{dev}",
                   lambda: in_netns(netns, "tc", "qdisc", "del", "dev", dev, "root"))  # fmt: skip
    t = LOSSY_TABLE
    script = (
        f"add table ip {t}\n"
        f"add chain ip {t} in {{ type filter hook input priority -10; }}\n"
        f"add chain ip {t} out {{ type filter hook output priority -10; }}\n"
        f'add rule ip {t} in iifname "{dev}" numgen random mod 100 < {loss_pct} counter drop\n'
        f'add rule ip {t} out oifname "{dev}" numgen random mod 100 < {loss_pct} counter drop\n'
        f'add rule ip {t} out oifname "{dev}" numgen random mod 100 < {dup_pct} counter '
        f'dup to ip daddr device "{dev}"\n'
    )
    faults.on_heal(f"lossy rules in {netns}",
                   lambda: in_netns(netns, "nft", "delete", "table", "ip", t))  # fmt: skip
    done = subprocess.run(["nsenter", f"--net=/run/netns/{netns}", "nft", "-f", "-"],
                          input=script, capture_output=True, text=True,
                          timeout=_CMD_TIMEOUT_S, check=False)  # fmt: skip
    if done.returncode != 0:
        raise FaultError(f"nft loss/duplication rules in {netns} failed: {done.stderr.strip()}")
    return qdisc(netns, dev)


def lossy_counters(netns: str) -> str:
    out = in_netns(netns, "nft", "list", "table", "ip", LOSSY_TABLE, check=False).stdout
    return " | ".join(" ".join(line.split()) for line in out.splitlines() if "counter" in line)


def qdisc(netns: str, dev: str = "eth0") -> str:
    return in_netns(netns, "tc", "-s", "qdisc", "show", "dev", dev).stdout.strip()


def partition(faults: Faults, netns: str, dev: str = "eth0") -> None:
    """Drop everything in and out of ``dev`` in ``netns`` with an nftables table of its own
    (loopback stays up: the node's own stages still reach its agent)."""
    script = (
        f"add table inet {PARTITION_TABLE}\n"
        f"add chain inet {PARTITION_TABLE} in {{ type filter hook input priority -10; }}\n"
        f"add chain inet {PARTITION_TABLE} out {{ type filter hook output priority -10; }}\n"
        f'add rule inet {PARTITION_TABLE} in iifname "{dev}" counter drop\n'
        f'add rule inet {PARTITION_TABLE} out oifname "{dev}" counter drop\n'
    )
    faults.on_heal(f"partition of {netns}", lambda: heal_partition(netns))
    done = subprocess.run(["nsenter", f"--net=/run/netns/{netns}", "nft", "-f", "-"],
                          input=script, capture_output=True, text=True,
                          timeout=_CMD_TIMEOUT_S, check=False)  # fmt: skip
    if done.returncode != 0:
        raise FaultError(f"nft partition in {netns} failed: {done.stderr.strip()}")


def partition_counters(netns: str) -> str:
    """The partition's rules with their counters (dropped packets: evidence)."""
    out = in_netns(netns, "nft", "list", "table", "inet", PARTITION_TABLE, check=False).stdout
    return " ".join(line.strip() for line in out.splitlines() if "counter" in line)


def heal_partition(netns: str) -> None:
    listed = in_netns(netns, "nft", "list", "tables", check=False).stdout
    if f"inet {PARTITION_TABLE}" in listed:
        in_netns(netns, "nft", "delete", "table", "inet", PARTITION_TABLE)


def timer(faults: Faults, delay: float, what: str, step: Callable[[], None]) -> threading.Timer:
    """Run ``step`` after ``delay`` s in the background (a partition that ends by itself);
    the heal waits for it, so nothing outlives the drill."""
    t = threading.Timer(delay, step)
    t.daemon = True
    t.start()
    faults.on_heal(f"timer: {what}", lambda: t.join(delay + 30))
    return t


# -- files ---------------------------------------------------------------------------------


def corrupt_file(path: Path, count: int = 16, seed: int = 7) -> dict[str, Any]:
    """Flip ``count`` bytes in the middle of ``path`` in place (same size, so only a checksum
    can tell); returns which file and offsets (evidence)."""
    size = path.stat().st_size
    if size == 0:
        raise FaultError(f"{path} is empty: nothing to corrupt")
    rng = random.Random(seed)
    offsets = sorted({size // 2 + rng.randrange(max(1, min(size // 2, 4096))) for _ in
                      range(count)})  # fmt: skip
    offsets = [o for o in offsets if o < size]
    with open(path, "r+b") as f:
        for off in offsets:
            f.seek(off)
            byte = f.read(1)
            f.seek(off)
            f.write(bytes([byte[0] ^ 0xFF]))
    return {"file": str(path), "offsets": offsets[:4], "flipped": len(offsets), "size": size}


def largest_file(folder: Path) -> Path:
    files = [p for p in folder.rglob("*") if p.is_file()]
    if not files:
        raise FaultError(f"{folder} holds no file to corrupt")
    return max(files, key=lambda p: p.stat().st_size)


def full_tmpfs(faults: Faults, agent_pid: int, folder: str) -> str:
    """Mount a tiny tmpfs on ``folder`` in the mount namespace of ``agent_pid`` (where that
    agent writes what it receives), healed by unmounting; returns the mount line seen."""
    ns = f"--mount=/proc/{agent_pid}/ns/mnt"
    run(["nsenter", ns, "mkdir", "-p", folder])
    run(["nsenter", ns, "mount", "-t", "tmpfs", "-o", f"size={FULL_TMPFS_SIZE}", "dpm-drill-full",
         folder])  # fmt: skip
    faults.on_heal(f"tmpfs on {folder}", lambda: run(["nsenter", ns, "umount", folder]))
    mounts = Path(f"/proc/{agent_pid}/mounts").read_text().splitlines()
    return next((m for m in mounts if m.startswith("dpm-drill-full ")), "")


# -- strangers -------------------------------------------------------------------------------


def strangers(netns: str, targets: list[str], seconds: float, flood: int) -> dict[str, Any]:
    """Unauthenticated clients at each HOST:PORT in ``targets``, from inside ``netns``: garbage,
    a fake frame header, an HTTP request, idle connections held open, and a connect flood of
    at most ``flood`` connections per target; bounded by ``seconds``. Returns what happened
    per target (the stranger's own JSON report)."""
    import json

    cmd = ["nsenter", f"--net=/run/netns/{netns}", sys.executable, "-m",
           "dpmigrate.drill.stranger", "--seconds", str(seconds), "--flood", str(flood),
           *targets]  # fmt: skip
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30,
                              check=False)  # fmt: skip
    except subprocess.TimeoutExpired as err:
        raise FaultError(f"the strangers did not stop within {seconds + 30:.0f} s") from err
    if done.returncode != 0:
        raise FaultError(f"the strangers failed: {done.stderr.strip()[-500:]}")
    return dict(json.loads(done.stdout))
