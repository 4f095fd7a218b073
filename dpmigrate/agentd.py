"""The agent program: `dpmigrate agent`, or ``python -m dpmigrate.agentd --node NAME ...``.

It is the composition root (DESIGN.md §2, §7): it builds the runtime's agent core
(:class:`~dpmigrate.runtime.agent.Agent`) and registers on it the services that sit above the
runtime — checkpoint and migration (:mod:`dpmigrate.migrate.agent_service`) — so that the
runtime never imports them and the agent stays the only process of its node that runs CRIU.
The environment is read here, once, and passed on as values: the log level (its event
stream), the token, the state dir, etcd's settings, the criu binary, the metrics port.

With ``--keep`` the program is instead the agent's keeper
(:mod:`dpmigrate.runtime.agent_keeper`): it runs the agent, with the same arguments, as its
child and restarts it when it dies. So that the keeper stays a small process, this module
imports the agent and its services only where the agent itself is built.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dpmigrate import config
from dpmigrate.cluster import pki
from dpmigrate.errors import ConfigError, EnvironmentProblem
from dpmigrate.eventlog import EventLog

if TYPE_CHECKING:
    from dpmigrate.runtime.agent import Agent
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
    metrics_port: int = 0,
    ring_tls: pki.TlsFiles | None = None,
) -> Agent:
    """An agent with every service registered, not yet listening. ``log``: its event stream
    (default: stdout at info); ``criu``: the criu binary (default: where scripts/setup puts
    it — :func:`main` passes ``DPMIGRATE_CRIU``); ``metrics_port``: where it serves its
    Prometheus metrics, on ``address`` (0: not served — :func:`main` passes
    ``DPMIGRATE_METRICS_PORT``)."""
    from dpmigrate.migrate import agent_service
    from dpmigrate.runtime import failover, metrics
    from dpmigrate.runtime.agent import Agent

    agent = Agent(node, token, run_dir, address, store, log)
    agent.ring_tls = ring_tls  # handed to this node's stages when the rings run over TLS
    agent_service.register(agent, criu or config.Config.from_env({}).criu)
    agent.services.append(failover.register(agent))
    agent.services.append(metrics.register(agent, metrics_port))
    return agent


def main(argv: list[str] | None = None) -> int:
    # no abbreviations: the keeper removes its own options from argv by their exact spelling
    parser = argparse.ArgumentParser(prog="dpmigrate agent", allow_abbrev=False)
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
    parser.add_argument(
        "--isolated",
        action="store_true",
        help="as --isolate, in the view that this agent's keeper already made (the keeper "
        "passes it to the agent)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="run a keeper that starts the agent as its child and restarts it when it dies "
        "(a signal or a non-zero status; at most 5 times in 60 s)",
    )
    parser.add_argument("--keep-file", help="with --keep: where the keeper writes its state "
                        "(its PID, the agent's PID, restarts; a name in the node's folder when "
                        "--isolate)")  # fmt: skip
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(raw)
    try:
        cfg = config.load()
    except ConfigError as err:  # one line, as the CLI says it
        print(f"dpmigrate agent: {err}", file=sys.stderr)
        return 2
    log = EventLog(cfg.log_level, node=args.node)
    if args.keep:
        return _keep(args, raw, cfg, log)
    if args.keep_file:
        parser.error("--keep-file needs --keep")
    return _agent(args, cfg, log)


def _keep(args: argparse.Namespace, argv: Sequence[str], cfg: config.Config, log: EventLog) -> int:
    """The keeper (:mod:`dpmigrate.runtime.agent_keeper`): this program again, without the
    keeper's options, as its child. Imports nothing of the agent: it stays small.

    With ``--isolate`` the keeper makes the node's mount namespace itself, and every agent it
    starts lives in that one (``--isolated``): the stages an agent leaves running when it dies
    live there too, and CRIU, run by the next agent, must share their mount namespace to dump
    them (DESIGN.md §4, dpmigrate.cluster.nodefs). A new namespace per agent would make every
    re-adopted stage impossible to migrate ("doesn't have a proper root mount")."""
    from dpmigrate.runtime import agent_keeper

    keep_file = args.keep_file
    if args.isolate:
        from dpmigrate.cluster import nodefs

        try:
            base = nodefs.isolate(cfg.state_dir, args.node)  # one thread so far, as it needs
        except EnvironmentProblem as err:
            log("agent keeper failed", level="error", error=str(err))
            return 2
        keep_file = str(base / keep_file) if keep_file else None
    child = agent_keeper.agent_command(_agent_options(argv))
    return agent_keeper.Keeper(child, keep_file, log).run()


def _agent_options(argv: Sequence[str]) -> list[str]:
    """The keeper's ``argv`` for its agent: without ``--keep`` and ``--keep-file [=]PATH``,
    and ``--isolate`` (done by the keeper) as ``--isolated``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--keep-file":
            skip = True
        elif arg == "--isolate":
            out.append("--isolated")
        elif arg != "--keep" and not arg.startswith("--keep-file="):
            out.append(arg)
    return out


