"""CRIU dump and restore over RPC (pycriu, ``criu swrk``): the one place that drives CRIU.

Why RPC and not the CLI: the request is a typed protobuf and the answer (success, the restored
PID) comes back on a socket, so nothing depends on parsing CRIU's human output (DESIGN.md §4).
Only the *reasons* of a failure still come from CRIU's log, which is why every failure here is
one :class:`~dpmigrate.errors.CheckpointError` that quotes the log's error lines and names the
log file, which is kept.

Facts this module is built around (measured here, DESIGN.md §4):

* criu is run through the configured binary (``DPMIGRATE_CRIU``; a wrapper running CRIU 4.2
  through a private loader). To run it inside a network namespace, a per-call wrapper does
  ``nsenter --net=PATH -- <criu> "$@"`` — not ``ip netns exec``, which adds a mount namespace.
  CRIU needs ``lo`` up in the namespace it runs in.
* A dump with ``network_lock="nftables"`` locks the network with an nftables table of its
  own, ``inet CRIU-<run id>`` (CRIU's ``criu/netfilter.c``, ``nftables_get_table``): in the
  namespace of the dumped tree when it has its own, else in the namespace CRIU runs in (there
  the table only drops the tree's TCP connections). The run id is a UUID CRIU makes for each
  RPC session (``util_init``; the caller cannot choose it) and records in the dump's
  ``inventory.img`` (``dump_criu_run_id``) and log (``CRIU run id = ...``). CRIU removes the
  table itself after a failed dump and after one with ``leave_running``; after any other it
  stays, for the restore to remove. Call :func:`remove_network_lock` with that run id once the
  dumped process is done with the namespace — it removes exactly that table, never another.
* A restore with ``restore_sibling=True`` (the default) makes the restored root a *child of
  the calling process* (CLONE_PARENT). CRIU also restores the task's parent-death signal: a
  process started by ``unshare --kill-child`` (as the supervisor starts stages) is SIGKILLed
  when its new parent — the caller — exits. A caller that wants the restored tree to outlive
  it uses :mod:`dpmigrate.checkpoint.keeper`, which restores from a small long-lived parent.
* No soft-dirty tracking on this kernel: ``track_mem`` (and pre-dump) fail here. Post-copy
  (``lazy_pages``) works and needs ``/proc/sys/fs/pipe-max-size`` >= 4194304.
* Every criu run logs "Can't setup RLIMIT_NOFILE" (and "kdat cache" notes) and still succeeds;
  these lines are never quoted as the reason of a failure.

Times in the results are microseconds, as CRIU reports them in its stats images (so the
names match CRIU's own: ``frozen_time``, ``pages_written``, ...).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pycriu
import pycriu.images
import pycriu.rpc_pb2 as rpc

from dpmigrate import config
from dpmigrate.checkpoint.criu_binary import HARMLESS_LINES
from dpmigrate.errors import CheckpointError, DpmigrateError, EnvironmentProblem

#: pycriu's module (the package re-exports the class `criu` under the same name).
_pycriu_criu = importlib.import_module("pycriu.criu")

#: CRIU log verbosity: 4 (debug) gives the context lines that make an error understandable.
LOG_LEVEL = 4
#: Default bound on one CRIU call (seconds); a hung criu is killed after it.
DEFAULT_TIMEOUT_S = 300.0
#: At most this many lines of CRIU's log are quoted in an error message.
MAX_QUOTED_LINES = 8
#: Log lines that say "Error" but are not why a run failed: the RLIMIT/kdat notes of every
#: run, and nft complaining that the lock table it is asked to delete at unlock is not there.
_QUIET = (*HARMLESS_LINES, "Could not process rule: No such file or directory")

_NETWORK_LOCKS = {
    "nftables": rpc.NFTABLES,
    "iptables": rpc.IPTABLES,
    "skip": rpc.SKIP,
}


@dataclasses.dataclass
class DumpResult:
    """What one dump produced; times in microseconds (CRIU's stats-dump)."""

    pid: int
    images_dir: str
    log_file: str
    leave_running: bool
    #: Wall-clock time of the whole RPC call, microseconds (includes starting criu).
    total_time: int
    freezing_time: int = 0
    frozen_time: int = 0
    memdump_time: int = 0
    memwrite_time: int = 0
    pages_scanned: int = 0
    pages_skipped_parent: int = 0
    pages_written: int = 0
    pages_lazy: int = 0
    irmap_resolve: int = 0
    page_pipes: int = 0
    page_pipe_bufs: int = 0
    shpages_scanned: int = 0
    shpages_skipped_parent: int = 0
    shpages_written: int = 0
    #: CRIU's id of this dump run (inventory.img); its lock table is named after it.
    criu_run_id: str = ""
    #: The lock table this dump left in the namespace, as "FAMILY NAME" (none, or this
    #: dump's own: see :func:`network_lock_table`, :func:`remove_network_lock`).
    network_lock_tables: list[str] = dataclasses.field(default_factory=list)
    #: Why :attr:`network_lock_tables` could not be listed ("" when it could).
    network_lock_problem: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class RestoreResult:
    """What one restore produced; ``pid`` is the restored root as seen from the host."""

    pid: int
    images_dir: str
    log_file: str
    #: Wall-clock time of the whole RPC call, microseconds.
    total_time: int
    restore_time: int = 0
    forking_time: int = 0
    pages_restored: int = 0
    pages_compared: int = 0
    pages_skipped_cow: int = 0
    #: PID of the process that is the restored root's parent when it is not the caller
    #: (set by :mod:`dpmigrate.checkpoint.keeper`).
    keeper_pid: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- running criu


class _TimedBinComm(_pycriu_criu._criu_comm_bin):
    """pycriu's "exec the binary" transport with a receive timeout.

    pycriu blocks in ``recv`` forever; a criu that hangs (a process that cannot be frozen, a
    stuck page server) would hang the caller with it. With a socket timeout the call ends and
    :func:`_call` kills the criu it started, by PID.
    """

    def __init__(self, bin_path: str, timeout: float, enter: Sequence[str] = ()) -> None:
        super().__init__(bin_path)
        self._timeout = timeout
        self._enter = tuple(enter)

    def connect(self, daemon: bool) -> Any:
        sk = super().connect(daemon)
        sk.settimeout(self._timeout)
        # Before any request: the swrk idles on its socket, so what it forks later (a
        # restored tree) is born in these control groups. A failure ends the swrk we made.
        for procs in self._enter:
            try:
                with open(procs, "w") as f:
                    f.write(str(self.swrk))
            except OSError as err:
                _reap(self)
                raise CheckpointError(
                    f"cannot put criu swrk (pid {self.swrk}) into {procs}: {err.strerror}; "
                    "is that stage's control group still there (see `dpmigrate doctor`)?"
                ) from err
        return sk


@contextlib.contextmanager
def _criu_command(netns: str | None) -> Iterator[str]:
    """The executable pycriu should run: the configured criu, or a per-call wrapper that runs
    it inside ``netns`` (a ``/run/netns/NAME`` path) through ``nsenter --net``."""
    criu = config.load().criu
    if not os.access(criu, os.X_OK):
        raise EnvironmentProblem(
            f"criu not found or not executable at {criu}: run `scripts/setup` (as root) or set "
            "DPMIGRATE_CRIU"
        )
    if netns is None:
        yield criu
        return
    if not os.path.exists(netns):
        raise CheckpointError(
            f"network namespace {netns} does not exist; pass a /run/netns/NAME path of a "
            "namespace that is up (`ip netns list`)"
        )
    nsenter = shutil.which("nsenter")
    if nsenter is None:
        raise EnvironmentProblem("`nsenter` is missing; apt-get install util-linux")
    folder = tempfile.mkdtemp(prefix="dpmigrate-criu-")
    wrapper = os.path.join(folder, "criu-in-netns")
    try:
        with open(wrapper, "w") as out:
            out.write(f'#!/bin/sh\nexec {_sh(nsenter)} --net={_sh(netns)} -- {_sh(criu)} "$@"\n')
        os.chmod(wrapper, stat.S_IRWXU)
        yield wrapper
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _sh(text: str) -> str:
    """Single-quote ``text`` for /bin/sh."""
    return "'" + text.replace("'", "'\\''") + "'"


def open_dir(path: str) -> int:
    """An inheritable O_DIRECTORY descriptor: criu swrk receives it by number."""
    fd = os.open(path, os.O_DIRECTORY | os.O_RDONLY)
    os.set_inheritable(fd, True)
    return fd


def _call(
    action: str,
    opts: rpc.criu_opts,
    *,
    netns: str | None,
    log_file: str,
    timeout: float,
    enter: Sequence[str] = (),
) -> Any:
    """Send one request (``action`` is "dump" or "restore"); CRIU failures → CheckpointError.
    ``enter``: cgroup.procs files the swrk is put in before the request."""
    with _criu_command(netns) as command:
        client = pycriu.criu()
        comm = _TimedBinComm(command, timeout, enter)
        client._comm = comm  # pycriu has no public hook for a transport with a timeout
        client.opts.MergeFrom(opts)
        try:
            return getattr(client, action)()
        except _pycriu_criu.CRIUException as err:
            _reap(comm)
            detail = str(err)
            if "timed out" in detail:
                detail = f"criu did not answer within {timeout:g} s and was killed"
            raise criu_failure(action, log_file, detail) from err


def _reap(comm: _TimedBinComm) -> None:
    """After a failed call: kill the criu swrk we started (by PID) if it still runs, reap it."""
    pid = comm.swrk
    if not pid:
        return
    with contextlib.suppress(OSError):
        comm.sk.close()
    with contextlib.suppress(ChildProcessError, ProcessLookupError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


class Swrk:
    """A ``criu swrk`` of our own, for requests that outlast one call or take several messages.

    Why not :func:`_call`: pycriu sends one request and reads one answer, which fits dump and
    restore. Two requests do not fit it: a page server started with ``PAGE_SERVER_CHLD`` is a
    child of the swrk and is waited for later with ``WAIT_PID`` on the same socket; a lazy
    dump answers only when its pages are all pulled, and says that it is ready on the way
    with a ``status-ready`` notification that must be acknowledged. This class keeps the
    socket, answers notifications, and knows the swrk's PID so that the caller can end it —
    by that PID, and only while it is still its unreaped child.

    The swrk is our child (pycriu forks it); ``netns`` runs it inside that namespace (the
    ``nsenter`` wrapper execs criu, so the PID stays the swrk's).
    """

    def __init__(self, *, netns: str | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self._stack = contextlib.ExitStack()
        command = self._stack.enter_context(_criu_command(netns))  # kept until close()
        self._comm = _TimedBinComm(command, timeout)
        self.timeout = timeout
        try:
            self._sk = self._comm.connect(False)
        except BaseException:
            self._stack.close()
            raise
        #: PID of the criu swrk (our child).
        self.pid: int = int(self._comm.swrk)
        self._reaped = False
        self.status: int | None = None

    def send(self, req: rpc.criu_req) -> None:
        self._sk.send(req.SerializeToString())

    def receive(self, timeout: float | None = None) -> rpc.criu_resp:
        """One message from criu; ``TimeoutError`` after ``timeout`` seconds (default: the
        session's), ``ConnectionError`` when criu closed the socket."""
        self._sk.settimeout(self.timeout if timeout is None else timeout)
        try:
            size = len(self._sk.recv(1, socket.MSG_TRUNC | socket.MSG_PEEK))
            if size == 0:
                raise ConnectionError("criu closed its RPC socket")
            data = self._sk.recv(size)
        except TimeoutError:
            raise
        except OSError as err:
            raise ConnectionError(f"criu RPC socket: {err}") from err
        resp = rpc.criu_resp()
        resp.ParseFromString(data)
        return resp

    def request(
        self,
        req: rpc.criu_req,
        *,
        on_notify: Callable[[str], None] | None = None,
        timeout: float | None = None,
    ) -> rpc.criu_resp:
        """Send ``req`` and return criu's answer. Notifications (``opts.notify_scripts``) on
        the way are passed to ``on_notify(script name)`` and acknowledged. ``timeout``
        bounds the whole exchange."""
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        self.send(req)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"criu did not answer within {limit:g} s")
            resp = self.receive(left)
            if resp.type != rpc.NOTIFY:
                return resp
            if on_notify is not None:
                on_notify(resp.notify.script)
            self.send(rpc.criu_req(type=rpc.NOTIFY, notify_success=True))

    def alive(self) -> bool:
        """Whether the swrk still runs (reaps it when it has ended)."""
        if self._reaped:
            return False
        try:
            done, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            self._reaped = True
            return False
        if done == 0:
            return True
        self._reaped, self.status = True, status
        return False

    def kill(self) -> None:
        """SIGKILL the swrk (our child, not yet reaped) and reap it."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self._wait(10.0)

    def _wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self, grace: float = 5.0) -> None:
        """Close the socket; the swrk then ends by itself — killed if it has not after
        ``grace`` seconds. Idempotent."""
        with contextlib.suppress(OSError):
            self._sk.close()
        if not self._wait(grace):
            self.kill()
        self._stack.close()


def criu_failure(action: str, log_file: str, detail: str = "") -> CheckpointError:
    """The one error for a failed CRIU call: quotes the log's error lines, names the log."""
    lines = error_lines(log_file)
    return _failure(action, log_file, lines, detail)


def _failure(action: str, log_file: str, lines: tuple[str, ...], detail: str) -> CheckpointError:
    if lines:
        quoted = " | ".join(lines)
        why = f" ({detail})" if detail else ""
        message = f"criu {action} failed{why}: {quoted} (full log: {log_file})"
    elif os.path.exists(log_file):
        message = f"criu {action} failed ({detail}); no error line in its log {log_file}"
    else:
        message = f"criu {action} failed ({detail}); criu wrote no log at {log_file}"
    return CheckpointError(message, log_file=log_file, log_lines=lines, detail=detail)


def relocated(err: CheckpointError, action: str, new_log: str) -> CheckpointError:
    """The same failure, naming the log at its new place (after the caller moved it)."""
    return _failure(action, new_log, err.log_lines, err.detail)


def error_lines(log_file: str, context: int = 1) -> tuple[str, ...]:
    """CRIU's "Error" lines (minus the harmless ones) with ``context`` lines before each."""
    try:
        with open(log_file, errors="replace") as log:
            text = log.read().splitlines()
    except OSError:
        return ()
    picked: list[int] = []
    for index, line in enumerate(text):
        if "Error" in line and not any(quiet in line for quiet in _QUIET):
            for i in range(max(0, index - context), index + 1):
                if i not in picked and not any(q in text[i] for q in _QUIET):
                    picked.append(i)
    if not picked:
        return ()
    picked = picked[-MAX_QUOTED_LINES:]  # the last errors are the ones that ended the run
    return tuple(text[i].strip() for i in picked)


# --------------------------------------------------------------------------- dump / restore


def dump(
    pid: int,
    images_dir: str | os.PathLike[str],
    *,
    leave_running: bool = False,
    netns: str | None = None,
    network_lock: str = "nftables",
    tcp_close: bool = False,
    tcp_established: bool = False,
    ext_unix_sk: bool = False,
    shell_job: bool = False,
    track_mem: bool = False,
    page_server: tuple[str, int] | None = None,
    page_server_fd: int | None = None,
    lazy_pages: bool = False,
    log_name: str = "dump.log",
    log_dir: str | os.PathLike[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> DumpResult:
    """Checkpoint the process tree rooted at ``pid`` (a host PID) into ``images_dir``.

    ``netns``: run criu inside this network namespace (``/run/netns/NAME``); use the
    namespace the process lives in when it is not the caller's. ``leave_running``: the tree
    goes on after the dump (else CRIU kills it once the images are written). ``tcp_close`` /
    ``tcp_established`` / ``ext_unix_sk`` / ``shell_job``: CRIU's options of the same names;
    without them CRIU refuses open TCP connections, unix sockets to outside the tree and a
    controlling terminal. ``page_server=(address, port)`` sends pages to a page server instead
    of the images folder; with ``lazy_pages`` pages stay behind for a post-copy restore (the
    tree stays frozen until every page is pulled, and this call returns only then: use
    :class:`dpmigrate.checkpoint.transfer.LazySource` for post-copy). ``track_mem`` needs
    soft-dirty, which this kernel lacks. CRIU's log goes to ``log_dir/log_name`` (default:
    ``images_dir``).

    Raises CheckpointError (quoting CRIU's log) on any CRIU failure. Afterwards, see
    :func:`remove_network_lock` for the nftables table the dump may leave.
    """
    _check_network_lock(network_lock)
    images = os.fspath(images_dir)
    logs = os.fspath(log_dir) if log_dir is not None else images
    log_file = os.path.join(logs, log_name)
    if not os.path.isdir(images):
        raise CheckpointError(f"images folder {images} does not exist; create it first")
    images_fd = open_dir(images)
    work_fd = open_dir(logs) if logs != images else None
    try:
        opts = dump_opts(
            pid, images_fd, work_fd=work_fd, log_name=log_name, leave_running=leave_running,
            network_lock=network_lock, tcp_close=tcp_close, tcp_established=tcp_established,
            ext_unix_sk=ext_unix_sk, shell_job=shell_job, track_mem=track_mem,
            page_server=page_server, page_server_fd=page_server_fd, lazy_pages=lazy_pages,
        )  # fmt: skip
        started = time.monotonic()
        _call("dump", opts, netns=netns, log_file=log_file, timeout=timeout)
        wall = int((time.monotonic() - started) * 1e6)
    finally:
        os.close(images_fd)
        if work_fd is not None:
            os.close(work_fd)
    return dump_result(pid, images, logs, log_file, leave_running=leave_running,
                       total_time=wall, netns=netns)  # fmt: skip


def dump_opts(
    pid: int,
    images_fd: int,
    *,
    work_fd: int | None = None,
    log_name: str = "dump.log",
    leave_running: bool = False,
    network_lock: str = "nftables",
    tcp_close: bool = False,
    tcp_established: bool = False,
    ext_unix_sk: bool = False,
    shell_job: bool = False,
    track_mem: bool = False,
    page_server: tuple[str, int] | None = None,
    page_server_fd: int | None = None,
    lazy_pages: bool = False,
) -> rpc.criu_opts:
    """The RPC options of a dump, as :func:`dump` sends them (``images_fd``/``work_fd``: open,
    inheritable directory descriptors, see :func:`open_dir`). Public for callers that run a
    dump request themselves over a :class:`Swrk` (a lazy dump that answers only at the end)."""
    _check_network_lock(network_lock)
    opts = _base_opts(
        images_fd, work_fd, log_name, tcp_close=tcp_close, tcp_established=tcp_established,
        ext_unix_sk=ext_unix_sk, shell_job=shell_job, track_mem=track_mem,
        lazy_pages=lazy_pages,
    )  # fmt: skip
    opts.pid = pid
    opts.leave_running = leave_running
    opts.network_lock = _NETWORK_LOCKS[network_lock]
    if page_server is not None:
        opts.ps.address, opts.ps.port = page_server[0], int(page_server[1])
    if page_server_fd is not None:  # a connection of ours, inherited by the swrk
        opts.ps.fd = page_server_fd
    return opts


def _base_opts(images_fd: int, work_fd: int | None, log_name: str, **flags: bool) -> rpc.criu_opts:
    """What dumps and restores share: folders, logging, and the boolean options that are on
    (an option left unset keeps CRIU's own default)."""
    opts = rpc.criu_opts(images_dir_fd=images_fd)
    opts.log_level = LOG_LEVEL
    opts.log_file = log_name
    if work_fd is not None:
        opts.work_dir_fd = work_fd
    for name, on in flags.items():
        if on:
            setattr(opts, name, True)
    return opts


def _check_network_lock(network_lock: str) -> None:
    if network_lock not in _NETWORK_LOCKS:
        raise CheckpointError(
            f"unknown network lock {network_lock!r}; use one of {', '.join(_NETWORK_LOCKS)}"
        )


def dump_result(
    pid: int,
    images_dir: str,
    log_dir: str,
    log_file: str,
    *,
    leave_running: bool,
    total_time: int,
    netns: str | None,
) -> DumpResult:
    """The :class:`DumpResult` of a finished dump: CRIU's stats, its run id and the lock
    tables it left in ``netns``."""
    result = DumpResult(
        pid=pid, images_dir=images_dir, log_file=log_file, leave_running=leave_running,
        total_time=total_time,
    )  # fmt: skip
    _fill(result, read_stats(log_dir, "dump") or read_stats(images_dir, "dump"))
    result.criu_run_id = _run_id(images_dir)
    if result.criu_run_id:
        try:
            result.network_lock_tables = network_lock_tables(netns, run_id=result.criu_run_id)
        except DpmigrateError as err:  # the dump itself succeeded: say so, and why not this
            result.network_lock_problem = str(err)
    return result


def run_id(images_dir: str | os.PathLike[str] | None, log_file: str | None = None) -> str:
    """CRIU's id of a dump ("" if unknown): its lock table is named after it (see
    :func:`remove_network_lock`).

    From the dump's ``inventory.img`` in ``images_dir``; failing that (a dump that ended
    before writing it — killed, say) from its log ``log_file``, whose last ``CRIU run id =``
    line is the dump's (the first one, when there are two, is the parent criu's)."""
    found = _run_id(os.fspath(images_dir)) if images_dir is not None else ""
    if found or log_file is None:
        return found
    try:
        with open(log_file, errors="replace") as log:
            ids = [line.rsplit("=", 1)[1].strip() for line in log if _LOG_RUN_ID in line]
    except OSError:
        return ""
    return ids[-1] if ids else ""


#: How CRIU's log names the run id of the session (criu/util.c, util_init).
_LOG_RUN_ID = "CRIU run id = "


def _run_id(images_dir: str) -> str:
    """CRIU's id of the dump run, from inventory.img ("" if absent)."""
    try:
        with open(os.path.join(images_dir, "inventory.img"), "rb") as image:
            entries = pycriu.images.load(image).get("entries") or [{}]
    except (OSError, pycriu.images.MagicException, ValueError):
        return ""
    return str(entries[0].get("dump_criu_run_id", ""))


def restore(
    images_dir: str | os.PathLike[str],
    *,
    netns: str | None = None,
    restore_sibling: bool = True,
    pidfile: str | None = None,
    lazy_pages: bool = False,
    tcp_close: bool = False,
    tcp_established: bool = False,
    ext_unix_sk: bool = False,
    shell_job: bool = False,
    log_name: str = "restore.log",
    log_dir: str | os.PathLike[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    cgroup_procs: Sequence[str] = (),
) -> RestoreResult:
    """Restore the tree in ``images_dir``; returns its root's host PID.

    ``cgroup_procs``: the ``cgroup.procs`` files of the control group the restored tree must
    be charged to. The ``criu swrk`` is written into them before it gets the request, and
    CRIU is told to leave cgroups alone (``manage_cgroups`` off: mode IGNORE), so the tree it
    forks is born there and every page it restores is charged there from the first one —
    not to the group the images name (the source's), which CRIU's default (soft) mode would
    move the tasks back into. Without it the tree is born in the caller's group.

    ``netns``: run criu — and so the restored tree, unless the images carry their own network
    namespace — inside this namespace (``/run/netns/NAME``). ``restore_sibling``: the
    restored root becomes a child of the caller (CRIU's ``rst_sibling``); without it CRIU's
    swrk is the parent and the root is re-parented to PID 1 when it exits. Either way a
    restored ``--kill-child`` stage keeps its parent-death signal (see the module docstring).
    ``pidfile`` (absolute path): written with the restored PID. CRIU writes its log and
    ``stats-restore`` into ``log_dir`` (default ``images_dir``); give a separate ``log_dir``
    (or restore from a scratch folder of links, as :func:`dpmigrate.checkpoint.bundle.restore`
    does) to leave a bundle untouched.

    Raises CheckpointError (quoting CRIU's log) on any CRIU failure.
    """
    if pidfile is not None and not os.path.isabs(pidfile):
        raise CheckpointError(f"pidfile {pidfile!r} must be an absolute path")
    images = os.fspath(images_dir)
    logs = os.fspath(log_dir) if log_dir is not None else images
    log_file = os.path.join(logs, log_name)
    if not os.path.isdir(images):
        raise CheckpointError(f"images folder {images} does not exist")
    images_fd = open_dir(images)
    work_fd = open_dir(logs) if logs != images else None
    try:
        opts = _base_opts(
            images_fd, work_fd, log_name, lazy_pages=lazy_pages, tcp_close=tcp_close,
            tcp_established=tcp_established, ext_unix_sk=ext_unix_sk, shell_job=shell_job,
        )  # fmt: skip
        opts.rst_sibling = restore_sibling
        if cgroup_procs:
            opts.manage_cgroups = False  # IGNORE: the tasks stay where the swrk forks them
        started = time.monotonic()
        answer = _call("restore", opts, netns=netns, log_file=log_file, timeout=timeout,
                       enter=cgroup_procs)  # fmt: skip
        wall = int((time.monotonic() - started) * 1e6)
    finally:
        os.close(images_fd)
        if work_fd is not None:
            os.close(work_fd)
    result = RestoreResult(pid=int(answer.pid), images_dir=images, log_file=log_file,
                           total_time=wall)  # fmt: skip
    _fill(result, read_stats(logs, "restore") or read_stats(images, "restore"))
    if pidfile is not None:
        tmp = f"{pidfile}.tmp"
        with open(tmp, "w") as out:
            out.write(f"{result.pid}\n")
        os.replace(tmp, pidfile)
    return result


def read_stats(folder: str, kind: str) -> dict[str, int]:
    """CRIU's own statistics (``stats-dump`` or ``stats-restore``) as a flat dict; empty when
    the image is absent (a failed run, or a CRIU that wrote none). CRIU 4.2 writes them into
    its work folder (the log folder), not the images folder."""
    path = os.path.join(folder, f"stats-{kind}")
    try:
        with open(path, "rb") as image:
            decoded = pycriu.images.load(image)
    except (OSError, pycriu.images.MagicException, ValueError):
        return {}
    entries = decoded.get("entries") or [{}]
    section = entries[0].get(kind, {})
    return {key: int(value) for key, value in section.items() if isinstance(value, int)}


def _fill(result: DumpResult | RestoreResult, stats: dict[str, int]) -> None:
    names = {f.name for f in dataclasses.fields(result)}
    for key, value in stats.items():
        if key in names:
            setattr(result, key, value)


# --------------------------------------------------------------------------- network lock


def _nft(netns: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    nft = shutil.which("nft")
    if nft is None:
        raise EnvironmentProblem("`nft` is missing; apt-get install nftables")
    cmd = [nft, *args]
    if netns is not None:
        cmd = ["nsenter", f"--net={netns}", "--", *cmd]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired as err:
        raise CheckpointError(f"`{' '.join(cmd)}` did not finish in 30 s") from err


#: The nftables family of CRIU's lock table.
LOCK_TABLE_FAMILY = "inet"
#: CRIU up to 4.2 formats "inet CRIU-<run id>" into a 32-byte buffer (criu/netfilter.c
#: ``nftables_get_table``, its callers in criu/net.c): the name keeps 21 of the run id's 36
#: characters. Later CRIU sizes the buffer for the whole id.
_CRIU_TABLE_BUFFER = 32


def network_lock_table(run_id: str) -> list[str]:
    """The names the lock table of the dump ``run_id`` can have, as "FAMILY NAME": the one
    CRIU 4.2 gives it (cut to its buffer) and the whole one of later CRIU. Exact names —
    ``CRIU-`` followed by something else is another dump's table, or nobody's."""
    if not run_id or any(c.isspace() for c in run_id):
        raise ValueError(f"not a CRIU run id: {run_id!r}")
    whole = f"{LOCK_TABLE_FAMILY} CRIU-{run_id}"
    return list(dict.fromkeys((whole[: _CRIU_TABLE_BUFFER - 1], whole)))


def network_lock_tables(netns: str | None = None, *, run_id: str | None = None) -> list[str]:
    """Tables named ``CRIU-*`` in ``netns`` (None: the caller's), as "FAMILY NAME"; [] when
    nft is not installed. For reports and tests: nothing is ever removed by this pattern.

    With ``run_id`` (:attr:`DumpResult.criu_run_id`) only that dump's table, by its exact name
    (:func:`network_lock_table`). CheckpointError when nft cannot list the namespace.
    """
    if shutil.which("nft") is None:
        return []
    wanted = set(network_lock_table(run_id)) if run_id is not None else None
    return [t for t in _criu_tables(netns) if wanted is None or t in wanted]


def _criu_tables(netns: str | None) -> list[str]:
    listing = _nft(netns, "list", "tables")
    if listing.returncode != 0:
        where = netns or "the caller's network namespace"
        why = listing.stderr.strip() or f"exit status {listing.returncode}"
        raise CheckpointError(f"nft could not list the tables of {where}: {why}")
    tables = []
    for line in listing.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "table" and parts[2].startswith("CRIU-"):
            tables.append(f"{parts[1]} {parts[2]}")
    return tables


@dataclasses.dataclass(frozen=True)
class LockRemoval:
    """What :func:`remove_network_lock` did with one dump's lock table.

    ``outcome``: ``removed``; ``absent`` (no such table: CRIU removed it itself — after a
    ``leave_running`` or a failed dump — or never made one); ``unknown`` (no run id: nothing
    to look for, so nothing was touched); ``failed`` (the table may still be there; ``detail``
    says why and what to do).
    """

    run_id: str
    netns: str  # "" for the caller's namespace
    outcome: str
    table: str = ""  # "FAMILY NAME" of the table removed, or of the one that could not be
    detail: str = ""

    @property
    def removed(self) -> bool:
        return self.outcome == "removed"

    @property
    def ok(self) -> bool:
        """Nothing of this dump locks the namespace any more (as far as can be known)."""
        return self.outcome in ("removed", "absent")

    def __str__(self) -> str:
        where = self.netns or "the caller's network namespace"
        if self.outcome == "removed":
            return f"removed CRIU's lock table {self.table} from {where}"
        if self.outcome == "absent":
            return f"no lock table of CRIU run {self.run_id} in {where}: nothing to remove"
        if self.outcome == "unknown":
            return f"no CRIU run id known, so no lock table looked for in {where}: {self.detail}"
        return f"could not remove CRIU's lock table {self.table or self.run_id} in {where}: " + (
            self.detail
        )

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "message": str(self)}


def remove_network_lock(netns: str | None = None, *, run_id: str) -> LockRemoval:
    """Delete the nftables table the dump ``run_id`` (:attr:`DumpResult.criu_run_id`, or
    :func:`run_id`) locked ``netns`` with (None: the caller's namespace) — that table only.

    Call it when the dumped process is done with the namespace: after the restored copy runs
    elsewhere, after a dump that ended the process, or after giving up on a restore and
    resuming the original. Never raises for what it finds: the answer says whether the table
    was removed, was not there, or could not be removed (and why) — the caller logs it and
    reports a failure; tables of other dumps, at the same time in the same namespace, and any
    other ``CRIU-*`` table are left alone.
    """
    where = netns or ""
    if not run_id:
        return LockRemoval("", where, "unknown", detail="the dump left no inventory.img and no "
                           "run id in its log")  # fmt: skip
    try:
        if shutil.which("nft") is None:
            raise EnvironmentProblem("`nft` is missing; apt-get install nftables")
        present = network_lock_tables(netns, run_id=run_id)
    except (DpmigrateError, ValueError) as err:
        return LockRemoval(run_id, where, "failed", detail=str(err))
    if not present:
        return LockRemoval(run_id, where, "absent")
    table = present[0]
    family, name = table.split()
    try:
        result = _nft(netns, "delete", "table", family, name)
    except DpmigrateError as err:
        return LockRemoval(run_id, where, "failed", table, str(err))
    if result.returncode != 0:
        detail = f"nft: {result.stderr.strip() or f'exit status {result.returncode}'}; " + (
            f"delete it with `nft delete table {table}`"
            + (f" inside `nsenter --net={netns}`" if netns else "")
        )
        return LockRemoval(run_id, where, "failed", table, detail)
    return LockRemoval(run_id, where, "removed", table)


def check() -> None:
    """Ask criu over RPC whether the kernel supports checkpoint/restore; CheckpointError if not."""
    with _criu_command(None) as command:
        client = pycriu.criu()
        client._comm = _TimedBinComm(command, 60)
        try:
            client.check()
        except _pycriu_criu.CRIUException as err:
            raise CheckpointError(
                f"criu check failed: {err}; run `{command} check` for details"
            ) from err
