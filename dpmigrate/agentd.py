"""The agent program: `dpmigrate agent`, or ``python -m dpmigrate.agentd --node NAME ...``.

It is the composition root (DESIGN.md §2, §7): it builds the runtime's agent core
(:class:`~dpmigrate.runtime.agent.Agent`) and registers on it the services that sit above the
runtime — checkpoint and migration (:mod:`dpmigrate.migrate.agent_service`) — so that the
runtime never imports them and the agent stays the only process of its node that runs CRIU.
The environment is read here, once, and passed on as values: the log level (its event
stream), the token, the state dir, etcd's settings, the criu binary.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

from dpmigrate import config
from dpmigrate.cluster import nodefs
from dpmigrate.cluster.store import EtcdSettings, Store, StoreUnavailable
from dpmigrate.errors import ConfigError
from dpmigrate.eventlog import EventLog
from dpmigrate.migrate import agent_service
from dpmigrate.runtime import failover
from dpmigrate.runtime.agent import ABSTRACT_NAME, Agent
from dpmigrate.runtime.node_store import NodeStore

#: How long a starting agent waits for etcd before it gives up.
_STORE_JOIN_TIMEOUT_S = 30.0


def build(
    node: str,
    token: str,
    run_dir: Path,
    address: str = "127.0.0.1",
    store: NodeStore | None = None,
    *,
    log: EventLog | None = None,
    criu: str | None = None,
) -> Agent:
    """An agent with every service registered, not yet listening. ``log``: its event stream
    (default: stdout at info); ``criu``: the criu binary (default: where scripts/setup puts
    it — :func:`main` passes ``DPMIGRATE_CRIU``)."""
    agent = Agent(node, token, run_dir, address, store, log)
    agent_service.register(agent, criu or config.Config.from_env({}).criu)
    agent.services.append(failover.register(agent))
    return agent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpmigrate agent")
    parser.add_argument("--node", required=True)
    parser.add_argument("--socket", help="unix socket file for the CLI (in the node's folder "
                        "when --isolate: a name there)")  # fmt: skip
    parser.add_argument("--listen", help="HOST:PORT for other agents")
    parser.add_argument("--etcd", help="etcd endpoints (default: DPMIGRATE_ETCD; none: no store)")
    parser.add_argument(
        "--isolate",
        action="store_true",
        help="see only this node's folder of the state dir (a local cluster's node)",
    )
    args = parser.parse_args(argv)
    try:
        cfg = config.load()
    except ConfigError as err:  # one line, as the CLI says it
        print(f"dpmigrate agent: {err}", file=sys.stderr)
        return 2
    log = EventLog(cfg.log_level, node=args.node)
    if not cfg.token:
        print("dpmigrate agent: DPMIGRATE_TOKEN is not set; every agent of a cluster needs the "
              "cluster token", file=sys.stderr)  # fmt: skip
        return 2
    # First, while this process has one thread: the node's own view of the filesystem.
    base = nodefs.isolate(cfg.state_dir, args.node) if args.isolate else Path(cfg.state_dir)
    address = args.listen.rpartition(":")[0] if args.listen else "127.0.0.1"
    endpoints = args.etcd or cfg.etcd
    store = None
    if endpoints:
        settings = EtcdSettings.parse(endpoints, cfg.etcd_ca, cfg.etcd_cert, cfg.etcd_key)
        member = {"node": args.node, "address": address, "agent": args.listen or "",
                  "pid": os.getpid(), "since": time.time()}  # fmt: skip
        store = NodeStore(Store(settings), args.node, member, cfg.node_ttl, log)
    agent = build(args.node, cfg.token, base, address, store, log=log, criu=cfg.criu)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=agent.shutdown).start())
    signal.signal(signal.SIGINT, lambda *_: threading.Thread(target=agent.shutdown).start())
    try:
        agent.store.start(timeout=_STORE_JOIN_TIMEOUT_S)
    except StoreUnavailable as err:
        log("agent failed", level="error", error=str(err))
        return 1
    agent.readopt()  # the stages an earlier agent of this node left running
    for service in agent.services:
        service.start()
    agent.listen(ABSTRACT_NAME)
    if args.socket:
        agent.listen(str(base / args.socket) if args.isolate else args.socket)
    if args.listen:
        agent.listen(args.listen)
    log("agent started", pid=os.getpid(), operations=agent.operations.names())
    agent.run()
    log("agent stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
