"""What every drill must leave true, checked from what the product itself reports — never
from what the drill believes it did.

* exactly once, in order: the flows checker (examples/flows, ``Checker``) counts every
  per-source sequence gap as lost and every repeat as duplicated, and digests what it
  accepted in arrival order; a drill passes only with received = total, lost = dup = 0 and
  the digest of an uninterrupted in-process run of the same stream;
* state digest continuous: each migration's state digest after equals the one at the freeze;
  a migration that rolled back must have undone everything (no ``rollback_failures``);
* no stage left quiesced, failed or unfinished once the stream is over;
* the cluster clean afterwards: every agent answers, etcd answers, no nftables table, no tc
  qdisc of a drill, no ``CRIU-*`` network lock and no process but the agent left in any
  node's namespace once the drill's run is cleaned up.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from dpmigrate.errors import DpmigrateError
from dpmigrate.migrate.report import MigrationReport
from dpmigrate.runtime.cluster import LocalCluster


def checker(metrics: dict[str, Any], total: int, digest: str) -> list[str]:
    """Exactly once and in order, as the checker counted it."""
    broken = []
    if metrics.get("lost") != 0:
        broken.append(f"checker counted {metrics.get('lost')} lost")
    if metrics.get("duplicated") != 0:
        broken.append(f"checker counted {metrics.get('duplicated')} duplicated")
    if metrics.get("received") != total:
        broken.append(f"checker received {metrics.get('received')} of {total}")
    if metrics.get("digest") != digest:
        broken.append(f"checker digest {metrics.get('digest')} differs from an uninterrupted "
                      f"run's {digest}")  # fmt: skip
    return broken


def migration(report: MigrationReport, may_roll_back: bool) -> list[str]:
    """One migration: nothing lost or duplicated, the state digest kept; a rollback only where
    the drill's fault may cause one, and then complete."""
    where = f"migration {report.source} → {report.destination} ({report.strategy})"
    broken = []
    if report.lost not in (0, None) or report.duplicated not in (0, None):
        broken.append(f"{where}: lost {report.lost}, duplicated {report.duplicated}")
    if report.rolled_back:
        if not may_roll_back:
            broken.append(f"{where} rolled back: {report.error}")
        if report.rollback_failures:
            broken.append(f"{where}: rollback left undone: {'; '.join(report.rollback_failures)}")
    elif report.state_digest_before != report.state_digest_after:
        broken.append(f"{where}: state digest {report.state_digest_before} at the freeze, "
                      f"{report.state_digest_after} after")  # fmt: skip
    return broken


def stages_finished(stages: list[dict[str, Any]], expected: int) -> list[str]:
    """Every stage of the run finished; none is quiesced, failed or missing."""
    broken = []
    if len(stages) != expected:
        names = ", ".join(f"{s['name']}@{s.get('node')}" for s in stages)
        broken.append(f"{len(stages)} of {expected} stages report ({names or 'none'})")
    for s in stages:
        if s.get("failed") or s.get("phase") in ("quiesced", "failed"):
            broken.append(f"stage {s['name']} on {s.get('node')} is {s.get('phase')}"
                          f"{' (failed)' if s.get('failed') else ''}")  # fmt: skip
        elif not s.get("finished"):
            broken.append(f"stage {s['name']} on {s.get('node')} did not finish "
                          f"(phase {s.get('phase')}, in {s.get('msgs_in')})")  # fmt: skip
    return broken


def _netns_cmd(netns: str, *cmd: str) -> str:
    done = subprocess.run(["nsenter", f"--net=/run/netns/{netns}", *cmd], capture_output=True,
                          text=True, timeout=15, check=False)  # fmt: skip
    return done.stdout


def _netns_pids(netns: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True,
                          timeout=15, check=False)  # fmt: skip
    return [int(p) for p in done.stdout.split() if p.isdigit()]


def cluster_clean(cluster: LocalCluster) -> list[str]:
    """The shared cluster as the next drill needs it: healthy and without leftovers."""
    broken = []
    try:
        status = cluster.status()
    except DpmigrateError as err:
        return [f"cluster status failed: {err}"]
    for node in status["nodes"]:
        if not node["alive"]:
            broken.append(f"agent of {node['name']} (pid {node['agent_pid']}) does not answer"
                          f"{': ' + node['error'] if node['error'] else ''}")  # fmt: skip
    if not status["store"]["reachable"]:
        broken.append(f"etcd does not answer: {status['store'].get('error')}")
    for node in cluster.nodes:
        tables = _netns_cmd(node.netns, "nft", "-j", "list", "tables")
        try:
            names = [t["table"]["name"] for t in json.loads(tables or '{"nftables": []}')
                     ["nftables"] if "table" in t]  # fmt: skip
        except (json.JSONDecodeError, KeyError):
            names = [tables.strip()]
        if names:
            broken.append(f"{node.name}: nftables table(s) left: {', '.join(names)}")
        qdisc = _netns_cmd(node.netns, "tc", "qdisc", "show", "dev", "eth0")
        if "netem" in qdisc:
            broken.append(f"{node.name}: netem qdisc left on eth0: {qdisc.strip()}")
        link = _netns_cmd(node.netns, "ip", "-o", "link", "show", "eth0")
        if "state DOWN" in link:
            broken.append(f"{node.name}: eth0 is down")
        own = {node.agent_pid, node.keeper_pid}
        strays = [p for p in _netns_pids(node.netns) if p not in own]
        if strays:
            broken.append(f"{node.name}: processes left besides the agent: {strays}")
    return broken
