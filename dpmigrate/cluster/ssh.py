"""One SSH connection to a node's host, through paramiko: verified, authenticated, tunnelled.

Why each step is done this way:

* **host key before anything else.** The server's key is checked against the cluster's
  known_hosts right after the key exchange and before the user's key is offered, so a host
  that is not the one recorded learns nothing and gets no command. An unknown host is refused
  with its SHA256 fingerprint (what ``ssh-keygen -lf`` prints on the host, to compare) unless
  the user accepted exactly that fingerprint; the accepted key is then appended to
  known_hosts. A key that differs from the recorded one is always refused, saying so: there
  is no option to skip it, as with OpenSSH's ``StrictHostKeyChecking``.
* **keys only.** A private key file readable by others is refused, as OpenSSH does.
* **commands are strings for the remote shell**, built with :func:`shlex.quote` by the
  caller; secrets never go into them (the caller sends those on stdin or over SFTP), and every
  command is kept in :attr:`Connection.commands` so that this can be checked.
* **the agent's control traffic rides the SSH connection** (:class:`Tunnel`): a unix socket in
  a private 0700 folder of this host, each connection to it becoming a ``direct-tcpip``
  channel to the agent's address on the remote side. No agent port needs to be reachable from
  this host, and the local end is a file only its owner can open, not a TCP port any local
  user could.

Errors are :class:`~dpmigrate.errors.SshError` lines naming the host and the step (connect,
host key, auth, tunnel) and what to do. This module knows nothing of agents or clusters.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import logging
import os
import selectors
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paramiko

from dpmigrate.errors import SshError

# paramiko logs a refused channel or a failed auth at ERROR; unconfigured, Python would print
# that to stderr beside our one-line error, which already says it.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

CONNECT, HOST_KEY, AUTH, TUNNEL = "connect", "host key", "auth", "tunnel"
_CHUNK = 65536
_KEEPALIVE_S = 15
_ADMINISTRATIVELY_PROHIBITED = 1  # RFC 4254 channel open failure reason code


@dataclasses.dataclass(frozen=True)
class Target:
    """Where to connect and how to trust it."""

    user: str
    host: str
    port: int
    identity: str
    known_hosts: str
    #: fingerprints (SHA256:...) the user accepted for a host known_hosts does not know yet
    accept: frozenset[str] = frozenset()
    #: open the TCP connection from this function (e.g. inside a network namespace)
    connector: Callable[[tuple[str, int], float], socket.socket] | None = None
    #: how the host is named in messages (default user@host:port)
    label: str = ""

    @property
    def known_name(self) -> str:
        """The host's name in known_hosts, as OpenSSH writes it."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    @property
    def where(self) -> str:
        return self.label or f"{self.user}@{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class Result:
    status: int
    stdout: str
    stderr: str


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 fingerprint of a public key (``ssh-keygen -lf``)."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _family(key_type: str) -> str:
    return "ssh-rsa" if key_type.startswith("rsa-sha2-") else key_type


