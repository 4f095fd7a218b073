"""TLS on tcp rings (the ``tls`` option; ``ring_tls`` in a cluster): every conformance check
passes over TLS, with peer processes too; a peer without a certificate of the cluster's CA —
plain TCP, or TLS from another CA — ends only its own connection; and the ring key still
proves which ring an end belongs to."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
from support import (
    checker_of,
    in_netns,
    paced_flows,
    reference_checker,
    stage_status,
    wait_for_input,
)

from dpmigrate.cluster import pki
from dpmigrate.errors import ConfigError
from dpmigrate.migrate import LocalCluster
from dpmigrate.runtime.manifest import App
from dpmigrate.runtime.multinode import MultiNodeRun
from dpmigrate.testing.conformance import BOUND_S, CHECKS, Harness
from dpmigrate.transports import tcp
from dpmigrate.transports.resolver import MemoryResolver

KEY = b"k" * 32


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ring-tls") / "pki"
    pki.make(folder, ("127.0.0.1",))
    return folder


def _contexts(folder: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    return (pki.ring_tls_context(folder, server_side=True),
            pki.ring_tls_context(folder, server_side=False))  # fmt: skip


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__.removeprefix("check_") for c in CHECKS])
def test_conformance_over_tls(tls_dir: Path, tmp_path: Path, check) -> None:
    harness = Harness("tcp", tmp_path, tls_dir=tls_dir)
    try:
        check(harness)
    finally:
        harness.close()


def _pair(folder: Path, resolver: MemoryResolver, name: str):
    server, client = _contexts(folder)
    tx = tcp.open_sender(name, resolver=resolver, capacity=256, key=KEY, tls=server)
    return tx, _consumer(tx, resolver, name, client)


def _consumer(tx: tcp.TcpSender, resolver: MemoryResolver, name: str, client: ssl.SSLContext):
    """A consumer of ``tx``'s ring, opened in a thread while the producer's loop runs."""
    box: dict[str, tcp.TcpReceiver] = {}

    def connect() -> None:
        box["rx"] = tcp.open_receiver(name, resolver=resolver, key=KEY, tls=client,
                                      connect_timeout=BOUND_S)  # fmt: skip

    thread = threading.Thread(target=connect)
    thread.start()
    while thread.is_alive():
        tx.service(0.01)
    return box["rx"]


def _deliver(tx: tcp.TcpSender, rx: tcp.TcpReceiver, msgs: list[bytes], burst: int) -> list[bytes]:
    """Send ``msgs`` while a thread receives them; what it got (bounded in rounds and time)."""
    got: list[bytes] = []

    def receive() -> None:
        for _ in range(400):
            if len(got) >= len(msgs):
                return
            got.extend(rx.recv_burst(burst, timeout=0.2))

    reader = threading.Thread(target=receive)
    reader.start()
    i = 0
    while i < len(msgs):
        i += tx.send_burst(msgs[i:], timeout=0.5)
    _serve_until_done(tx, reader)
    return got


def _serve_until_done(tx: tcp.TcpSender, reader: threading.Thread) -> None:
    """The producer's loop, as a stage runs it, while the consumer reads (bounded)."""
    deadline = time.monotonic() + BOUND_S
    while reader.is_alive() and time.monotonic() < deadline:
        tx.service(0.01)
    reader.join(1.0)


def test_large_messages_cross_tls_exactly_once(tls_dir: Path) -> None:
    """1 MiB messages: TLS writes that wait and are offered again, records that TLS holds
    decrypted while poll() sees nothing."""
    tx, rx = _pair(tls_dir, MemoryResolver(), "tls-large")
    try:
        sent = [bytes([i % 251]) * (1 << 20) for i in range(40)]
        assert _deliver(tx, rx, sent, 8) == sent
        assert isinstance(tx._conn, ssl.SSLSocket) and tx._conn.version() == "TLSv1.3"
    finally:
        rx.close()
        tx.close()


