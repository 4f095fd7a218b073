"""The one exception tree of dpmigrate.

Every error a user can see derives from :class:`DpmigrateError`. Its message names the
thing involved (stage, ring, node, file) and says what to do next; the CLI prints it as
one line and exits non-zero, never with a traceback.

::

    DpmigrateError
    ├── ConfigError                 a DPMIGRATE_* setting or a manifest value is wrong
    ├── EnvironmentProblem          this machine lacks something (criu, root, netns, ...)
    │   └── CriuNotFound            the criu binary named by DPMIGRATE_CRIU cannot run
    ├── RingError                   anything about a ring
    │   ├── WouldBlock              a *_nowait call could not proceed now
    │   │   └── RingTimeout         a blocking call ran out of time (also a TimeoutError)
    │   ├── RingClosed              *you* closed this end, then used it
    │   ├── EndOfRing               the producer closed cleanly; everything was delivered
    │   ├── RingBroken              the peer went away without closing (crash, cut link)
    │   ├── MessageTooLarge         a message exceeds the ring's maximum message size
    │   ├── ProtocolError           a peer sent malformed or out-of-protocol bytes
    │   ├── ViewExpired             a zero-copy view used after the next receive or commit
    │   └── ViewsHeld               a receive or commit refused: a slice of an expired
    │                               view (or a buffer taken from one) is still alive
    ├── CheckpointError             a CRIU dump or restore failed (quotes CRIU's log, names it)
    │   └── BundleError             an image bundle is missing, corrupt or incompatible
    ├── ControlError                talking to a node agent failed
    │   ├── AuthError               the peer does not know the cluster token
    │   └── RemoteError             the agent refused or failed a request (its words)
    │       └── AgentUnreachable    nothing answers at the agent's address
    ├── SshError                    an SSH node failed at one step (connect, host key, auth,
    │                               remote doctor, agent start, tunnel): host and step named
    ├── MigrationError              a migration failed and was rolled back
    ├── PlacementRefused            no node may take a stage (cordoned, dead, no room), or the
    │                               node named is cordoned: nothing was moved
    └── NativeError                 a syscall in the C core failed (errno and syscall named)

The split between RingClosed and RingBroken follows trio: "Closed" is a bug in the caller,
"Broken" is something that happened to it. WouldBlock is what a non-blocking call raises
instead of waiting; RingTimeout is its blocking cousin.
"""

from __future__ import annotations

import errno as _errno
import os


class DpmigrateError(Exception):
    """Base of every error dpmigrate raises on purpose."""


class ConfigError(DpmigrateError):
    """A setting (environment variable, manifest key, CLI option) has a bad value."""


class EnvironmentProblem(DpmigrateError):
    """The machine lacks something dpmigrate needs; the message says how to get it."""


class CriuNotFound(EnvironmentProblem):
    """The configured criu binary is missing, not executable, or too old."""


class RingError(DpmigrateError):
    """Base of every error about a ring."""


class WouldBlock(RingError):
    """The call would have to wait (ring full on send, empty on receive)."""


class RingTimeout(WouldBlock, TimeoutError):
    """A blocking ring call did not complete within its timeout."""


class RingClosed(RingError):
    """This ring end was closed by its owner and must not be used again."""


class EndOfRing(RingError):
    """The producer closed the ring cleanly and every message has been received."""


class RingBroken(RingError):
    """The peer end vanished without a clean close (crash, kill, cut connection)."""


class MessageTooLarge(RingError, ValueError):
    """A message is larger than the ring's maximum message size."""


class ProtocolError(RingError):
    """The peer sent bytes that do not follow the ring or control protocol."""


class ViewExpired(RingError, ValueError):
    """A batch of zero-copy views (``recv_views``) was used after it expired.

    A batch lives until the next receive or commit on its ring end: after that the ring may
    reuse the memory the views point into, so every access raises this instead of reading
    whatever the memory holds by then. Copy what must outlive the batch with ``bytes(view)``.
    """


class ViewsHeld(RingError, BufferError):
    """A receive or commit was refused because memory of an expired batch is still in use.

    The ring releases the views it handed out; a slice made from one of them (or a numpy
    array or other buffer taken from one) it cannot release. Going on would let the producer
    overwrite memory that slice still shows, so the call refuses until it is dropped.
    """


class CheckpointError(DpmigrateError):
    """CRIU could not dump or restore; the message quotes CRIU's log and names the kept log.

    ``log_file`` is the path of CRIU's log (kept for the operator), ``log_lines`` the lines
    quoted from it and ``detail`` what the RPC answer said, so a caller that moves the log can
    rebuild the message.
    """

    def __init__(
        self,
        message: str,
        *,
        log_file: str | None = None,
        log_lines: tuple[str, ...] = (),
        detail: str = "",
    ) -> None:
        super().__init__(message)
        self.log_file = log_file
        self.log_lines = log_lines
        self.detail = detail


class BundleError(CheckpointError):
    """An image bundle cannot be used: a file is missing, extra, truncated or altered, the
    manifest is unreadable, or the bundle needs a newer CRIU or CPU features this node lacks.
    Nothing is deleted when this is raised."""


class ControlError(DpmigrateError):
    """Base of the errors of the agents' control protocol."""


class AuthError(ControlError):
    """The peer did not prove it knows the cluster token."""


class RemoteError(ControlError):
    """The agent refused or failed a request; the message is the agent's."""


class AgentUnreachable(RemoteError):
    """Nothing answers at the agent's address (the agent is not running there)."""


class SshError(DpmigrateError):
    """One step of reaching or running an SSH node failed. ``host`` and ``step`` are named
    in the message (``HOST: STEP: what happened; what to do``) and kept as attributes."""

    def __init__(self, host: str, step: str, message: str) -> None:
        super().__init__(f"{host}: {step}: {message}")
        self.host = host
        self.step = step


class MigrationError(DpmigrateError):
    """A migration failed (and was rolled back: the message says so and why)."""


class PlacementRefused(DpmigrateError):
    """A placement was refused before anything moved: the node named is cordoned, or (drain)
    some stage has nowhere to go. The message names the stage or node and the way out."""


class NativeError(DpmigrateError, OSError):
    """A system call made by the C core failed."""


def from_errno(syscall: str, err: int, what: str) -> NativeError:
    """Build the one error for a failed syscall: names the call, the object and errno.

    This is the single place where errno values become dpmigrate errors, so every caller
    reports a failing syscall the same way.
    """
    hint = {
        _errno.ENOMEM: "not enough memory (or hugepages) for the ring; use a smaller capacity",
        _errno.EPERM: "permission denied; run as root or check the file's owner",
        _errno.EACCES: "permission denied; run as root or check the file's mode",
        _errno.EMFILE: "too many open files; raise `ulimit -n`",
        _errno.ENOSPC: "no space left; free some space or use a smaller ring",
    }.get(err, "")
    text = f"{syscall}() failed for {what}: {os.strerror(err)} (errno {err})"
    if hint:
        text += f"; {hint}"
    exc = NativeError(err, text)
    exc.args = (text,)
    return exc