class Connection:
    """An authenticated SSH connection to one host; a context manager."""

    def __init__(self, target: Target, timeout: float = 15.0) -> None:
        self.target = target
        self.timeout = timeout
        self.commands: list[str] = []
        self.host_key = ""  # the fingerprint of the key the host proved, once connected
        self._transport: paramiko.Transport | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._tunnels: list[Tunnel] = []
        self._lock = threading.Lock()

    def fail(self, step: str, what: str) -> SshError:
        return SshError(self.target.where, step, what)

    # -- connect, host key, auth ----------------------------------------------------------
    def open(self) -> Connection:
        t = self.target
        try:
            connect = t.connector or socket.create_connection
            sock = connect((t.host, t.port), self.timeout)
        except OSError as err:
            raise self.fail(
                CONNECT,
                f"cannot reach {t.host}:{t.port} "
                f"({err.strerror or err}); check that sshd runs there, the port "
                "and the network between",
            ) from err
        known = self._known_hosts()
        transport = paramiko.Transport(sock)
        self._transport = transport
        entry = known.lookup(t.known_name)
        if entry:  # ask for a key type known_hosts holds, so a known host can be checked
            families = {_family(k) for k in entry}
            opts = transport.get_security_options()
            opts.key_types = sorted(opts.key_types, key=lambda k: _family(k) not in families)
        try:
            transport.start_client(timeout=self.timeout)
        except (paramiko.SSHException, OSError, EOFError) as err:
            self.close()
            raise self.fail(
                CONNECT,
                f"no SSH session with {t.host}:{t.port} ({err}); is that port an SSH server?",
            ) from err
        self._check_host_key(known, transport.get_remote_server_key())
        self._authenticate(transport)
        transport.set_keepalive(_KEEPALIVE_S)  # a long-lived client learns of a dead host
        return self

    def _known_hosts(self) -> paramiko.HostKeys:
        keys = paramiko.HostKeys()
        path = self.target.known_hosts
        if os.path.exists(path):
            try:
                keys.load(path)
            except (OSError, paramiko.SSHException) as err:
                raise self.fail(HOST_KEY, f"cannot read known_hosts {path}: {err}") from err
        return keys

    def _check_host_key(self, known: paramiko.HostKeys, key: paramiko.PKey) -> None:
        t = self.target
        offered = fingerprint(key)
        entry = known.lookup(t.known_name)
        if entry:
            recorded = entry.get(key.get_name())
            if recorded is not None and recorded == key:
                self.host_key = offered
                return
            self.close()
            was = ", ".join(f"{k} {fingerprint(v)}" for k, v in entry.items())
            raise self.fail(
                HOST_KEY,
                f"the host key has CHANGED: {t.known_name} offered "
                f"{key.get_name()} {offered}, but {t.known_hosts} records {was}; "
                "refused (someone may be impersonating the host, or it was "
                "reinstalled). If the change is expected, remove the old entry "
                f"(ssh-keygen -R '{t.known_name}' -f {t.known_hosts}) and accept "
                "the new fingerprint",
            )
        if offered not in t.accept:
            self.close()
            raise self.fail(
                HOST_KEY,
                f"{t.known_name} is not in {t.known_hosts}; its "
                f"{key.get_name()} key is {offered}. Compare it with the host's "
                "own (ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub there), then "
                f"accept it: --accept-host-key {offered}, or host_key = "
                f'"{offered}" for this node in the cluster file',
            )
        line = f"{t.known_name} {key.get_name()} {key.get_base64()}\n"
        fd = os.open(t.known_hosts, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "a") as out:
            out.write(line)
        self.host_key = offered

    def _authenticate(self, transport: paramiko.Transport) -> None:
        t = self.target
        try:
            mode = os.stat(t.identity).st_mode
        except OSError as err:
            self.close()
            raise self.fail(AUTH, f"identity {t.identity}: {err.strerror}") from err
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            self.close()
            raise self.fail(
                AUTH,
                f"identity {t.identity} is open to others (mode "
                f"{stat.S_IMODE(mode):04o}); chmod 600 {t.identity}",
            )
        try:
            pkey = paramiko.PKey.from_path(t.identity)
        except paramiko.PasswordRequiredException as err:
            self.close()
            raise self.fail(
                AUTH,
                f"identity {t.identity} is encrypted; give an unencrypted "
                "key for the cluster (dpmigrate asks no passphrase)",
            ) from err
        except (paramiko.SSHException, OSError, ValueError) as err:
            self.close()
            raise self.fail(
                AUTH, f"identity {t.identity} is not a private key paramiko can read ({err})"
            ) from err
        try:
            transport.auth_publickey(t.user, pkey)
        except paramiko.BadAuthenticationType as err:
            self.close()
            raise self.fail(
                AUTH,
                f"the server does not take keys for {t.user} (it allows "
                f"{', '.join(err.allowed_types)}); enable PubkeyAuthentication "
                "there",
            ) from err
        except (paramiko.SSHException, OSError, EOFError) as err:
            self.close()
            raise self.fail(
                AUTH,
                f"the server refused the key {t.identity} "
                f"({fingerprint(pkey)}) for user {t.user}; add its public key to "
                f"~{t.user}/.ssh/authorized_keys on {t.host}, or name the right "
                "identity",
            ) from err

    # -- use ------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self._transport is not None and self._transport.is_active()

    @property
    def transport(self) -> paramiko.Transport:
        if self._transport is None or not self._transport.is_active():
            raise self.fail(CONNECT, "the SSH connection is closed; run the command again")
        return self._transport

    def run(
        self, command: str, stdin: bytes = b"", timeout: float = 120.0, step: str = "exec"
    ) -> Result:
        """Run ``command`` (a shell command line; never put a secret in it) with ``stdin``."""
        self.commands.append(command)
        try:
            chan = self.transport.open_session(timeout=self.timeout)
            chan.settimeout(timeout)
            chan.exec_command(command)
            if stdin:
                chan.sendall(stdin)
            chan.shutdown_write()
            out = chan.makefile("rb").read()
            err = chan.makefile_stderr("rb").read()
            status = chan.recv_exit_status()
            chan.close()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise self.fail(
                step,
                f"the command did not complete ({exc or type(exc).__name__}); "
                "is the host overloaded or the connection cut?",
            ) from exc
        return Result(status, out.decode(errors="replace"), err.decode(errors="replace"))

    def sftp(self) -> paramiko.SFTPClient:
        with self._lock:
            if self._sftp is None:
                try:
                    self._sftp = paramiko.SFTPClient.from_transport(self.transport)
                except (paramiko.SSHException, OSError, EOFError) as err:
                    raise self.fail(
                        "sftp",
                        f"no SFTP subsystem ({err}); enable `Subsystem "
                        "sftp` in the host's sshd_config",
                    ) from err
                if self._sftp is None:
                    raise self.fail("sftp", "the host refused an SFTP channel")
            return self._sftp

    def write_private(self, path: str, data: bytes) -> None:
        """A file only its owner may read, in a folder the caller made 0700: the mode is set
        before the first byte is written."""
        sftp = self.sftp()
        with sftp.open(path, "wb") as f:
            f.chmod(0o600)
            f.write(data)

    def tunnel(self, host: str, port: int) -> Tunnel:
        """A local unix socket forwarding each connection to ``host:port`` as the remote side
        sees it; closed with the connection."""
        tunnel = Tunnel(self, host, port)
        self._tunnels.append(tunnel)
        return tunnel

    def close(self) -> None:
        for tunnel in self._tunnels:
            tunnel.close()
        self._tunnels.clear()
        if self._sftp is not None:
            with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                self._sftp.close()
            self._sftp = None
        if self._transport is not None:
            _close_gracefully(self._transport)
            self._transport = None

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Tunnel:
    """A unix socket here whose connections are carried to ``host:port`` on the SSH host.

    The socket lives in a fresh 0700 folder (``tempfile.mkdtemp``), so only this user can
    connect; each accepted connection opens one ``direct-tcpip`` channel and is pumped both
    ways by a thread of its own until either side closes. A channel the server will not open
    (nothing listens there, forwarding disabled) closes the local connection at once and is
    kept in :attr:`last_error` for the caller's message."""

    def __init__(self, conn: Connection, host: str, port: int) -> None:
        self.conn = conn
        self.host, self.port = host, port
        self.last_error = ""
        #: the server refuses forwarding itself (not: nothing listens there yet)
        self.prohibited = False
        self._dir = tempfile.mkdtemp(prefix="dpm-ssh-")
        self.path = str(Path(self._dir) / "agent.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._listener.bind(self.path)
        self._listener.listen(32)
        self._closed = threading.Event()
        threading.Thread(target=self._accept, name=f"ssh-tunnel-{host}:{port}", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                local, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(local,), daemon=True).start()

    def _serve(self, local: socket.socket) -> None:
        try:
            chan = self.conn.transport.open_channel(
                "direct-tcpip", (self.host, self.port), ("127.0.0.1", 0), timeout=self.conn.timeout
            )
        except (paramiko.SSHException, OSError, EOFError, SshError) as err:
            reason = getattr(err, "text", "") or str(err) or type(err).__name__
            self.prohibited = getattr(err, "code", None) == _ADMINISTRATIVELY_PROHIBITED
            self.last_error = (
                f"the host would not open a channel to {self.host}:{self.port} ({reason})"
            )
            local.close()
            return
        self.last_error = ""
        self.prohibited = False
        try:
            _pump(local, chan, self._closed)
        finally:
            local.close()
            with contextlib.suppress(paramiko.SSHException, OSError, EOFError):
                chan.close()  # the connection may be gone already: nothing left to close

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def _close_gracefully(transport: paramiko.Transport, timeout: float = 2.0) -> None:
    """Close so that the server surely sees it: half-close our side, wait (bounded) until the
    server answers with its own close, then drop the transport. A plain close can lose its
    FIN when the link to the host is removed right after (a lab host at ``cluster down``),
    and sshd would then keep that session for hours."""
    if transport.is_active():
        with contextlib.suppress(OSError):
            transport.sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + timeout
        while transport.is_active() and time.monotonic() < deadline:
            time.sleep(0.01)
    transport.close()


def _pump(local: socket.socket, chan: paramiko.Channel, closed: threading.Event) -> None:
    """Copy bytes both ways until one side ends (or the tunnel closes)."""
    sel = selectors.DefaultSelector()
    sel.register(local, selectors.EVENT_READ, "local")
    sel.register(chan, selectors.EVENT_READ, "chan")
    try:
        while not closed.is_set():
            for key, _ in sel.select(timeout=1.0):
                if key.data == "local":
                    data = local.recv(_CHUNK)
                    if not data:
                        return
                    chan.sendall(data)
                else:
                    data = chan.recv(_CHUNK)
                    if not data:
                        return
                    local.sendall(data)
    except OSError:
        return
    finally:
        sel.close()


def wait_for(check: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll ``check`` until it is true (True) or ``timeout`` passed (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