def test_strangers_without_the_cluster_ca_end_only_their_own_connection(
    tls_dir: Path, tmp_path: Path
) -> None:
    """Plain TCP speaking the ring protocol, TLS from another CA, and TLS that presents no
    certificate: each is dropped before any CHALLENGE, counted, and the real consumer, then
    connected, gets every message once."""
    resolver = MemoryResolver()
    server, _ = _contexts(tls_dir)
    tx = tcp.open_sender("tls-strangers", resolver=resolver, capacity=64, key=KEY, tls=server)
    host, port = tx.address.rsplit(":", 1)
    other = tmp_path / "other-ca"
    pki.make(other, ("127.0.0.1",))
    foreign = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    foreign.check_hostname = False
    foreign.verify_mode = ssl.CERT_NONE  # a stranger trusts anything, and shows its own cert
    theirs = pki.ring_files(other)
    foreign.load_cert_chain(theirs.cert, theirs.key)
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname = False
    anonymous.verify_mode = ssl.CERT_NONE
    seen: list[str] = []
    try:
        for who, ctx in (("plain", None), ("foreign", foreign), ("anonymous", anonymous)):
            raw = socket.create_connection((host, int(port)), timeout=5)
            sock = raw if ctx is None else ctx.wrap_socket(raw, do_handshake_on_connect=False)
            sock.setblocking(False)
            if ctx is None:
                sock.sendall(b"\x00" * 64)  # not a TLS ClientHello
            data = b""
            for _ in range(500):  # bounded: the producer answers within its handshake time
                tx.service(0.01)
                try:
                    if ctx is not None:
                        sock.do_handshake()
                    chunk = sock.recv(4096)
                except (ssl.SSLWantReadError, BlockingIOError):
                    continue
                except (ssl.SSLError, OSError) as err:
                    seen.append(f"{who}: {type(err).__name__}")
                    break
                if not chunk:
                    seen.append(f"{who}: closed")
                    break
                data += chunk
            sock.close()
            assert b"DPM" not in data and len(data) < 16, (who, data)  # no CHALLENGE reached it
        assert len(seen) == 3, seen
        assert tx.statistics().extra["rejected_connections"] >= 3
        rx = _consumer(tx, resolver, "tls-strangers", _contexts(tls_dir)[1])
        try:
            msgs = [b"m%d" % i for i in range(500)]
            assert _deliver(tx, rx, msgs, 64) == msgs
        finally:
            rx.close()
    finally:
        tx.close()


def test_a_context_that_does_not_verify_its_peer_is_refused(tls_dir: Path) -> None:
    lax = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    lax.verify_mode = ssl.CERT_NONE
    with pytest.raises(ConfigError, match="does not verify its peer"):
        tcp.open_sender("tls-lax", resolver=MemoryResolver(), tls=lax)
    with pytest.raises(ConfigError, match=r"ssl\.SSLContext"):
        tcp.open_sender("tls-lax", resolver=MemoryResolver(), tls="yes")
    with pytest.raises(ConfigError, match="cannot load"):
        tcp.tls_context("/nonexistent/ca.pem", "/x", "/y", server_side=True)


def test_a_cluster_with_ring_tls_runs_and_migrates_over_tls_only(
    cluster_state_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DPMIGRATE_RING_TLS=1 for `cluster up`: every tcp ring between nodes is TLS, a stage
    gets the rings' certificate from its agent (never from a file), a plain-TCP stranger at
    a ring's port gets nothing, and a stop-and-copy migration (CRIU) reconnects over TLS;
    lost = dup = 0 and the digest of an uninterrupted run."""
    monkeypatch.setenv("DPMIGRATE_RING_TLS", "1")
    app = App.load(paced_flows(tmp_path, 60000, rate=8000))
    expected = reference_checker(app)
    with LocalCluster(3) as cluster:
        run = MultiNodeRun(app, cluster)
        run.start()
        try:
            wait_for_input(run, 5000)
            rings = [r for s in run.status() for r in s.get("rings", [])]
            assert len(rings) == 4 and all(r["transport"] == "tcp" for r in rings), rings
            assert all(r["extra"]["tls"] for r in rings), rings
            with cluster.client("node1") as agent:
                endpoint = agent.call("lookup", ring="flows.table.out-check.in", timeout=5)
            host, _, port = endpoint["address"].rpartition(":")

            def plain_stranger() -> bytes:
                with socket.create_connection((host, int(port)), timeout=5) as s:
                    s.sendall(b"\x00" * 64)
                    s.settimeout(3)
                    try:
                        return s.recv(4096)
                    except OSError:
                        return b""

            answer = in_netns(cluster.node("node3").agent_pid, plain_stranger)
            assert b"DPM" not in answer and b"flows" not in answer, answer
            report = cluster.migrate("table", to="node3", strategy="stop-and-copy")
            assert not report.rolled_back, report.error
            assert stage_status(run)["node"] == "node3"
            moved = [r for s in run.status() for r in s.get("rings", []) if r["transport"] == "tcp"]
            assert moved and all(r["extra"]["tls"] for r in moved), moved
            assert run.wait(duration=120), run.status()
        finally:
            run.stop()
        final = run.status()
        assert checker_of(final) == {
            "received": 60000, "lost": 0, "duplicated": 0, "digest": expected["digest"],
        }  # fmt: skip
        run.cleanup()
