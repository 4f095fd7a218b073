"""Memory transfer for live migration: stop-and-copy through CRIU's page server, post-copy
through lazy pages (userfaultfd). The migration engine drives these through the node agents: the
source agent runs in the source node's network namespace, the destination agent in the
destination's (DESIGN.md §6). Between agents nothing else is shared: the small non-memory
images move as a sealed, verified bundle over the agents' own channel
(:mod:`dpmigrate.migrate.stage_transfer`); :func:`copy_images` below is for two folders that
one host sees, as in the sketches and this module's tests.

Stop-and-copy — memory goes straight into the destination's images folder, nothing of it
touches the source's disk::

    destination agent                                  source agent
    ps = PageServer(dst_images, address=DST_IP, netns=DST).start()
                                                       dump_to_page_server(pid, src_images,
                                                           ps.endpoint, netns=SRC,
                                                           leave_running=True)
    ps.wait(60)
    copy_images(src_images, dst_images)      # the non-memory images, a few KiB
    criu_rpc.restore(dst_images, netns=DST)
                                                       confirmed: kill the source by PID
                                                       failed: nothing to do, it runs

Post-copy — the stage runs on the destination at once, its pages follow::

    src = LazySource(pid, src_images, netns=SRC).start()       # frozen; serves pages
    copy_images(src_images, dst_images)
    dst = LazyDestination(dst_images, (SRC_IP, src.port), netns=DST).start()
    dst.restore()                                              # runs now, faults pull pages
    dst.wait_done(t); src.wait_done(t)                         # every page moved
    failed before the end: src.abort() FIRST (the source runs again), then dst.stop()

How CRIU 4.2.1 behaves here (measured on this machine, kernel 6.18, over RPC):

* ``PAGE_SERVER_CHLD`` forks the page server as a child of the swrk and answers once its
  socket listens, with its PID and port (port 0: the kernel's pick, reported). ``WAIT_PID``
  on the same socket returns its wait status; it exits 0 when the dump closes the connection.
  It accepts exactly one connection: never probe its port (that would be the "dump").
  It writes ``pagemap-*.img`` and ``pages-*.img`` only; every other image, ``stats-dump`` and
  the log stay in the source's folder (about 12 KiB of images for a small Python process).
* A dump with ``ps`` (page server) and ``leave_running=True`` works: the source is frozen
  for ``frozen_time``, then resumes (state ``S``), and CRIU removes its own nftables lock.
  Without ``leave_running`` CRIU kills the source and leaves its lock table (``CRIU-`` and
  the dump's run id) in the source namespace: remove that one with
  :func:`criu_rpc.remove_network_lock` and the result's ``criu_run_id``.
* A lazy dump (``opts.lazy_pages``) does not answer the DUMP request until the transfer is
  over. It writes every image but the lazy pages (the non-lazy pages — vdso and similar,
  ~1.8 MiB for Python — go to a local ``pages-*.img``), then the swrk itself becomes the page
  server and sends a ``status-ready`` notification (with ``notify_scripts``; the older
  ``status_fd`` also works but CRIU logs it as obsolete). It listens on *every* address of
  its namespace: ``ps.address`` is ignored for a lazy dump, only ``ps.port`` is used; with
  port 0 the chosen port is not reported over RPC, so :class:`LazySource` reads it from the
  swrk's socket table. The source stays ptrace-stopped (state ``t``) until the destination's
  ``lazy-pages`` daemon closes the connection; then CRIU kills it (or resumes it with
  ``leave_running=True`` — accepted and working) and answers the DUMP with success.
* **An EOF counts as success.** A TCP connect-and-close to the lazy page server makes CRIU log
  "Lazy pages transfer finished successfully" and kill the (not left running) source, pages
  never moved. So a destination ``lazy-pages`` daemon that dies or is stopped — whatever it
  had pulled — ends the source as if everything had arrived.

Rollback (can the source be resumed after a lazy dump if the destination fails?):

* Yes, while the lazy dump's criu is still waiting or serving: at that point the parasite is
  gone and the tasks are only held by ptrace. SIGKILL of that criu (our child, by its PID —
  :meth:`LazySource.abort`) detaches them: the source runs on with its memory intact (it was
  never written to), measured: counter advancing, checksum unchanged. Its nftables lock table
  stays and must be removed; ``abort`` does it.
* The order matters: abort the source *before* stopping the destination's daemon or killing
  the restored copy — either closes the page connection, which CRIU takes as success (above).
  Kill the restored copy right after: it must not run on without its source.
* Killing criu before ``status-ready`` (parasite inside the task) is not safe; ``start``
  does it only when criu has hung past ``ready_timeout``.
* Hence the default ``leave_running=True`` for :class:`LazySource`: CRIU then never kills the
  source, whatever the destination does; after the transfer the source is resumed (quiesced,
  so idle) and stays until the engine confirms the destination and kills it — the same
  contract as stop-and-copy. With ``leave_running=False`` the source ends with the transfer
  and the rollback window closes when the daemon disconnects.
* Stop-and-copy rolls back trivially: with ``leave_running=True`` the source is running
  again when the dump returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import pycriu.images
import pycriu.rpc_pb2 as rpc

from dpmigrate import config
from dpmigrate.checkpoint import criu_rpc
from dpmigrate.errors import CheckpointError, EnvironmentProblem

#: Seconds a page server or lazy-pages daemon may take to listen.
READY_TIMEOUT_S = 30.0
#: Default bound on a whole transfer (seconds): a page server waiting for its dump, a lazy
#: source waiting for its pages to be pulled.
TRANSFER_TIMEOUT_S = 300.0
#: Image files :func:`copy_images` moves: CRIU's images, not its logs or stats.
_IMAGE_SUFFIX = ".img"
#: Names the page server writes (memory); the source has none after a page-server dump.
_MEMORY_PREFIXES = ("pages-", "pagemap-")
#: Pagemap entry flags (CRIU's images/pagemap.proto).
_PE_LAZY = 1 << 1
_PE_PRESENT = 1 << 2


# --------------------------------------------------------------------------- stop-and-copy


class PageServer:
    """``criu page-server`` (over RPC, ``PAGE_SERVER_CHLD``) receiving a dump's memory into
    ``images_dir``.

    Why RPC and not the CLI: the answer carries the server's PID and the port it listens on
    (port 0 → the kernel picks one, no log parsing, no race on a pre-picked port), and it comes
    only once the socket listens, so ``start()`` returning means ready. The server is a child
    of a swrk we own; :meth:`wait` asks that swrk to reap it.

    ``netns``: a ``/run/netns/NAME`` path to listen inside (None: the caller's namespace).
    CRIU's log goes to ``log_dir/log_name`` (default: ``images_dir``).
    """

    def __init__(
        self,
        images_dir: str | os.PathLike[str],
        *,
        address: str,
        port: int = 0,
        netns: str | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        log_name: str = "page-server.log",
    ) -> None:
        self.images_dir = os.fspath(images_dir)
        self.address = address
        self.port = int(port)
        self.netns = netns
        self.log_dir = os.fspath(log_dir) if log_dir is not None else self.images_dir
        self.log_file = os.path.join(self.log_dir, log_name)
        self._log_name = log_name
        #: PID of the page server (a child of our swrk), once started.
        self.pid: int | None = None
        self._swrk: criu_rpc.Swrk | None = None
        self._done = False

    @property
    def endpoint(self) -> tuple[str, int]:
        """``(address, port)`` for :func:`dump_to_page_server`."""
        return self.address, self.port

    def start(self, timeout: float = READY_TIMEOUT_S) -> PageServer:
        """Start the server; returns when it listens. CheckpointError if CRIU refuses."""
        if not os.path.isdir(self.images_dir):
            raise CheckpointError(f"images folder {self.images_dir} does not exist")
        images_fd = criu_rpc.open_dir(self.images_dir)
        work_fd = criu_rpc.open_dir(self.log_dir) if self.log_dir != self.images_dir else None
        try:
            opts = rpc.criu_opts(images_dir_fd=images_fd)
            opts.log_level = criu_rpc.LOG_LEVEL
            opts.log_file = self._log_name
            if work_fd is not None:
                opts.work_dir_fd = work_fd
            opts.ps.address = self.address
            opts.ps.port = self.port
            self._swrk = criu_rpc.Swrk(netns=self.netns, timeout=timeout)
            req = rpc.criu_req(type=rpc.PAGE_SERVER_CHLD, opts=opts, keep_open=True)
            try:
                resp = self._swrk.request(req, timeout=timeout)
            except (TimeoutError, ConnectionError) as err:
                self.stop()
                raise criu_rpc.criu_failure("page-server", self.log_file, str(err)) from err
        finally:
            os.close(images_fd)
            if work_fd is not None:
                os.close(work_fd)
        if not resp.success or not resp.ps.pid:
            self.stop()
            raise criu_rpc.criu_failure("page-server", self.log_file, "criu refused to start it")
        self.pid, self.port = int(resp.ps.pid), int(resp.ps.port)
        return self

    def wait(self, timeout: float = TRANSFER_TIMEOUT_S) -> int:
        """Wait for the server to end after the dump; returns its exit code (0).

        A non-zero exit raises CheckpointError quoting its log. After ``timeout`` seconds the
        server is stopped and CheckpointError raised: its images are incomplete.
        """
        if self._swrk is None or self.pid is None or self._done:
            raise CheckpointError("the page server was not started (or was already waited for)")
        req = rpc.criu_req(type=rpc.WAIT_PID, pid=self.pid)
        try:
            resp = self._swrk.request(req, timeout=timeout)
        except (TimeoutError, ConnectionError) as err:
            self.stop()
            raise CheckpointError(
                f"the page server (pid {self.pid}) on {self.address}:{self.port} did not end "
                f"within {timeout:g} s ({err}); it was stopped and the images in "
                f"{self.images_dir} are incomplete (log: {self.log_file})",
                log_file=self.log_file,
            ) from err
        self._done = True
        self._swrk.close()
        if not resp.success:
            raise criu_rpc.criu_failure("page-server", self.log_file, "WAIT_PID failed")
        code = os.waitstatus_to_exitcode(resp.status)
        if code != 0:
            raise criu_rpc.criu_failure("page-server", self.log_file, f"exit status {code}")
        return code

    def stop(self) -> None:
        """End the server if it still runs (by its PID, checked to be our swrk's child) and
        the swrk. Idempotent; safe after :meth:`wait`."""
        swrk = self._swrk
        if swrk is None:
            return
        if not self._done and self.pid is not None and _parent_of(self.pid) == swrk.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self._done = True
        swrk.close()

    def __enter__(self) -> PageServer:
        return self if self.pid is not None else self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def dump_to_page_server(
    pid: int,
    images_dir: str | os.PathLike[str],
    page_server: tuple[str, int],
    *,
    netns: str | None = None,
    leave_running: bool = False,
    **dump_options: Any,
) -> criu_rpc.DumpResult:
    """Dump ``pid`` with its memory streamed to ``page_server`` (``PageServer.endpoint``).

    Only the small non-memory images land in ``images_dir`` (pass them on with
    :func:`copy_images`). ``leave_running=True``: the source resumes after ``frozen_time`` and
    can be taken back by doing nothing; CRIU removes its network lock then. Without it the
    source is killed and its lock table stays in ``netns`` (remove it with
    :func:`criu_rpc.remove_network_lock` and the result's ``criu_run_id``). Other options go
    to :func:`criu_rpc.dump`.
    """
    if netns is not None:  # our socket would live in the wrong namespace: let CRIU connect
        return criu_rpc.dump(
            pid, images_dir, netns=netns, leave_running=leave_running, page_server=page_server,
            **dump_options,
        )  # fmt: skip
    # CRIU corks the page-server connection when it opens it and sends its final close command
    # without uncorking, so that command sat out the kernel's 200 ms cork timeout inside every
    # freeze. Hand CRIU a connection of our own instead (``ps.fd``, inherited by the swrk) and
    # keep flushing it: setting TCP_NODELAY pushes pending output out even while corked.
    sock = socket.create_connection(page_server, timeout=10)
    try:
        sock.settimeout(None)  # CRIU shares this file description: it must stay blocking
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, _CRIU_SOCKET_MARK)  # passes the lock
        os.set_inheritable(sock.fileno(), True)
        stop = threading.Event()
        flusher = threading.Thread(target=_keep_flushing, args=(sock, stop), daemon=True)
        flusher.start()
        try:
            return criu_rpc.dump(
                pid, images_dir, netns=None, leave_running=leave_running,
                page_server=page_server, page_server_fd=sock.fileno(), **dump_options,
            )  # fmt: skip
        finally:
            stop.set()
            flusher.join(5)
    finally:
        sock.close()


#: The mark CRIU gives its own sockets; its nftables network lock lets them through.
_CRIU_SOCKET_MARK = 0xC114


def _keep_flushing(sock: socket.socket, stop: threading.Event) -> None:
    while not stop.wait(0.001):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            return


@dataclasses.dataclass
class CopiedImages:
    """What :func:`copy_images` moved."""

    files: list[str]
    bytes: int


def copy_images(
    source_dir: str | os.PathLike[str], dest_dir: str | os.PathLike[str]
) -> CopiedImages:
    """Copy CRIU's images (``*.img``) from the source's folder next to the pages in
    ``dest_dir``; logs and stats stay behind.

    Each file appears under its final name only when complete (copied to a hidden name, then
    renamed). A name that already exists in ``dest_dir`` is refused: it would mean the two
    folders hold different dumps (or a page-server dump wrote memory on the source).
    """
    src, dst = Path(source_dir), Path(dest_dir)
    if not dst.is_dir():
        raise CheckpointError(f"destination images folder {dst} does not exist")
    names = sorted(p.name for p in src.iterdir() if p.is_file() and p.name.endswith(_IMAGE_SUFFIX))
    if "inventory.img" not in names:
        raise CheckpointError(f"{src} holds no CRIU dump (no inventory.img)")
    clash = [name for name in names if (dst / name).exists()]
    if clash:
        raise CheckpointError(
            f"{', '.join(clash)} already in {dst}: the folders hold different dumps; "
            "use a fresh destination folder"
        )
    total = 0
    for name in names:
        partial = dst / f".{name}.partial"
        shutil.copyfile(src / name, partial)
        os.chmod(partial, 0o600)
        os.replace(partial, dst / name)
        total += (dst / name).stat().st_size
    return CopiedImages(files=names, bytes=total)


def images_bytes(folder: str | os.PathLike[str], *, memory_only: bool = False) -> int:
    """Bytes of CRIU images in ``folder`` (``memory_only``: ``pages-*``/``pagemap-*`` only) —
    what a dump wrote there."""
    total = 0
    for entry in Path(folder).iterdir():
        if entry.is_file() and entry.name.endswith(_IMAGE_SUFFIX):
            if memory_only and not entry.name.startswith(_MEMORY_PREFIXES):
                continue
            total += entry.stat().st_size
    return total


def pagemap_pages(folder: str | os.PathLike[str]) -> tuple[int, int]:
    """``(pages in pages-*.img, lazy pages left at the source)`` from the ``pagemap-*.img``
    images in ``folder`` (CRIU's PE_PRESENT and PE_LAZY flags)."""
    present = lazy = 0
    for path in sorted(Path(folder).glob("pagemap-*.img")):
        try:
            with open(path, "rb") as image:
                entries = pycriu.images.load(image).get("entries") or []
        except (OSError, pycriu.images.MagicException, ValueError) as err:
            raise CheckpointError(f"cannot decode {path}: {err}") from err
        for entry in entries[1:]:  # the first entry is the header (pages_id)
            flags, count = int(entry.get("flags", 0)), int(entry.get("nr_pages", 0))
            if flags & _PE_LAZY:
                lazy += count
            elif flags & _PE_PRESENT:
                present += count
    return present, lazy


# --------------------------------------------------------------------------- post-copy


class LazySource:
    """The source of a post-copy: a lazy dump whose criu then serves the pages over TCP.

    :meth:`start` returns once the page server listens (``status-ready``): the non-lazy images
    are in ``images_dir``, the process is frozen, :attr:`port` is known. The dump request
    runs on in a thread until the destination has pulled every page; :meth:`wait_done`
    returns its :class:`~dpmigrate.checkpoint.criu_rpc.DumpResult`. :meth:`abort` resumes the
    source (see the module docstring for why the order against the destination matters).

    ``leave_running`` defaults to True: CRIU treats any end of the page connection as success,
    so a source it may kill could be lost to a destination that died; left running, the
    source resumes (idle, quiesced) after the transfer and the engine kills it once the
    destination is confirmed. The server listens on every address of ``netns`` (CRIU ignores
    the address for a lazy dump); ``port`` 0 lets the kernel pick.
    """

    def __init__(
        self,
        pid: int,
        images_dir: str | os.PathLike[str],
        *,
        netns: str | None = None,
        port: int = 0,
        leave_running: bool = True,
        log_dir: str | os.PathLike[str] | None = None,
        log_name: str = "dump.log",
        timeout: float = TRANSFER_TIMEOUT_S,
        **dump_options: Any,
    ) -> None:
        self.pid = pid
        self.images_dir = os.fspath(images_dir)
        self.netns = netns
        self.port = int(port)
        self.leave_running = leave_running
        self.log_dir = os.fspath(log_dir) if log_dir is not None else self.images_dir
        self.log_name = log_name
        self.log_file = os.path.join(self.log_dir, log_name)
        self.timeout = timeout
        self._dump_options = dump_options
        self._swrk: criu_rpc.Swrk | None = None
        self._fds: list[int] = []
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._finished = threading.Event()
        self._answer: rpc.criu_resp | None = None
        self._error: BaseException | None = None
        self._started_at = self._finished_at = 0.0
        self._notified_at: dict[str, float] = {}
        self._wall = 0
        self._aborted = False
        #: Notifications criu sent, in order (``network-lock``, ``post-dump``, ...).
        self.notifications: list[str] = []

    def start(self, ready_timeout: float = READY_TIMEOUT_S) -> LazySource:
        """Dump without the lazy pages and serve them; returns when the server listens.

        CheckpointError if the dump fails first (the source then runs on: a failed dump
        resumes it) or criu is not ready within ``ready_timeout`` (criu is killed).
        """
        if self._thread is not None:
            raise CheckpointError("this LazySource was already started")
        if not os.path.isdir(self.images_dir):
            raise CheckpointError(f"images folder {self.images_dir} does not exist")
        images_fd = criu_rpc.open_dir(self.images_dir)
        self._fds.append(images_fd)
        work_fd = None
        if self.log_dir != self.images_dir:
            work_fd = criu_rpc.open_dir(self.log_dir)
            self._fds.append(work_fd)
        try:
            opts = criu_rpc.dump_opts(
                self.pid, images_fd, work_fd=work_fd, log_name=self.log_name,
                leave_running=self.leave_running, lazy_pages=True, **self._dump_options,
            )  # fmt: skip
            opts.ps.port = self.port
            opts.notify_scripts = True
            self._swrk = criu_rpc.Swrk(netns=self.netns, timeout=self.timeout)
        except BaseException:
            self._close_fds()
            raise
        req = rpc.criu_req(type=rpc.DUMP, opts=opts)
        self._started_at = time.monotonic()
        self._thread = threading.Thread(
            target=self._run, args=(req,), name=f"lazy-dump-{self.pid}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + ready_timeout
        while not self._ready.is_set():
            if self._finished.is_set():
                err = self._failure("the dump ended before serving pages")
                self._cleanup()
                raise err
            if time.monotonic() >= deadline:
                self.abort()
                raise CheckpointError(
                    f"criu did not serve the pages of {self.pid} within {ready_timeout:g} s; "
                    f"it was killed (log: {self.log_file})",
                    log_file=self.log_file,
                )
            self._ready.wait(0.02)
        if self.port == 0:
            self.port = _listening_port(self._swrk.pid, ready_timeout)
        return self

    def _run(self, req: rpc.criu_req) -> None:
        assert self._swrk is not None
        try:
            self._answer = self._swrk.request(req, on_notify=self._notified, timeout=self.timeout)
        except BaseException as err:  # reported by wait_done/start
            self._error = err
        finally:
            self._finished_at = time.monotonic()
            self._wall = int((self._finished_at - self._started_at) * 1e6)
            self._finished.set()

    def _notified(self, script: str) -> None:
        self.notifications.append(script)
        self._notified_at.setdefault(script, time.monotonic())
        if script == "status-ready":
            self._ready.set()

    @property
    def done(self) -> bool:
        """Whether the dump request has ended (every page pulled, or a failure)."""
        return self._finished.is_set()

    def wait_done(self, timeout: float = TRANSFER_TIMEOUT_S) -> criu_rpc.DumpResult:
        """Wait until every page was pulled and criu answered the dump; its DumpResult.

        CheckpointError when the dump failed, or when ``timeout`` passes first — the source
        then stays frozen and served: wait again, or :meth:`abort`.
        """
        if self._thread is None:
            raise CheckpointError("this LazySource was not started")
        if not self._finished.wait(timeout):
            raise CheckpointError(
                f"the pages of {self.pid} were not all pulled within {timeout:g} s; the source "
                "is still frozen: wait again, or abort() to resume it"
            )
        if self._aborted:
            raise CheckpointError(f"the post-copy of {self.pid} was aborted; the source runs on")
        ok = self._error is None and self._answer is not None and self._answer.success
        if not ok:
            err = self._failure("the lazy dump failed")
            self._cleanup()
            raise err
        self._cleanup()
        result = criu_rpc.dump_result(
            self.pid, self.images_dir, self.log_dir, self.log_file,
            leave_running=self.leave_running, total_time=self._wall, netns=self.netns,
        )  # fmt: skip
        if not result.pages_written and not result.pages_lazy:
            # The lazy page server resets CRIU's counters before it rewrites stats-dump; what
            # is left is not usable (a frozen_time longer than the whole call, measured).
            # Count the pages from the pagemaps, and time the freeze ourselves: it starts
            # right after the "pre-dump" notification and ends with the answer.
            result.pages_written, result.pages_lazy = pagemap_pages(self.images_dir)
            start = self._notified_at.get("pre-dump", self._started_at)
            result.frozen_time = int((self._finished_at - start) * 1e6)
        return result

    def _failure(self, what: str) -> CheckpointError:
        detail = what if self._error is None else f"{what}: {self._error}"
        return criu_rpc.criu_failure("dump --lazy-pages", self.log_file, detail)

    def abort(self) -> criu_rpc.LockRemoval:
        """Roll back: resume the source, whatever the destination did; returns what became of
        the dump's nftables lock table in the source's namespace (removed, or absent).

        While the dump still waits or serves, its criu (our child) is SIGKILLed: ptrace lets
        go of the frozen tasks and they run on with their memory intact. Call this *before*
        stopping the destination (module docstring). After the transfer ended there is
        nothing to resume unless ``leave_running`` (CheckpointError otherwise).
        """
        if self._thread is None:
            return criu_rpc.LockRemoval("", self.netns or "", "unknown", detail="never started")
        if not self._finished.is_set():
            self._aborted = True
            assert self._swrk is not None
            self._swrk.kill()
            self._thread.join(10.0)
        elif not self.leave_running and self._answer is not None and self._answer.success:
            self._cleanup()
            raise CheckpointError(
                f"the post-copy of {self.pid} had finished and CRIU ended the source; "
                "nothing to resume (use leave_running=True to keep a way back)"
            )
        self._cleanup()
        # The dump's own table only: from its inventory, or its log when it was cut short.
        run_id = criu_rpc.run_id(self.images_dir, self.log_file)
        return criu_rpc.remove_network_lock(self.netns, run_id=run_id)

    def stop(self) -> None:
        """Clean up; a dump still waiting or serving is aborted (the source resumes — never
        lost). Idempotent."""
        if self._thread is not None and not self._finished.is_set():
            self.abort()
        self._cleanup()

    def _cleanup(self) -> None:
        if self._swrk is not None:
            self._swrk.close()
        if self._thread is not None:
            self._thread.join(10.0)
        self._close_fds()

    def _close_fds(self) -> None:
        while self._fds:
            with contextlib.suppress(OSError):
                os.close(self._fds.pop())

    def __enter__(self) -> LazySource:
        return self if self._thread is not None else self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class LazyDestination:
    """The destination of a post-copy: ``criu lazy-pages`` plus a lazy restore.

    The daemon (CLI: CRIU has no RPC request for it) runs inside ``netns``, reads the images
    in ``images_dir`` (copied there with :func:`copy_images`), pulls pages from the source's
    page server at ``source=(address, port)`` and hands them to the restored process through
    userfaultfd — on its faults first, the rest in the background. :meth:`start` returns once
    it is ready (``--status-fd``); :meth:`restore` then restores with ``lazy_pages`` (the
    process runs at once); :meth:`wait_done` waits until every page is in. The daemon and the
    restore share the work folder ``log_dir`` (its ``lazy-pages.socket``).

    Stopping the daemon closes its page connection, which the source's CRIU takes as a
    finished transfer: abort the source first when rolling back (module docstring).
    """

    def __init__(
        self,
        images_dir: str | os.PathLike[str],
        source: tuple[str, int],
        *,
        netns: str | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        log_name: str = "lazy-pages.log",
    ) -> None:
        self.images_dir = os.fspath(images_dir)
        self.source = (source[0], int(source[1]))
        self.netns = netns
        self.log_dir = os.fspath(log_dir) if log_dir is not None else self.images_dir
        self.log_file = os.path.join(self.log_dir, log_name)
        self._log_name = log_name
        self._proc: subprocess.Popen[bytes] | None = None
        #: The restore's result, once :meth:`restore` succeeded.
        self.restored: criu_rpc.RestoreResult | None = None

    @property
    def daemon_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, ready_timeout: float = READY_TIMEOUT_S) -> LazyDestination:
        """Start ``criu lazy-pages``; returns when it is ready for the restore."""
        criu = config.load().criu
        if not os.access(criu, os.X_OK):
            raise EnvironmentProblem(
                f"criu not found or not executable at {criu}: run `scripts/setup` (as root) "
                "or set DPMIGRATE_CRIU"
            )
        for folder in (self.images_dir, self.log_dir):
            if not os.path.isdir(folder):
                raise CheckpointError(f"folder {folder} does not exist")
        read_end, write_end = os.pipe()
        cmd = [criu, "lazy-pages", "--page-server", "--address", self.source[0],
               "--port", str(self.source[1]), "-D", self.images_dir, "-W", self.log_dir,
               "-o", self._log_name, f"-v{criu_rpc.LOG_LEVEL}",
               "--status-fd", str(write_end)]  # fmt: skip
        if self.netns is not None:
            if not os.path.exists(self.netns):
                raise CheckpointError(f"network namespace {self.netns} does not exist")
            cmd = ["nsenter", f"--net={self.netns}", "--", *cmd]
        try:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, pass_fds=(write_end,), close_fds=True, cwd="/",
            )  # fmt: skip
        finally:
            os.close(write_end)
        try:
            ready, _, _ = select.select([read_end], [], [], ready_timeout)
            token = os.read(read_end, 1) if ready else b""
        finally:
            os.close(read_end)
        if token != b"\0":
            self.stop()
            why = "it exited" if ready else f"not ready within {ready_timeout:g} s"
            raise criu_rpc.criu_failure("lazy-pages", self.log_file, why)
        return self

    def restore(self, **restore_options: Any) -> criu_rpc.RestoreResult:
        """Restore from ``images_dir`` with lazy pages inside ``netns``; the process runs when
        this returns, its memory arriving as it goes. Options go to
        :func:`criu_rpc.restore` (``restore_sibling``, ``pidfile``, ...)."""
        if self._proc is None or self._proc.poll() is not None:
            raise CheckpointError("the lazy-pages daemon is not running; start() it first")
        self.restored = criu_rpc.restore(
            self.images_dir, netns=self.netns, lazy_pages=True, log_dir=self.log_dir,
            **restore_options,
        )  # fmt: skip
        return self.restored

    def wait_done(self, timeout: float = TRANSFER_TIMEOUT_S) -> None:
        """Wait until the daemon has moved every page and exited. CheckpointError (quoting its
        log) if it failed, or when ``timeout`` passes (it keeps running then)."""
        if self._proc is None:
            raise CheckpointError("the lazy-pages daemon was not started")
        try:
            code = self._proc.wait(timeout)
        except subprocess.TimeoutExpired as err:
            raise CheckpointError(
                f"criu lazy-pages (pid {self._proc.pid}) did not finish within {timeout:g} s "
                f"(log: {self.log_file})",
                log_file=self.log_file,
            ) from err
        if code != 0:
            raise criu_rpc.criu_failure("lazy-pages", self.log_file, f"exit status {code}")

    def stop(self) -> None:
        """Kill the daemon if it still runs (by its PID) and reap it. The restored process is
        the caller's. Idempotent."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(10)

    def __enter__(self) -> LazyDestination:
        return self if self._proc is not None else self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------- helpers


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _listening_port(pid: int, timeout: float) -> int:
    """The TCP port process ``pid`` listens on, from its own namespace's socket table — how a
    lazy dump's port-0 pick is learnt (CRIU reports it only in its log)."""
    deadline = time.monotonic() + timeout
    while True:
        inodes = set()
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
        ports = []
        for table in ("tcp", "tcp6"):
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                    fields = line.split()
                    if len(fields) > 9 and fields[3] == "0A" and fields[9] in inodes:
                        ports.append(int(fields[1].rsplit(":", 1)[1], 16))
        if len(ports) == 1:
            return ports[0]
        if time.monotonic() >= deadline:
            raise CheckpointError(
                f"could not tell which port criu (pid {pid}) serves pages on: found {ports}"
            )
        time.sleep(0.01)
