"""One etcd member, as the local cluster's embedded store (Debian 12's etcd 3.4).

scripts/setup unpacks Debian's ``etcd-server`` into the private prefix (no system service is
installed or started). The member listens only on the address it is given — for the local
cluster an address on the cluster's own bridge, inside the hub's network namespace — and keeps
its data in a folder of the state dir that the cluster records and removes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from dpmigrate.cluster.pki import TlsFiles
from dpmigrate.errors import EnvironmentProblem

CLIENT_PORT = 2379
PEER_PORT = 2380


def binary(prefix: str) -> str:
    """The etcd binary: the private prefix's, else one on PATH; a clear error if neither."""
    private = Path(prefix) / "etcd" / "bin" / "etcd"
    if private.exists():
        return str(private)
    found = shutil.which("etcd")
    if found:
        return found
    raise EnvironmentProblem(
        f"etcd is not installed ({private} is missing); run scripts/setup, which unpacks "
        "Debian 12's etcd-server there"
    )


def command(
    etcd: str, data_dir: str, host: str, client_port: int = CLIENT_PORT,
    peer_port: int = PEER_PORT, name: str = "dpmigrate", tls: TlsFiles | None = None,
) -> list[str]:  # fmt: skip
    """The command line of a one-member cluster listening only on ``host``.

    ``tls``: the server's files; clients must then present a certificate of the same CA
    (mutual TLS). The peer port of a one-member cluster talks to nobody: loopback only."""
    scheme = "https" if tls else "http"
    client, peer = f"{scheme}://{host}:{client_port}", f"http://127.0.0.1:{peer_port}"
    secured = [
        "--cert-file", tls.cert, "--key-file", tls.key, "--trusted-ca-file", tls.ca,
        "--client-cert-auth",
    ] if tls else []  # fmt: skip
    return [*_member(etcd, data_dir, name, client, peer), *secured]


def _member(etcd: str, data_dir: str, name: str, client: str, peer: str) -> list[str]:
    return [
        etcd, "--name", name, "--data-dir", data_dir,
        "--listen-client-urls", client, "--advertise-client-urls", client,
        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"{name}={peer}", "--initial-cluster-state", "new",
        "--initial-cluster-token", f"dpmigrate-{os.path.basename(data_dir)}",
        # small and quick: a local member on a 2-core machine, not a production quorum
        "--heartbeat-interval", "50", "--election-timeout", "500",
        "--snapshot-count", "10000", "--quota-backend-bytes", str(256 << 20),
        "--auto-compaction-mode", "revision", "--auto-compaction-retention", "10000",
        "--log-level", "warn", "--logger", "zap",
    ]  # fmt: skip


def spawn(
    cmd: list[str], log_path: str, prefix: list[str] | None = None
) -> subprocess.Popen[bytes]:
    """Start the member (``prefix`` may be an nsenter into the namespace it belongs in)."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        return subprocess.Popen(
            [*(prefix or []), *cmd], stdin=subprocess.DEVNULL, stdout=fd, stderr=fd,
            close_fds=True, start_new_session=True, env={"PATH": os.environ.get("PATH", "")},
        )  # fmt: skip
    finally:
        os.close(fd)
