"""Restore a bundle *detached*: the restored tree outlives the command that restored it.

Why this exists: over RPC the restored root becomes a child of the process that asked for the
restore (``rst_sibling``), and CRIU restores its parent-death signal too. A process started
the way the supervisor starts stages (``unshare --kill-child``) carries SIGKILL as that signal,
so when a short-lived CLI restores it and exits, the restored copy is killed at once
(measured here). ``restore_detached`` therefore starts a small *keeper* process in its own
session; the keeper verifies and restores the bundle, reports the result as one JSON line,
then stays as the restored root's parent and reaps it, exiting with its status. This mirrors
``unshare --kill-child`` in the supervisor: ending the keeper (by PID) ends the restored tree;
ending the restored root ends the keeper.

A long-lived caller (the node agent) does not need this: it restores in-process with
:func:`dpmigrate.checkpoint.bundle.restore` and stays the parent itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any

from dpmigrate.checkpoint import bundle as _bundle
from dpmigrate.checkpoint import criu_rpc
from dpmigrate.errors import BundleError, CheckpointError, DpmigrateError

#: Seconds the caller waits for the keeper's answer (verify + restore), by default.
DEFAULT_TIMEOUT_S = 300.0

_ERRORS: dict[str, type[DpmigrateError]] = {
    "BundleError": BundleError,
    "CheckpointError": CheckpointError,
}


def restore_detached(
    path: str | os.PathLike[str],
    *,
    netns: str | None = None,
    log_dir: str | os.PathLike[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    trust_owner: bool = False,
) -> criu_rpc.RestoreResult:
    """Verify and restore the bundle at ``path`` under a keeper; returns the restored root's
    host PID (``pid``) and the keeper's (``keeper_pid``). Raises the keeper's BundleError or
    CheckpointError as is; nothing is restored then, nothing deleted. ``trust_owner``: as for
    :func:`dpmigrate.checkpoint.bundle.load` (the keeper verifies again, so it is passed on)."""
    cmd = [sys.executable, "-m", "dpmigrate.checkpoint.keeper", os.fspath(path)]
    if netns is not None:
        cmd += ["--netns", netns]
    if log_dir is not None:
        cmd += ["--log-dir", os.fspath(log_dir)]
    if trust_owner:
        cmd.append("--trust-owner")
    keeper = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        close_fds=True, start_new_session=True, cwd="/",
    )  # fmt: skip
    assert keeper.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    try:
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise CheckpointError(
                    f"the restore did not finish within {timeout:g} s; its keeper "
                    f"(pid {keeper.pid}) was stopped"
                )
            ready, _, _ = select.select([keeper.stdout], [], [], min(left, 1.0))
            if not ready:
                continue
            chunk = os.read(keeper.stdout.fileno(), 65536)
            if not chunk:
                break
            line += chunk
    except BaseException:
        _stop(keeper)
        raise
    finally:
        keeper.stdout.close()
    try:
        answer = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        code = _stop(keeper)
        raise CheckpointError(
            f"the restore keeper exited ({code}) without an answer; run "
            f"`{' '.join(cmd)}` to see why"
        ) from None
    if not answer.get("ok"):
        keeper.wait(10)
        kind = _ERRORS.get(answer.get("type", ""), CheckpointError)
        raise kind(answer.get("error", "the restore failed"))
    fields = answer["result"]
    return criu_rpc.RestoreResult(**fields)


def _stop(keeper: subprocess.Popen[bytes]) -> int | None:
    """Kill the keeper we started (by PID) and reap it; its restored child, if any, follows."""
    if keeper.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            keeper.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        return keeper.wait(10)
    return None


def _answer(data: dict[str, Any]) -> None:
    """Write the one JSON line, then let go of stdout so the caller sees EOF."""
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpmigrate.checkpoint.keeper")
    parser.add_argument("bundle")
    parser.add_argument("--netns")
    parser.add_argument("--log-dir")
    parser.add_argument("--trust-owner", action="store_true")
    args = parser.parse_args(argv)
    # The caller may be gone long before the restored tree ends: do not die with its terminal.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        result = _bundle.restore(
            args.bundle, netns=args.netns, log_dir=args.log_dir, trust_owner=args.trust_owner
        )
    except DpmigrateError as err:
        _answer({"ok": False, "type": type(err).__name__, "error": str(err)})
        return 1
    except Exception as err:  # a bug: still answer, so the caller does not wait in vain
        _answer({"ok": False, "type": "CheckpointError", "error": f"restore keeper: {err!r}"})
        return 1
    result.keeper_pid = os.getpid()
    _answer({"ok": True, "result": result.as_dict()})
    while True:  # bounded by the restored root's life: waitpid blocks until it ends
        try:
            _, status = os.waitpid(result.pid, 0)
        except ChildProcessError:
            return 0
        except InterruptedError:
            continue
        return os.waitstatus_to_exitcode(status) & 0xFF


if __name__ == "__main__":
    sys.exit(main())
