"""The agent's read-only metrics endpoint: ``GET /metrics`` in Prometheus' text format.

It listens on the node's own address (the one its agent's ``--listen`` gives, inside the
node's network namespace for a local node) on ``DPMIGRATE_METRICS_PORT``. It serves one
thing, and nothing it receives changes anything: ``GET /metrics`` answers the scrape; any
other path is 404, any other method 405 (with ``Allow: GET``), a request larger than
:data:`MAX_REQUEST_BYTES` 414 (its request line) or 431 (its headers). Each request gets
:data:`TIMEOUT_S` to arrive whole; at most :data:`MAX_CLIENTS` are served at once and any
beyond are hung up on at once — so a slow or flooding client costs a few threads and
sockets, never the agent's control port or its stages. It runs in daemon threads, and a
failure in it (the port taken, a scrape that raises) is logged (and answered with 500),
never raised into the agent.

Why no authentication: what it shows is names and counts (apps, stages, rings, nodes,
messages, bytes, times) — no token, key, message content or state — and it accepts no
input. It listens only on the cluster network, which already carries the rings and the
state synchronization without encryption (README, Security: confidentiality is not
provided); anyone there can already see more than the metrics say. Prometheus scrapes plain
HTTP by default, and requiring a credential would mean handing the cluster token, or a
new secret, to the monitoring system. An operator who does not want it sets the port to 0.
"""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from dpmigrate.eventlog import EventLog

PATH = "/metrics"
#: The whole request (request line and headers) may be at most this long.
MAX_REQUEST_BYTES = 8192
#: Seconds a client gets to send its request (and to take the answer).
TIMEOUT_S = 5.0
#: Requests served at once; a connection beyond them is closed without a word.
MAX_CLIENTS = 4
#: After answering, what is left of a request (a body, an oversized header) is read and
#: dropped, up to this much, so that closing does not reset the connection before the client
#: read the answer (a close with unread input sends an RST).
MAX_DRAIN_BYTES = 256 * 1024
_DRAIN_TIMEOUT_S = 1.0
#: How long stop() waits for the serving thread to end.
_STOP_WAIT_S = 2.0


class _BoundedReader:
    """The request's input, cut off after ``limit`` bytes (then it reads as the end): the
    standard handler alone would take up to 100 headers of 64 KiB each."""

    def __init__(self, raw: Any, limit: int) -> None:
        self.raw = raw
        self.left = limit
        self.exceeded = False

    def readline(self, size: int = -1) -> bytes:
        if self.left <= 0:
            self.exceeded = True
            return b""
        want = self.left if size < 0 else min(size, self.left)
        line = self.raw.readline(want)
        self.left -= len(line)
        if self.left <= 0 and not line.endswith(b"\n"):
            self.exceeded = True
        return line

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            self.exceeded = True
            return b""
        data = self.raw.read(self.left if size < 0 else min(size, self.left))
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.raw.close()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = TIMEOUT_S
    server_version = "dpmigrate-metrics"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        self.bounded = _BoundedReader(self.rfile, MAX_REQUEST_BYTES)
        self.rfile = self.bounded  # type: ignore[assignment]

    def finish(self) -> None:
        super().finish()
        try:
            self.connection.shutdown(socket.SHUT_WR)  # the answer is complete
            self.connection.settimeout(_DRAIN_TIMEOUT_S)
            drained = 0
            while drained < MAX_DRAIN_BYTES:
                chunk = self.connection.recv(65536)
                if not chunk:
                    break
                drained += len(chunk)
        except OSError:
            pass  # the client left first: nothing to drain

    def parse_request(self) -> bool:
        if self.bounded.exceeded:  # the request line alone is longer than the bound
            self.command, self.requestline = None, ""
            self.request_version, self.close_connection = "HTTP/1.0", True
            self.send_error(414, "Request line too long")
            return False
        return super().parse_request()

    def __getattr__(self, name: str) -> Any:
        """Every method other than GET — the handler looks up ``do_<METHOD>`` — is refused
        the same way, including ones the standard handler would answer 501."""
        if name.startswith("do_"):
            return self._not_allowed
        raise AttributeError(name)

    def _too_large(self) -> bool:
        if self.bounded.exceeded:
            self.send_error(431, "Request too large")
            return True
        return False

    def _not_allowed(self) -> None:
        if self._too_large():
            return
        self.send_response(405)
        self.send_header("Allow", "GET")
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()

    def do_GET(self) -> None:
        if self._too_large():
            return
        if self.path.split("?", 1)[0] != PATH:
            self.send_error(404, f"Only {PATH} is served here")
            return
        try:
            body = generate_latest(self.server.registry)
        except Exception as err:  # a collector's bug: answer, log, keep serving
            self.server.log("metrics scrape failed", level="error",
                            error=f"{type(err).__name__}: {err}")  # fmt: skip
            self.send_error(500, "Collecting the metrics failed; see the agent's log")
            return
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_PLAIN_0_0_4)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Requests go to the agent's event stream at debug, not to stderr."""
        self.server.log("metrics request", level="debug", peer=self.client_address[0],
                        message=format % args)  # fmt: skip


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() must not wait for a slow client

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry,
                 log: EventLog) -> None:  # fmt: skip
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.registry = registry
        self.log = log
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # busy: hang up rather than queue
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that vanished or dawdled: nothing to do but say so, quietly."""
        self.log("metrics request failed", level="debug", peer=str(client_address[0]))


class MetricsServer:
    """The endpoint's life: :meth:`start` binds and serves in a daemon thread (a bind that
    fails is logged; the agent runs on without metrics), :meth:`stop` closes it."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, log: EventLog) -> None:
        self.host = host
        self.port = port
        self.registry = registry
        self.log = log
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{PATH}"

    def start(self) -> bool:
        """Whether it now serves."""
        try:
            self._server = _Server((self.host, self.port), self.registry, self.log)
        except OSError as err:
            self.log("metrics not served", level="error", address=f"{self.host}:{self.port}",
                     error=str(err), fix="free the port or set DPMIGRATE_METRICS_PORT "
                     "(0: off)")  # fmt: skip
            return False
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={
            "poll_interval": 0.2}, name="metrics-http", daemon=True)  # fmt: skip
        self._thread.start()
        self.log("metrics listening", url=self.url)
        return True

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._server = None
        # shutdown() waits until serve_forever returns: bound that wait, whatever happens
        threading.Thread(target=server.shutdown, daemon=True).start()
        thread.join(_STOP_WAIT_S)
        server.server_close()
        self.log("metrics stopped", url=self.url)
