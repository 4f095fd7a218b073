"""The agent program: `dpmigrate agent`, or ``python -m dpmigrate.agentd --node NAME ...``.

It is the composition root (DESIGN.md §2, §7): it builds the runtime's agent core
(:class:`~dpmigrate.runtime.agent.Agent`) and registers on it the services that sit above the
runtime — checkpoint and migration (:mod:`dpmigrate.migrate.agent_service`) — so that the
runtime never imports them and the agent stays the only process of its node that runs CRIU.
The environment is read here, once.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from dpmigrate import config
from dpmigrate.migrate import agent_service
from dpmigrate.runtime.agent import ABSTRACT_NAME, Agent, log


def build(
    node: str, token: str, run_dir: Path, peers: list[str], address: str = "127.0.0.1"
) -> Agent:
    """An agent with every service registered, not yet listening."""
    agent = Agent(node, token, run_dir, peers, address)
    agent_service.register(agent)
    return agent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpmigrate agent")
    parser.add_argument("--node", required=True)
    parser.add_argument("--socket", help="unix socket file for the CLI")
    parser.add_argument("--listen", help="HOST:PORT for other agents")
    parser.add_argument("--peers", default="", help="comma-separated HOST:PORT of peer agents")
    args = parser.parse_args(argv)
    cfg = config.load()
    if not cfg.token:
        print("dpmigrate agent: DPMIGRATE_TOKEN is not set; every agent of a cluster needs the "
              "cluster token", file=sys.stderr)  # fmt: skip
        return 2
    address = args.listen.rpartition(":")[0] if args.listen else "127.0.0.1"
    peers = [p for p in args.peers.split(",") if p]
    agent = build(args.node, cfg.token, Path(cfg.state_dir), peers, address)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=agent.shutdown).start())
    signal.signal(signal.SIGINT, lambda *_: threading.Thread(target=agent.shutdown).start())
    agent.listen(ABSTRACT_NAME)
    if args.socket:
        agent.listen(args.socket)
    if args.listen:
        agent.listen(args.listen)
    log("agent started", node=args.node, pid=os.getpid(), operations=agent.operations.names())
    agent.run()
    log("agent stopped", node=args.node)
    return 0


if __name__ == "__main__":
    sys.exit(main())