def _agent(args: argparse.Namespace, cfg: config.Config, log: EventLog) -> int:
    """The agent itself, in this process."""
    from dpmigrate.cluster import nodefs
    from dpmigrate.cluster.store import EtcdSettings, Store, StoreUnavailable
    from dpmigrate.runtime.agent import ABSTRACT_NAME
    from dpmigrate.runtime.node_store import NodeStore

    if not cfg.token:
        print("dpmigrate agent: DPMIGRATE_TOKEN is not set; every agent of a cluster needs the "
              "cluster token", file=sys.stderr)  # fmt: skip
        return 2
    # First, while this process has one thread: the node's own view of the filesystem.
    if args.isolate:
        base = nodefs.isolate(cfg.state_dir, args.node)
    elif args.isolated:  # the keeper's view, inherited
        base = nodefs.node_dir(cfg.state_dir)
    else:
        base = Path(cfg.state_dir)
    address = args.listen.rpartition(":")[0] if args.listen else "127.0.0.1"
    endpoints = args.etcd or cfg.etcd
    store = None
    if endpoints:
        settings = EtcdSettings.parse(endpoints, cfg.etcd_ca, cfg.etcd_cert, cfg.etcd_key)
        member = {"node": args.node, "address": address, "agent": args.listen or "",
                  "pid": os.getpid(), "since": time.time()}  # fmt: skip
        store = NodeStore(Store(settings), args.node, member, cfg.node_ttl, log)
    ring_tls = None
    if cfg.ring_tls:
        if not cfg.etcd_ca:
            print("dpmigrate agent: DPMIGRATE_RING_TLS=1 needs the cluster's CA "
                  "(DPMIGRATE_ETCD_CA; `cluster up` sets it)", file=sys.stderr)  # fmt: skip
            return 2
        ring_tls = pki.ring_files(Path(cfg.etcd_ca).parent)
    agent = build(args.node, cfg.token, base, address, store, log=log, criu=cfg.criu,
                  metrics_port=cfg.metrics_port, ring_tls=ring_tls)  # fmt: skip
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
    addresses = [ABSTRACT_NAME]
    if args.socket:
        addresses.append(str(base / args.socket) if args.isolate or args.isolated else args.socket)
    if args.listen:
        addresses.append(args.listen)
    for address in addresses:
        try:
            agent.listen(address)
        except OSError as err:  # e.g. the port is another program's: say so, in one line
            log("agent failed", level="error", error=f"cannot listen on {address}: "
                f"{err.strerror or err}; stop what holds it or choose another address")  # fmt: skip
            for service in agent.services:  # the node's stages run on: a later agent adopts them
                service.stop()
            agent.store.stop()
            return 1
    log("agent started", pid=os.getpid(), operations=agent.operations.names())
    agent.run()
    log("agent stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
