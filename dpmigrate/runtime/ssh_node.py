"""An SSH node's host as the cluster drives it: check it, start its agent, reach it, stop it.

A node reached over SSH runs the same agent, under the same keeper, as a local node does
(``dpmigrate agent --keep ... --isolate``): its own folder ``<state_dir>/nodes/<node>`` on
that host (the state dir is the cluster's, the same path on every node, so that a stage's run
folder and journal are where its restored copy looks), its log ``agent.log`` in that folder.
What differs is only how it is reached, all through one :class:`~dpmigrate.cluster.ssh.
Connection`:

* **remote doctor**: ``dpmigrate --version`` (the version must be this one: the agents speak
  one protocol) and ``dpmigrate doctor --json`` (criu, root, pycriu...), before anything is
  written on the host;
* **agent start**: the folders over SFTP (0700), etcd's client files over SFTP (0600, mode set
  before the first byte); the agent started by a shell that reads the cluster token from its
  stdin, so the token is in no command line and no file on the host; the keeper's PID and
  start time recorded;
* **tunnel**: the CLI reaches the agent through a forwarded unix socket
  (:class:`~dpmigrate.cluster.ssh.Tunnel`); the other agents reach it directly at its address;
* **stop**: the agent's own ``shutdown`` (it stops its stages and removes their control
  groups), then SIGTERM/SIGKILL by PID — each PID checked against its recorded start time in
  the same remote command — and the node's folder removed.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import threading
import time
from collections.abc import Callable
from typing import Any

from dpmigrate import __version__
from dpmigrate.cluster import ssh
from dpmigrate.cluster.pki import TlsFiles
from dpmigrate.errors import DpmigrateError, SshError
from dpmigrate.runtime.agent import STAGE_TABLE
from dpmigrate.runtime.cluster import AGENT_PORT, KEEPER_FILE
from dpmigrate.runtime.cluster import AGENT_SOCKET as SOCKET
from dpmigrate.runtime.control import AgentClient

DOCTOR, AGENT_START = "remote doctor", "agent start"
LOG_FILE = "agent.log"
#: The doctor's checks an agent cannot work without (the rest are reported, not required).
REQUIRED_CHECKS = ("criu version", "root", "criu check", "pycriu")
#: Settings that belong to each host (or are secrets) and are not passed on to a remote agent.
_HOST_SETTINGS = frozenset(
    {
        "DPMIGRATE_TOKEN",
        "DPMIGRATE_STATE_DIR",
        "DPMIGRATE_ETCD",
        "DPMIGRATE_ETCD_CA",
        "DPMIGRATE_ETCD_CERT",
        "DPMIGRATE_ETCD_KEY",
        "DPMIGRATE_CRIU",
        "DPMIGRATE_PREFIX",
        "DPMIGRATE_STRICT",
    }
)
_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 15.0
_KILL_TIMEOUT_S = 5.0
#: A shell function printing the start time (field 22 of /proc/PID/stat) of PID $1, nothing
#: when it is gone or a zombie (dead, its PID not yet reaped).
_START_OF = (
    "st() { s=$(sed 's/.*) //' /proc/$1/stat 2>/dev/null); case \"$s\" in ''|Z*|X*) return;; "
    "esac; echo \"$s\" | cut -d' ' -f20; }; "
)


def target(entry: dict[str, Any], accept: frozenset[str], connector: Any = None) -> ssh.Target:
    """The connection target of a recorded SSH node."""
    accepted = accept | ({entry["host_key"]} if entry.get("host_key") else set())
    return ssh.Target(
        entry["user"],
        entry["host"],
        int(entry["port"]),
        entry["identity"],
        entry["known_hosts"],
        frozenset(accepted),
        connector,
        label=f"node {entry['name']} ({entry['user']}@{entry['host']}:{entry['port']})",
    )


class SshNode:
    """One recorded SSH node (``entry`` is its part of the cluster record; it is updated in
    place and ``save`` is called after each change, before anything it names is made)."""

    def __init__(
        self,
        entry: dict[str, Any],
        state_dir: str,
        conn: ssh.Connection,
        save: Callable[[], None] = lambda: None,
    ) -> None:
        self.entry = entry
        self.state_dir = state_dir
        self.conn = conn
        self.save = save
        self.node_dir = f"{state_dir.rstrip('/')}/nodes/{entry['name']}"
        self._tunnel: ssh.Tunnel | None = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return str(self.entry["name"])

    def fail(self, step: str, what: str) -> SshError:
        return self.conn.fail(step, what)

    def _launcher(self) -> str:
        return " ".join(shlex.quote(part) for part in self.entry["launcher"])

    # -- remote doctor --------------------------------------------------------------------
    def doctor(self) -> dict[str, Any]:
        """The host can run an agent of this dpmigrate version, or SshError(remote doctor)."""
        program = self.entry["launcher"][0]
        done = self.conn.run(f"{self._launcher()} --version", step=DOCTOR)
        if done.status != 0:
            said = (done.stderr or done.stdout).strip().splitlines()
            raise self.fail(
                DOCTOR,
                f"`{' '.join(self.entry['launcher'])} --version` failed "
                f"(exit {done.status}: {said[-1] if said else 'no output'}); is "
                f"dpmigrate {__version__} installed there? Install it, or fix "
                f"{'python' if len(self.entry['launcher']) > 1 else 'dpmigrate'} "
                f"for node {self.name} in the cluster file (now {program})",
            )
        version = done.stdout.strip().rpartition(" ")[2]
        if version != __version__:
            raise self.fail(
                DOCTOR,
                f"{program} runs dpmigrate {version or '(unknown)'}, this "
                f"host runs {__version__}; the agents of one cluster must run one "
                "version: install the same one there",
            )
        # the doctor looks at a state dir that holds no cluster record (it must not judge one)
        done = self.conn.run(
            f"env DPMIGRATE_STATE_DIR={shlex.quote(self.node_dir)} "
            f"{self._launcher()} doctor --json",
            step=DOCTOR,
        )
        try:
            report = json.loads(done.stdout)
            checks = {c["name"]: c for c in report["checks"]}
        except (ValueError, KeyError, TypeError) as err:
            raise self.fail(
                DOCTOR,
                f"`dpmigrate doctor --json` gave no report (exit "
                f"{done.status}: {done.stderr.strip()[-200:]})",
            ) from err
        bad = [
            checks.get(n, {"name": n, "status": "missing", "detail": "not checked"})
            for n in REQUIRED_CHECKS
            if checks.get(n, {}).get("status") != "ok"
        ]
        if bad:
            first = bad[0]
            raise self.fail(
                DOCTOR,
                f"check {first['name']!r} is {first['status']}: "
                f"{first['detail']} (run `dpmigrate doctor` there)",
            )
        return {
            "version": version,
            "criu": report.get("criu", {}),
            "warnings": [
                f"{c['name']}: {c['detail']}"
                for c in checks.values()
                if c.get("status") not in ("ok", None)
            ],
        }

    # -- files ----------------------------------------------------------------------------
    def _missing_dirs(self) -> list[str]:
        """The node folder and those of its parents that do not exist yet, outermost first."""
        sftp = self.conn.sftp()
        missing: list[str] = []
        path = self.node_dir
        while path not in ("", "/"):
            try:
                sftp.stat(path)
                break
            except OSError:
                missing.append(path)
                path = path.rpartition("/")[0]
        return list(reversed(missing))

    def make_folder(self, tls: TlsFiles | None) -> None:
        """The node's own folder (0700), recorded before it is made; etcd's client files in
        it (0600)."""
        sftp = self.conn.sftp()
        missing = self._missing_dirs()
        if self.node_dir not in missing:
            raise self.fail(
                AGENT_START,
                f"{self.node_dir} already exists on the host (left by "
                "another cluster?); if no agent of yours runs there, remove it "
                "there and run `dpmigrate cluster up` again",
            )
        self.entry["created_dirs"] = missing
        self.save()
        try:
            for path in missing:
                sftp.mkdir(path, 0o700)
                sftp.chmod(path, 0o700)
            if tls is not None:
                sftp.mkdir(f"{self.node_dir}/etcd-tls", 0o700)
                sftp.chmod(f"{self.node_dir}/etcd-tls", 0o700)
                for local in (tls.ca, tls.cert, tls.key):
                    with open(local, "rb") as f:
                        data = f.read()
                    self.conn.write_private(
                        f"{self.node_dir}/etcd-tls/{local.rpartition('/')[2]}", data
                    )
        except OSError as err:
            raise self.fail(
                AGENT_START,
                f"cannot make {self.node_dir} on the host ({err}); "
                "check the space and permissions there",
            ) from err

    def _read(self, name: str) -> str | None:
        try:
            with self.conn.sftp().open(f"{self.node_dir}/{name}", "r") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return None

    def keeper_state(self) -> dict[str, Any]:
        text = self._read(KEEPER_FILE)
        try:
            data = json.loads(text) if text else {}
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def log_text(self, lines: int | None = None) -> str:
        """The agent's log on the host (its last ``lines`` lines)."""
        text = self._read(LOG_FILE)
        if text is None:
            raise self.fail(
                "logs",
                f"no log at {self.node_dir}/{LOG_FILE} on the host (has its agent ever started?)",
            )
        return text if lines is None else "\n".join(text.splitlines()[-lines:])

    # -- processes ------------------------------------------------------------------------
    def alive(self, procs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The (pid, start time) that are still those very processes on the host."""
        if not procs:
            return []
        checks = " ".join(f"{p}:{s}" for p, s in procs)
        done = self.conn.run(
            _START_OF + f"for e in {checks}; do p=${{e%:*}}; "
            '[ "$(st $p)" = "${e#*:}" ] && echo "$e"; done; true'
        )
        found = {line.strip() for line in done.stdout.splitlines()}
        return [(p, s) for p, s in procs if f"{p}:{s}" in found]

    def _signal(self, procs: list[tuple[int, int]], sig: str) -> None:
        checks = " ".join(f"{p}:{s}" for p, s in procs)
        self.conn.run(
            _START_OF + f"for e in {checks}; do p=${{e%:*}}; "
            f'[ "$(st $p)" = "${{e#*:}}" ] && kill -{sig} $p; done; true'
        )

    def keeper(self) -> tuple[int, int] | None:
        """The recorded keeper, if it still runs."""
        pid, start = self.entry.get("keeper_pid"), self.entry.get("keeper_start_time")
        if isinstance(pid, int) and isinstance(start, int) and self.alive([(pid, start)]):
            return pid, start
        return None

    # -- agent ----------------------------------------------------------------------------
    def start_agent(
        self, token: str, endpoints: str, tls: TlsFiles | None, env: dict[str, str]
    ) -> None:
        """Start the agent under its keeper, detached from the SSH session; the token goes on
        the shell's stdin and from there only into the agent's environment."""
        settings = {
            k: v for k, v in env.items() if k.startswith("DPMIGRATE_") and k not in _HOST_SETTINGS
        }
        settings["DPMIGRATE_STATE_DIR"] = self.state_dir
        if tls is not None:  # as the agent sees them, inside its own view of the state dir
            inner = f"{self.state_dir.rstrip('/')}/node/etcd-tls"
            settings.update(
                DPMIGRATE_ETCD_CA=f"{inner}/{tls.ca.rpartition('/')[2]}",
                DPMIGRATE_ETCD_CERT=f"{inner}/{tls.cert.rpartition('/')[2]}",
                DPMIGRATE_ETCD_KEY=f"{inner}/{tls.key.rpartition('/')[2]}",
            )
        assign = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(settings.items()))
        args = [
            "agent",
            "--keep",
            "--keep-file",
            KEEPER_FILE,
            "--node",
            self.name,
            "--isolate",
            "--socket",
            SOCKET,
            "--listen",
            f"{self.entry['address']}:{AGENT_PORT}",
            "--etcd",
            endpoints,
        ]
        log = shlex.quote(f"{self.node_dir}/{LOG_FILE}")
        with contextlib.suppress(FileNotFoundError):  # a dead keeper's: names no agent now
            self.conn.sftp().remove(f"{self.node_dir}/{KEEPER_FILE}")
        script = (
            "umask 077; IFS= read -r DPMIGRATE_TOKEN || exit 97; export DPMIGRATE_TOKEN; "
            # not `cd / && cmd &`: that would background a subshell holding the channel open
            f"cd / || exit 96; env {assign} setsid {self._launcher()} "
            + " ".join(shlex.quote(a) for a in args)
            + f" </dev/null >>{log} 2>&1 & echo $!"
        )
        done = self.conn.run(script, stdin=(token + "\n").encode(), step=AGENT_START)
        pid = done.stdout.strip()
        if done.status != 0 or not pid.isdigit():
            raise self.fail(
                AGENT_START,
                f"the start command failed (exit {done.status}: "
                f"{(done.stderr or done.stdout).strip()[-200:]})",
            )
        start = self._start_time(int(pid))
        self.entry.update(
            keeper_pid=int(pid),
            keeper_start_time=start,
            agent_pid=None,
            log=f"{self.node_dir}/{LOG_FILE}",
        )
        self.save()

    def _start_time(self, pid: int) -> int | None:
        done = self.conn.run(_START_OF + f"st {pid}")
        text = done.stdout.strip()
        return int(text) if text.isdigit() else None

    def wait_agent(self, token: str) -> dict[str, Any]:
        """Until the agent answers a ping through the tunnel (bounded); its answer. The keeper
        gone, or no answer in time, is SshError(agent start) quoting the host's log."""
        deadline = time.monotonic() + _START_TIMEOUT_S
        last = ""
        while time.monotonic() < deadline:
            state = self.keeper_state()
            if self.keeper() is None or state.get("last_exit"):
                raise self.fail(
                    AGENT_START,
                    f"the agent exited while starting "
                    f"({state.get('last_exit') or 'its keeper is gone'}): "
                    f"{self._tail()}",
                )
            if isinstance(state.get("agent_pid"), int):
                try:
                    with self.client(token, timeout=5) as agent:
                        pong = agent.call("ping")
                    pid = pong.get("pid") if isinstance(pong, dict) else None
                    start = self._start_time(pid) if isinstance(pid, int) else None
                    self.entry.update(agent_pid=pid, agent_start_time=start)
                    self.save()
                    return dict(pong)
                except SshError as err:
                    if self.tunnel().prohibited:
                        raise  # no retry makes the host forward
                    last = str(err)
                except DpmigrateError as err:
                    last = str(err)
            time.sleep(0.1)
        raise self.fail(
            AGENT_START,
            f"the agent did not answer within {_START_TIMEOUT_S:.0f} s "
            f"({last or 'it never started'}): {self._tail()}",
        )

    def _tail(self, lines: int = 4) -> str:
        text = self._read(LOG_FILE)
        if not text:
            return f"(no log at {self.node_dir}/{LOG_FILE})"
        return " | ".join(text.strip().splitlines()[-lines:]) + f" (dpmigrate logs {self.name})"

    def tunnel(self) -> ssh.Tunnel:
        with self._lock:
            if self._tunnel is None:
                self._tunnel = self.conn.tunnel(self.entry["address"], AGENT_PORT)
            return self._tunnel

    def client(self, token: str, timeout: float = 30.0) -> AgentClient:
        """An authenticated connection to the agent, carried by the SSH connection."""
        tunnel = self.tunnel()
        try:
            return AgentClient(tunnel.path, token, timeout=timeout)
        except DpmigrateError as err:
            if tunnel.prohibited:
                raise self.fail(
                    ssh.TUNNEL,
                    f"{tunnel.last_error}: its sshd forbids forwarding; set AllowTcpForwarding "
                    "yes (or local) in its sshd_config — the control traffic to the agent "
                    "goes only through the SSH connection",
                ) from err
            if tunnel.last_error:
                raise self.fail(
                    ssh.TUNNEL,
                    f"{tunnel.last_error}: nothing answers there; is the agent running "
                    f"(`dpmigrate cluster status`, `dpmigrate logs {self.name}`)?",
                ) from err
            raise

    def stop(self, token: str) -> list[str]:
        """Stop the agent, its keeper and its stages; remove the node's folder. What went."""
        removed: list[str] = []
        where = f"{self.entry['host']}"
        procs: list[tuple[int, int]] = []
        labels: dict[int, str] = {}
        state = self.keeper_state()
        keeper = self.keeper()
        if keeper is None and isinstance(state.get("keeper_pid"), int):
            # started, but its PID not recorded yet (up failed right after the start)
            start = self._start_time(state["keeper_pid"])
            keeper = (state["keeper_pid"], start) if start is not None else None
        if keeper is not None:
            procs.append(keeper)
            labels[keeper[0]] = f"agent keeper {self.name} on {where} (pid {keeper[0]})"
        agent_pid, agent_start = state.get("agent_pid"), state.get("agent_start_time")
        if isinstance(agent_pid, int) and isinstance(agent_start, int):
            procs.append((agent_pid, agent_start))
            labels[agent_pid] = f"agent {self.name} on {where} (pid {agent_pid})"
        try:  # the stages, as the agent records them for its successor (PID, start time)
            table = json.loads(self._read(STAGE_TABLE) or "{}")
        except ValueError:
            table = {}
        for key, info in table.items() if isinstance(table, dict) else ():
            pid, start = info.get("pid"), info.get("start_time")
            if isinstance(pid, int) and isinstance(start, int):
                procs.append((pid, start))
                labels[pid] = f"stage {key} on {where} (pid {pid})"
        running = self.alive(procs)  # before the shutdown: those are reported as stopped
        asked = False
        if keeper is not None:
            try:  # it stops its stages and removes their control groups, then exits
                with self.client(token, timeout=10) as agent:
                    agent.call("shutdown")
                asked = True
            except DpmigrateError:
                pass  # not answering: the signals below end it
        alive = self.alive(running)
        steps = (("", _STOP_TIMEOUT_S if asked else 0.0), ("TERM", _STOP_TIMEOUT_S),
                 ("KILL", _KILL_TIMEOUT_S))  # fmt: skip
        for sig, wait_s in steps:  # after the shutdown: nothing, then SIGTERM, then SIGKILL
            if not alive:
                break
            if sig:
                self._signal(alive, sig)
            left = alive
            ssh.wait_for(lambda left=left: not self.alive(left), wait_s, 0.2)  # type: ignore[misc]
            alive = self.alive(alive)
        if alive:
            raise self.fail(
                "stop",
                "process(es) "
                + ", ".join(str(p) for p, _ in alive)
                + " survived SIGKILL on the host; stop them there by hand",
            )
        removed += [labels.get(p, f"process {p} on {where}") for p, _ in running]
        if self._tunnel is not None:
            self._tunnel.close()
            self._tunnel = None
        created = list(self.entry.get("created_dirs") or [])
        if self.node_dir in created:
            done = self.conn.run(f"rm -rf -- {shlex.quote(self.node_dir)}")
            if done.status != 0:
                raise self.fail(
                    "stop",
                    f"cannot remove {self.node_dir} ({done.stderr.strip()}); "
                    "remove it there by hand",
                )
            removed.append(f"directory {where}:{self.node_dir}")
            for path in reversed(created):
                if path != self.node_dir:  # made by us, removed only when empty
                    self.conn.run(f"rmdir -- {shlex.quote(path)} 2>/dev/null; true")
        return removed
