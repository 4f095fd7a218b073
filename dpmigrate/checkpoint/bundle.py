"""Image bundles: CRIU images plus what a restore needs to trust them (DESIGN.md §4).

A bundle is one folder::

    BUNDLE/
      manifest.json   format version, versions, CPU/kernel facts, sizes, sha256 of every file
      images/         CRIU's images
      dump.log        CRIU's log of the dump
      stats-dump      CRIU's statistics of the dump (frozen_time, pages_written, ...)
      state.bin       optional: the stage's explicit state snapshot (bytes from the caller)
      rings.json      optional: ring positions (a dict from the caller)

Why a manifest with a checksum of every file: a CRIU image that is truncated or altered does
not always fail the restore — it can restore a process with wrong memory. So a restore first
:func:`verify`s the bundle and refuses anything that does not match, with one error naming the
file; and nothing is ever deleted by verify, load or restore.

The same format carries a live migration's files from the source agent to the destination's
(:mod:`dpmigrate.migrate.stage_transfer`). The source seals (:func:`seal`) the folder its dump
left — images, the state snapshot, the stage's context as ``rings.json`` — and serves only the
files its manifest lists (:func:`read_part`); the destination receives them (:func:`receive`)
into a folder of its own and verifies every file before CRIU sees any. A stop-and-copy dump
sends its memory through CRIU's page server instead, straight into the destination's
``images/``: its manifest names those files as ``streamed`` (only :data:`PAGE_IMAGES`), so
verify accepts them unlisted — and wants them there. A dpmigrate that predates ``streamed``
refuses such a folder (extra files): the safe direction, so the format version stays 1.

Why the temporary sibling folder: :func:`create` builds the bundle under a hidden name next to
the final one, fsyncs it and renames it in one step, so a crash leaves a ``.NAME.partial-*``
folder without a manifest — never a folder under the final name that looks complete. The
folder is mode 0700 and its files 0600: images hold the process's memory, secrets included.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime
import errno
import fnmatch
import hashlib
import json
import os
import platform
import pwd
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dpmigrate import __version__, atomic, config
from dpmigrate.checkpoint import criu_rpc
from dpmigrate.checkpoint.criu_binary import CriuBinary
from dpmigrate.errors import BundleError, CheckpointError, DpmigrateError
from dpmigrate.transports.resolver import NAME_RE

FORMAT = "dpmigrate-bundle"
#: Bump when the layout or the manifest's meaning changes; verify refuses unknown versions.
FORMAT_VERSION = 1

MANIFEST = "manifest.json"
IMAGES = "images"
STATE = "state.bin"
RINGS = "rings.json"
DUMP_LOG = "dump.log"

_CHUNK = 1 << 20
#: Files CRIU's page server writes into the destination's images during a stop-and-copy:
#: the only names a manifest may declare as ``streamed`` (arriving unlisted, never checksummed
#: here: they never existed where the manifest was written).
PAGE_IMAGES = (f"{IMAGES}/pagemap-*.img", f"{IMAGES}/pages-*.img")
#: One component of a file name in a bundle: CRIU's image names, ``state.bin``, ``stats-dump``.
_COMPONENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,254}")
_MAX_NAME = 1024
_MAX_DEPTH = 4

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# --------------------------------------------------------------------------- host facts


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """The CPU feature flags of this machine (first processor's ``flags`` line), sorted."""
    try:
        with open(cpuinfo) as info:
            for line in info:
                if line.startswith("flags"):
                    return sorted(set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return []


@dataclasses.dataclass(frozen=True)
class HostFacts:
    """What decides whether a bundle can be restored on a node.

    :meth:`local` reads this machine; a migration pre-flight can build one from the facts a
    remote agent reports and pass it to :func:`verify` to check the destination instead.
    """

    criu_version: str | None
    cpu_flags: tuple[str, ...]
    kernel: str
    arch: str
    #: Why criu_version is None (criu missing or too broken to say its version).
    criu_problem: str = ""

    @classmethod
    def local(cls, criu: str | None = None) -> HostFacts:
        """This machine's facts; ``criu``: the criu binary (an agent passes the one it was
        configured with; default: this process's ``DPMIGRATE_CRIU``)."""
        version, problem = None, ""
        try:
            version = CriuBinary(criu or config.load().criu).version_text
        except DpmigrateError as err:
            problem = str(err)
        return cls(version, tuple(cpu_flags()), platform.release(), platform.machine(), problem)


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


# --------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class Problem:
    """One reason a bundle cannot be used: the file involved and what is wrong with it."""

    file: str
    problem: str
    #: missing | extra | size | checksum | manifest | incompatible
    kind: str

    def __str__(self) -> str:
        return f"{self.file}: {self.problem}"


@dataclasses.dataclass
class VerifyReport:
    path: str
    problems: list[Problem] = dataclasses.field(default_factory=list)
    #: Facts worth knowing that do not stop a restore (a different kernel release).
    warnings: list[str] = dataclasses.field(default_factory=list)
    manifest: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "problems": [dataclasses.asdict(p) for p in self.problems],
            "warnings": list(self.warnings),
        }


@dataclasses.dataclass
class Bundle:
    """A verified bundle, loaded: its manifest and the caller's state and ring positions."""

    path: Path
    manifest: dict[str, Any]
    state: bytes | None
    rings: dict[str, Any] | None

    @property
    def images_dir(self) -> Path:
        return self.path / IMAGES

    @property
    def root_pid(self) -> int:
        return int(self.manifest["root_pid"])

    @property
    def stage(self) -> str | None:
        return self.manifest.get("stage")

    @property
    def node(self) -> str | None:
        return self.manifest.get("node")


# --------------------------------------------------------------------------- create


def create(
    out: str | os.PathLike[str],
    pid: int,
    *,
    state: bytes | None = None,
    rings: Mapping[str, Any] | None = None,
    stage: str | None = None,
    node: str | None = None,
    netns: str | None = None,
    progress: Progress = _quiet,
    **dump_options: Any,
) -> tuple[Bundle, criu_rpc.DumpResult]:
    """Dump the tree rooted at ``pid`` and write a complete bundle at ``out``.

    ``state`` (bytes) and ``rings`` (a JSON-able dict) are stored as given: take them while the
    process is quiesced, before this call. ``netns`` and ``dump_options`` go to
    :func:`dpmigrate.checkpoint.criu_rpc.dump` (``leave_running``, ``tcp_close``, ...).

    ``out`` must not exist; it appears only when complete. On a CRIU failure nothing is left
    but CRIU's log, kept as ``OUT.dump-failed.log`` and named in the CheckpointError. After a
    successful dump, mind :func:`criu_rpc.remove_network_lock` (see there).
    """
    final = Path(out).absolute()
    if final.exists():
        raise BundleError(f"{final} already exists; choose another output folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        os.chmod(work, 0o700)
        (work / IMAGES).mkdir(mode=0o700)
        progress(f"dumping process {pid} with CRIU")
        try:
            result = criu_rpc.dump(
                pid, work / IMAGES, log_dir=work, log_name=DUMP_LOG, netns=netns, **dump_options
            )
        except CheckpointError as err:
            kept = _keep_failed_log(work / DUMP_LOG, final)
            raise criu_rpc.relocated(err, "dump", str(kept)) from err
        result.images_dir = str(final / IMAGES)
        result.log_file = str(final / DUMP_LOG)
        progress("computing checksums")
        manifest = _seal(
            work, pid, state=state, rings=rings, stage=stage, node=node,
            leave_running=bool(dump_options.get("leave_running", False)),
            dump=result.as_dict(), streamed=(),
        )  # fmt: skip
        progress("syncing to disk")
        _fsync_tree(work)
        _rename_noreplace(work, final)
        atomic.fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    loaded = Bundle(final, manifest, state, dict(rings) if rings is not None else None)
    return loaded, result


def seal(
    root: str | os.PathLike[str],
    pid: int,
    *,
    dump: Mapping[str, Any],
    state: bytes | None = None,
    rings: Mapping[str, Any] | None = None,
    stage: str | None = None,
    node: str | None = None,
    leave_running: bool = True,
    streamed: tuple[str, ...] = (),
    host: HostFacts | None = None,
) -> dict[str, Any]:
    """Make the folder a dump left at ``root`` (``root/images``) a bundle: write ``state`` and
    ``rings`` next to the images, then the manifest listing every file under ``root`` with
    its size and sha256; returns the manifest. ``dump`` is the dump's ``DumpResult.as_dict()``.
    ``streamed`` (a subset of :data:`PAGE_IMAGES`): files that reach the bundle's reader by
    another way (CRIU's page server) and so are not listed. ``host``: this node's facts, if
    the caller has them (default: read them, which runs criu). Nothing is fsynced: this is for a
    migration's folder, which lives as long as the migration; :func:`create` makes bundles
    that must survive a crash.
    """
    folder = Path(root)
    if (folder / MANIFEST).exists():
        raise BundleError(f"{folder} is sealed already ({MANIFEST} exists)")
    if not (folder / IMAGES).is_dir():
        raise BundleError(f"{folder} holds no {IMAGES}/ folder: nothing was dumped there")
    unknown = sorted(set(streamed) - set(PAGE_IMAGES))
    if unknown:
        raise BundleError(f"only {', '.join(PAGE_IMAGES)} can be streamed, not {unknown}")
    return _seal(
        folder, pid, state=state, rings=rings, stage=stage, node=node,
        leave_running=leave_running, dump=dump, streamed=streamed, host=host,
    )  # fmt: skip


def _seal(
    work: Path,
    pid: int,
    *,
    state: bytes | None,
    rings: Mapping[str, Any] | None,
    stage: str | None,
    node: str | None,
    leave_running: bool,
    dump: Mapping[str, Any],
    streamed: tuple[str, ...],
    host: HostFacts | None = None,
) -> dict[str, Any]:
    if state is not None:
        _write(work / STATE, bytes(state))
    if rings is not None:
        _write(work / RINGS, json.dumps(dict(rings), indent=2, sort_keys=True).encode())
    files = _catalogue(work)
    sizes = {
        "images": sum(v["size"] for k, v in files.items() if k.startswith(f"{IMAGES}/")),
        "state": files.get(STATE, {}).get("size", 0),
        "total": sum(v["size"] for v in files.values()),
    }
    host = host or HostFacts.local()
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dpmigrate_version": __version__,
        "criu_version": host.criu_version,
        "kernel": host.kernel,
        "arch": host.arch,
        "cpu_flags": list(host.cpu_flags),
        "stage": stage,
        "node": node,
        "root_pid": pid,
        "leave_running": leave_running,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "sizes": sizes,
        "dump": dict(dump),
        "files": files,
    }
    if streamed:
        manifest["streamed"] = sorted(streamed)
    _write(work / MANIFEST, json.dumps(manifest, indent=2).encode())
    return manifest


def _keep_failed_log(log: Path, final: Path) -> Path:
    """Move CRIU's log of a failed dump next to where the bundle would have been."""
    target = final.with_name(f"{final.name}.dump-failed.log")
    for n in range(1, 100):
        if not target.exists():
            break
        target = final.with_name(f"{final.name}.dump-failed.{n}.log")
    try:
        shutil.move(str(log), target)
    except OSError:
        return log
    return target


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)  # fmt: skip
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _create(dir_fd: int, name: str, data: bytes) -> None:
    """Write a new file ``name`` (mode 0600) in the folder ``dir_fd``; never over another."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=dir_fd)  # fmt: skip
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _catalogue(root: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file a dump left under ``root`` (manifest excluded), each made
    mode 0600 and every folder 0700 on the way: images hold the process's memory. A symbolic
    link or special file there (CRIU writes none) is a BundleError: sealing would vouch for
    whatever it points at."""
    files = {}
    with BundleFolder(root) as folder:
        unsafe = folder.unsafe_problems()
        if unsafe:
            raise BundleError(f"cannot seal {root}: {'; '.join(str(p) for p in unsafe)}")
        for rel, info in folder.entries():
            if stat.S_ISDIR(info.st_mode):
                fd = os.open(rel or ".", _DIR_FLAGS, dir_fd=folder.fd)
                try:
                    os.fchmod(fd, 0o700)
                finally:
                    os.close(fd)
                continue
            if rel == MANIFEST:
                continue
            why = name_problem(rel)
            if why is not None:
                raise BundleError(f"cannot seal {root}: a file the manifest may not list: {why}")
            try:
                fd = folder.open(rel)
            except FileProblem as err:
                raise BundleError(f"cannot seal {root}: {err.problem}") from None
            try:
                os.fchmod(fd, 0o600)
            finally:
                os.close(fd)
            size, digest = folder.sha256(rel)
            files[rel] = {"size": size, "sha256": digest}
    return files


def _fsync_tree(root: Path) -> None:
    for folder, _dirs, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        atomic.fsync_dir(Path(folder))


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _rename_noreplace(src: Path, dst: Path) -> None:
    """rename(2) that fails instead of replacing ``dst`` (an empty folder made meanwhile)."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:  # very old libc: the exists() check in create() has to do
        if dst.exists():
            raise BundleError(f"{dst} appeared while the bundle was written; not replacing it")
        os.rename(src, dst)
        return
    if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE):
        err = ctypes.get_errno()
        raise BundleError(
            f"could not move the finished bundle to {dst}: {os.strerror(err)}; it is not kept"
        )


# --------------------------------------------------------------------------- reading safely

#: The largest manifest read: a dump of thousands of images lists them in well under this.
MAX_MANIFEST_BYTES = 16 << 20
#: The most entries a bundle folder may hold: a walk of a hostile folder stays bounded.
MAX_ENTRIES = 100_000
_TRUST_HINT = "pass --trust-owner (trust_owner=True) to use it anyway"
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted in a bundle must not wait for a writer (fstat refuses it).
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class FileProblem(Exception):
    """A file of a bundle that cannot be read as one: carries the :class:`Problem`."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(str(problem))
        self.problem = problem


def shown(name: str) -> str:
    """``name`` as it may appear in a one-line message: itself when plain, else escaped
    (a file name may hold a newline or bytes that are not UTF-8)."""
    return name if name.isascii() and name.isprintable() else ascii(name)


def _kind_of(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device node"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def _unsafe(rel: str, mode: int) -> Problem:
    return Problem(
        shown(rel),
        f"{_kind_of(mode)}, refused: a bundle holds only regular files in plain folders "
        "(a link or special file would make a restore read something outside it); "
        "remove it or take the bundle again",
        "unsafe",
    )


def _first_named(found: list[tuple[str, os.stat_result]]) -> tuple[str, os.stat_result]:
    """The first of ``found`` (relative path, stat) as a message names it, with how many
    more there are, and its stat."""
    rel, info = found[0]
    what = "the bundle folder" if not rel else shown(rel)
    more = f" (and {len(found) - 1} more of its entries)" if len(found) > 1 else ""
    return what + more, info


def _user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


class BundleFolder:
    """A bundle folder opened once: every later read goes through its descriptor, one path
    component at a time with O_NOFOLLOW, never through a path — so a symbolic link (a file, or
    a folder on the way to it) or a FIFO, device or socket is refused when it is *read*, not
    only when :func:`verify` looked, and a folder renamed meanwhile cannot redirect the reads.

    The bundle's own path may be a symbolic link (the user named it); nothing inside may.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._entries: list[tuple[str, os.stat_result]] | None = None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> BundleFolder:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def entries(self) -> list[tuple[str, os.stat_result]]:
        """Everything in the folder, ``("", the folder itself)`` first, then every entry below
        as ``(relative POSIX path, lstat)``, sorted; links are listed, never followed. Folders
        deeper than a bundle's names go are listed but not entered; at most
        :data:`MAX_ENTRIES` (then BundleError)."""
        if self._entries is None:
            found: list[tuple[str, os.stat_result]] = [("", os.fstat(self.fd))]
            self._walk(self.fd, "", 1, found)
            self._entries = sorted(found, key=lambda item: item[0])
        return self._entries

    def _walk(
        self, fd: int, prefix: str, depth: int, found: list[tuple[str, os.stat_result]]
    ) -> None:
        with os.scandir(fd) as listing:
            children = [(entry.name, entry.stat(follow_symlinks=False)) for entry in listing]
        for name, info in sorted(children):
            rel = f"{prefix}{name}"
            found.append((rel, info))
            if len(found) > MAX_ENTRIES:
                raise BundleError(f"bundle {self.path} holds more than {MAX_ENTRIES} entries: "
                                  "not a bundle dpmigrate wrote; nothing was read")  # fmt: skip
            if stat.S_ISDIR(info.st_mode) and depth < _MAX_DEPTH:
                try:
                    sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except OSError:
                    continue  # replaced meanwhile, or unreadable: its files show as missing
                try:
                    self._walk(sub, f"{rel}/", depth + 1, found)
                finally:
                    os.close(sub)

    def trust_problems(self) -> list[Problem]:
        """Why this bundle must not be trusted as ours ([] if it may): an entry owned by
        another user, or one that group or others may write. Whoever can write a bundle
        chooses what its restore runs — the checksums only prove the files match its
        manifest, which that writer could rewrite as well."""
        me = os.geteuid()
        entries = [(r, i) for r, i in self.entries() if not stat.S_ISLNK(i.st_mode)]
        problems = []
        foreign = [(r, i) for r, i in entries if i.st_uid != me]
        if foreign:
            what, info = _first_named(foreign)
            problems.append(Problem(
                "(owner)",
                f"{what} is owned by {_user(info.st_uid)}, not by you ({_user(me)}): "
                "another user could have chosen what its restore runs. If you trust where it "
                f"came from, `chown -R {me} {shown(str(self.path))}` or {_TRUST_HINT}",
                "untrusted",
            ))  # fmt: skip
        writable = [(r, i) for r, i in entries if i.st_mode & (stat.S_IWGRP | stat.S_IWOTH)]
        if writable:
            what, info = _first_named(writable)
            problems.append(Problem(
                "(mode)",
                f"{what} is writable by group or others (mode "
                f"{stat.S_IMODE(info.st_mode):04o}): anyone could have changed it. If you "
                f"trust its content, `chmod -R go-w {shown(str(self.path))}` or {_TRUST_HINT}",
                "untrusted",
            ))  # fmt: skip
        return problems

    def unsafe_problems(self) -> list[Problem]:
        """Every symbolic link and special file in the folder (never read), as Problems."""
        return [
            _unsafe(rel, info.st_mode)
            for rel, info in self.entries()
            if rel and not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode))
        ]

    def open(self, rel: str) -> int:
        """A read-only descriptor of the regular file ``rel`` (a checked name), reached one
        component at a time without following any link; FileProblem if it is missing, a link
        (itself or a folder on the way), a special file or unreadable."""
        parts = rel.split("/")
        opened: list[int] = []
        at = self.fd
        try:
            for index, part in enumerate(parts):
                last = index == len(parts) - 1
                try:
                    fd = os.open(part, _FILE_FLAGS if last else _DIR_FLAGS, dir_fd=at)
                except FileNotFoundError:
                    raise FileProblem(Problem(shown(rel), "missing", "missing")) from None
                except OSError as err:
                    if err.errno in (errno.ELOOP, errno.ENOTDIR):
                        where = "/".join(parts[: index + 1])
                        mode = os.lstat(part, dir_fd=at).st_mode
                        raise FileProblem(_unsafe(where, mode)) from None
                    raise FileProblem(
                        Problem(shown(rel), f"unreadable ({err.strerror})", "missing")
                    ) from None
                opened.append(fd)
                at = fd
            info = os.fstat(at)
            if not stat.S_ISREG(info.st_mode):
                raise FileProblem(_unsafe(rel, info.st_mode))
            return opened.pop()
        finally:
            for fd in opened:
                os.close(fd)

    def read(self, rel: str, limit: int | None = None) -> bytes:
        """The bytes of the regular file ``rel`` (see :meth:`open`); FileProblem if it holds
        more than ``limit`` bytes."""
        fd = self.open(rel)
        with os.fdopen(fd, "rb") as data:
            if limit is None:
                return data.read()
            raw = data.read(limit + 1)
        if len(raw) > limit:
            raise FileProblem(Problem(shown(rel), f"larger than {limit} bytes", "manifest"))
        return raw

    def sha256(self, rel: str) -> tuple[int, str]:
        """Size and sha256 of the regular file ``rel``, read from one descriptor."""
        fd = self.open(rel)
        digest = hashlib.sha256()
        with os.fdopen(fd, "rb") as data:
            size = os.fstat(data.fileno()).st_size
            while chunk := data.read(_CHUNK):
                digest.update(chunk)
        return size, digest.hexdigest()


def trust_problems(path: str | os.PathLike[str]) -> list[Problem]:
    """:meth:`BundleFolder.trust_problems` of the bundle at ``path`` (a missing or unreadable
    folder: [] — verify says what is wrong with it)."""
    try:
        folder = BundleFolder(path)
    except OSError:
        return []
    with folder:
        return folder.trust_problems()


# --------------------------------------------------------------------------- the manifest


def _fail(problem: str) -> FileProblem:
    return FileProblem(Problem(MANIFEST, problem, "manifest"))


def _typed(manifest: dict[str, Any], field: str, check: Callable[[Any], bool], what: str,
           *, required: bool = False) -> None:  # fmt: skip
    if field not in manifest:
        if required:
            raise _fail(f"field {field!r} is missing; it must be {what}")
        return
    value = manifest[field]
    if not check(value):
        raise _fail(f"field {field!r} must be {what}, not {type(value).__name__} "
                    f"{shown(repr(value)[:80])}")  # fmt: skip


def _is_int(value: Any, minimum: int = 0) -> bool:
    return type(value) is int and value >= minimum


def _is_str(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= _MAX_NAME and value.isprintable()


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and NAME_RE.fullmatch(value) is not None


def _is_stage(value: Any) -> bool:
    """``STAGE`` or ``APP/STAGE``, each a name of the project's strict pattern."""
    return (
        isinstance(value, str)
        and 1 <= len(value.split("/")) <= 2
        and all(NAME_RE.fullmatch(part) for part in value.split("/"))
    )


def _is_dump(value: Any) -> bool:
    """CRIU's statistics: names to plain values, the timings and page counts integers (the
    CLI and inspect compute with them)."""
    return isinstance(value, dict) and all(
        isinstance(key, str)
        and (
            _is_int(item)
            if key.endswith("_time") or key.startswith(("pages_", "shpages_"))
            else item is None
            or isinstance(item, int | str | bool)
            or (isinstance(item, list) and all(isinstance(v, str) for v in item))
        )
        for key, item in value.items()
    )


def check_manifest(manifest: Any) -> dict[str, Any]:
    """``manifest`` (decoded JSON) if it is a bundle manifest this dpmigrate reads, every
    field of the right type; FileProblem naming the first field that is not."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _fail(f"not a {FORMAT} manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION or type(version) is not int:
        raise _fail(f"unknown format version {shown(repr(version)[:40])} (this dpmigrate reads "
                    f"version {FORMAT_VERSION}); use the dpmigrate that wrote it")  # fmt: skip
    _typed(manifest, "files", lambda v: isinstance(v, dict), "an object of files", required=True)
    for name, entry in manifest["files"].items():
        why = name_problem(name)
        if why is not None:
            raise _fail(f"lists a file it may not: {why}")
        if not (
            isinstance(entry, dict)
            and _is_int(entry.get("size"))
            and isinstance(entry.get("sha256"), str)
            and _SHA256_RE.fullmatch(entry["sha256"])
        ):
            raise _fail(f"field 'files' entry {name!r} must be an object with 'size' (an "
                        "integer >= 0) and 'sha256' (64 lowercase hex digits)")  # fmt: skip
    _typed(manifest, "root_pid", lambda v: _is_int(v, 1), "a PID (an integer >= 1)",
           required=True)  # fmt: skip
    optional = lambda check: lambda v: v is None or check(v)  # noqa: E731
    for field in ("dpmigrate_version", "kernel", "arch", "created"):
        _typed(manifest, field, _is_str, "a string")
    _typed(manifest, "criu_version", optional(_is_str), "a version string or null")
    _typed(
        manifest,
        "cpu_flags",
        lambda v: isinstance(v, list) and all(_is_str(f) for f in v),
        "a list of strings",
    )
    _typed(manifest, "stage", optional(_is_stage), f"null or APP/STAGE, names of {NAME_RE.pattern}")
    _typed(manifest, "node", optional(_is_name), f"null or a node name of {NAME_RE.pattern}")
    _typed(manifest, "leave_running", lambda v: isinstance(v, bool), "true or false")
    _typed(
        manifest,
        "sizes",
        lambda v: (
            isinstance(v, dict) and all(isinstance(k, str) and _is_int(n) for k, n in v.items())
        ),
        "an object of sizes (integers >= 0)",
    )
    _typed(manifest, "dump", _is_dump, "an object of CRIU statistics (integer counters)")
    _typed(manifest, "streamed",
           lambda v: isinstance(v, list) and all(p in PAGE_IMAGES for p in v),
           f"a list of {', '.join(PAGE_IMAGES)}")  # fmt: skip
    return manifest


def _decode(data: bytes) -> dict[str, Any]:
    """Bytes of ``manifest.json`` → the checked manifest; FileProblem in one line if not."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise _fail(f"larger than {MAX_MANIFEST_BYTES} bytes: not a manifest dpmigrate wrote")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _fail(f"unreadable: not UTF-8 (byte {err.start})") from None
    try:
        manifest = json.loads(text)
    except RecursionError:
        raise _fail("unreadable: nested too deeply to be a manifest") from None
    except ValueError as err:  # JSONDecodeError, and an integer of too many digits
        raise _fail(f"unreadable: not JSON ({shown(str(err))[:200]})") from None
    return check_manifest(manifest)


def decode_manifest(data: bytes, where: str = "bundle") -> dict[str, Any]:
    """Decode and check the bytes of a ``manifest.json``: the manifest, or one BundleError
    line naming the field (or the decoding problem). ``where`` names the bundle in it."""
    try:
        return _decode(data)
    except FileProblem as err:
        raise refusal(VerifyReport(where, [err.problem])) from None


# --------------------------------------------------------------------------- verify / load


def verify(
    path: str | os.PathLike[str],
    *,
    host: HostFacts | None = None,
    progress: Progress = _quiet,
    trust_owner: bool = False,
) -> VerifyReport:
    """Check a bundle without changing anything: every file present, of its size and checksum,
    nothing extra, a known format, and restorable on ``host`` (default: this node) — CRIU not
    older than the one that dumped it, every CPU flag of the dumping node present. A different
    kernel release is only a warning (CRIU restores across kernels that support its features).

    Refused before anything is read: a bundle of another user or one group or others may
    write (unless ``trust_owner``). Refused always: a symbolic link or special file anywhere
    in it, a manifest field of the wrong type.
    """
    root = Path(path)
    report = VerifyReport(str(root))
    try:
        folder = BundleFolder(root)
    except OSError as err:
        what = (
            "not a folder (no bundle here)"
            if isinstance(err, FileNotFoundError | NotADirectoryError)
            else f"unreadable ({err.strerror})"
        )
        report.problems.append(Problem(str(root), what, "missing"))
        return report
    with folder:
        try:
            _verify_in(folder, report, host, progress, trust_owner)
        except BundleError as err:  # a folder too large to be a bundle
            report.problems.append(Problem(str(root), str(err), "manifest"))
    return report


def _verify_in(
    folder: BundleFolder,
    report: VerifyReport,
    host: HostFacts | None,
    progress: Progress,
    trust_owner: bool,
) -> None:
    if not trust_owner:
        report.problems.extend(folder.trust_problems())
        if report.problems:
            return  # nothing of an untrusted bundle is read
    unsafe = folder.unsafe_problems()
    report.problems.extend(unsafe)
    if any(p.file == MANIFEST for p in unsafe):
        return
    try:
        manifest = _decode(folder.read(MANIFEST, MAX_MANIFEST_BYTES))
    except FileProblem as err:
        problem = err.problem
        if problem.kind == "missing" and problem.problem == "missing":
            problem = Problem(
                MANIFEST, "missing (an incomplete or foreign folder, not a bundle)", "missing"
            )
        report.problems.append(problem)
        return
    report.manifest = manifest
    files = manifest["files"]
    streamed = tuple(manifest.get("streamed", ()))
    kinds = {rel: info for rel, info in folder.entries() if rel}
    present = {rel for rel, info in kinds.items() if stat.S_ISREG(info.st_mode)} - {MANIFEST}
    arrived = {rel for rel in present - set(files) if _is_streamed(rel, streamed)}
    for rel in sorted(present - set(files) - arrived):
        report.problems.append(
            Problem(shown(rel), "extra file, not listed in the manifest", "extra")
        )
    for pattern in streamed:
        if not any(_is_streamed(rel, (pattern,)) for rel in arrived):
            report.problems.append(
                Problem(
                    pattern, "missing: the page server was to write it, none arrived", "missing"
                )
            )
    flagged = {p.file for p in unsafe}
    for rel, entry in sorted(files.items()):
        if rel in flagged:
            continue  # a link or special file: said so, never read
        progress(f"checking {rel}")
        try:
            size, digest = folder.sha256(rel)
        except FileProblem as err:
            if err.problem.file not in flagged:
                report.problems.append(err.problem)
            continue
        if size != entry["size"]:
            what = "truncated" if size < entry["size"] else "size mismatch"
            report.problems.append(
                Problem(rel, f"{what}: {size} bytes, the manifest says {entry['size']}", "size")
            )
        elif digest != entry["sha256"]:
            report.problems.append(
                Problem(rel, "checksum mismatch: the file was altered or corrupted", "checksum")
            )
    _check_host(report, manifest, host or HostFacts.local())


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot name a file of a bundle, or None: it must be a relative POSIX path
    of at most a few components, each starting with a letter or a digit and made of
    ``A-Z a-z 0-9 . _ + -`` (so never empty, ``.``, ``..`` or hidden), and not the manifest.
    Checked before any such name is opened, written or served."""
    if not isinstance(name, str):
        return f"{shown(repr(name)[:80])} is not a string"
    if len(name) > _MAX_NAME:
        return f"a name longer than {_MAX_NAME} characters"
    parts = name.split("/")
    if len(parts) > _MAX_DEPTH or not all(_COMPONENT_RE.fullmatch(part) for part in parts):
        return f"{shown(repr(name[:80]))} is not a plain relative file name inside the bundle"
    if name == MANIFEST:
        return f"{MANIFEST} is the manifest itself, not a file it lists"
    return None


def _listing_problems(manifest: Mapping[str, Any]) -> list[Problem]:
    """What is wrong with a manifest given as a value (a migration's source sends one):
    [] when :func:`check_manifest` accepts it, else its one problem."""
    try:
        check_manifest(dict(manifest))
    except FileProblem as err:
        return [err.problem]
    return []


def _is_streamed(rel: str, patterns: tuple[str, ...]) -> bool:
    """``rel`` is a file of ``images/`` (not below) matching one of ``patterns``."""
    return rel.count("/") == 1 and any(fnmatch.fnmatchcase(rel, p) for p in patterns)


def _check_host(report: VerifyReport, manifest: dict[str, Any], host: HostFacts) -> None:
    made_with = manifest.get("criu_version")
    if host.criu_version is None:
        report.problems.append(
            Problem("(this node)", f"cannot restore here: {host.criu_problem}", "incompatible")
        )
    elif made_with and _version_tuple(made_with) > _version_tuple(host.criu_version):
        report.problems.append(
            Problem(
                MANIFEST,
                f"incompatible: dumped by CRIU {made_with}, this node has the older "
                f"{host.criu_version}; install CRIU >= {made_with} here",
                "incompatible",
            )
        )
    if manifest.get("arch") and manifest["arch"] != host.arch:
        report.problems.append(
            Problem(
                MANIFEST,
                f"incompatible: dumped on {manifest['arch']}, this node is {host.arch}",
                "incompatible",
            )
        )
    missing = sorted(set(manifest.get("cpu_flags") or ()) - set(host.cpu_flags))
    if missing:
        report.problems.append(
            Problem(
                MANIFEST,
                f"incompatible: CPU flags of the dumping node missing here: {' '.join(missing)} "
                "(the restored process may use these instructions); restore on a node with them",
                "incompatible",
            )
        )
    if manifest.get("kernel") and manifest["kernel"] != host.kernel:
        report.warnings.append(
            f"dumped on kernel {manifest['kernel']}, this node runs {host.kernel}"
        )


def refusal(report: VerifyReport) -> BundleError:
    """The one error for a bundle that failed verification; names every file and problem."""
    listed = "; ".join(str(p) for p in report.problems)
    return BundleError(
        f"bundle {report.path} refused: {listed}. Nothing was restored and nothing deleted"
    )


def _open_verified(
    path: str | os.PathLike[str],
    host: HostFacts | None,
    progress: Progress,
    trust_owner: bool,
) -> tuple[VerifyReport, BundleFolder | None]:
    """:func:`verify`, keeping the folder open when it passed (the caller closes it)."""
    root = Path(path).absolute()
    report = VerifyReport(str(root))
    try:
        folder = BundleFolder(root)
    except OSError:
        return verify(root, host=host, progress=progress, trust_owner=trust_owner), None
    try:
        _verify_in(folder, report, host, progress, trust_owner)
    except BundleError as err:
        report.problems.append(Problem(str(root), str(err), "manifest"))
    if not report.ok:
        folder.close()
        return report, None
    return report, folder


def _read_listed(folder: BundleFolder, name: str, entry: Mapping[str, Any]) -> bytes:
    """The bytes of a listed file, checked again against its entry as they are read: what
    was verified is what is used, even if the file changed since."""
    try:
        data = folder.read(name, int(entry["size"]))
    except FileProblem as err:
        raise refusal(VerifyReport(str(folder.path), [err.problem])) from None
    if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise refusal(VerifyReport(str(folder.path), [Problem(
            name, "changed after it was verified (size or checksum)", "checksum")]))  # fmt: skip
    return data


def load(
    path: str | os.PathLike[str],
    *,
    host: HostFacts | None = None,
    progress: Progress = _quiet,
    trust_owner: bool = False,
) -> Bundle:
    """Verify the bundle, then read it; BundleError (naming file and problem) if anything is
    wrong. Never deletes or changes anything. ``trust_owner``: accept a bundle of another
    user or one group or others may write (see :meth:`BundleFolder.trust_problems`)."""
    report, folder = _open_verified(path, host, progress, trust_owner)
    if folder is None or report.manifest is None:
        raise refusal(report)
    with folder:
        files = report.manifest["files"]
        state = _read_listed(folder, STATE, files[STATE]) if STATE in files else None
        raw = _read_listed(folder, RINGS, files[RINGS]) if RINGS in files else None
    rings = None
    if raw is not None:
        try:
            rings = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as err:
            raise BundleError(f"bundle {folder.path} refused: {RINGS}: not JSON "
                              f"({shown(str(err))[:200]})") from None  # fmt: skip
        if not isinstance(rings, dict):
            raise BundleError(f"bundle {folder.path} refused: {RINGS}: not a JSON object")
    return Bundle(folder.path, report.manifest, state, rings)


# --------------------------------------------------------------------------- moving a bundle

#: A reader of the remote bundle's files: ``(name, offset, size)`` → ``(data, file_size)``,
#: ``data`` at most ``size`` bytes (empty at the end of the file), ``file_size`` the file's
#: size where it is read.
ReadPart = Callable[[str, int, int], tuple[bytes, int]]


def read_part(
    root: str | os.PathLike[str], manifest: Mapping[str, Any], name: str, offset: int, size: int
) -> tuple[bytes, int]:
    """Up to ``size`` bytes at ``offset`` of the file ``name`` of the sealed bundle at
    ``root``, and that file's size: what a migration's source serves. Only a file that
    ``manifest`` lists is read — never a streamed, unlisted or traversing name, the manifest
    itself, a symbolic link (the file or a folder on the way) or anything but a regular file:
    BundleError."""
    why = name_problem(name)
    files = manifest.get("files")
    if why is None and not (isinstance(files, Mapping) and name in files):
        why = f"{name!r} is not listed in its manifest; only listed files are served"
    if why is None and (type(offset) is not int or type(size) is not int or offset < 0
                        or size < 0):  # fmt: skip
        why = f"offset {offset!r} and size {size!r} must be integers and must not be negative"
    if why is not None:
        raise BundleError(f"bundle {root}: refusing to read {shown(str(name)[:80])}: {why}")
    try:
        with BundleFolder(root) as folder:
            fd = folder.open(name)
    except OSError as err:
        raise BundleError(f"bundle {root}: cannot read {name}: {err.strerror}") from err
    except FileProblem as err:
        raise BundleError(f"bundle {root}: not serving {err.problem}") from None
    try:
        return os.pread(fd, size, offset), os.fstat(fd).st_size
    finally:
        os.close(fd)


def receive(
    root: str | os.PathLike[str],
    manifest: Mapping[str, Any],
    read: ReadPart,
    *,
    chunk: int = _CHUNK,
    host: HostFacts | None = None,
) -> int:
    """Build the bundle ``manifest`` describes at ``root`` from a remote copy, pulling every
    file it lists with ``read``, then :func:`verify` it: every file of its size and sha256,
    streamed pages present, restorable on ``host`` (default: this node). Returns the bytes
    received.

    ``root`` may exist (a page server may have written ``images/`` already) but must hold no
    manifest. Every name and field is checked before anything is written; files are created
    new (mode 0600, folders 0700), never over an existing one, and never through a symbolic
    link. The manifest is written last, so a folder that stopped midway has none. On any
    problem: BundleError naming each file and what is wrong, in one line; nothing is removed
    (the caller owns ``root``).
    """
    folder = Path(root)
    manifest = dict(manifest)
    problems = _listing_problems(manifest)
    if problems:
        raise refusal(VerifyReport(str(folder), problems))
    if (folder / MANIFEST).exists():
        raise BundleError(f"{folder} already holds a bundle; receive into a fresh folder")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    total = 0
    with BundleFolder(folder) as into:
        for name, entry in sorted(manifest["files"].items()):
            got, problem = _receive_file(into, name, int(entry["size"]), read, chunk)
            total += got
            if problem is not None:
                problems.append(problem)
        _create(into.fd, MANIFEST, json.dumps(manifest, indent=2).encode())
    report = verify(folder, host=host)
    flagged = {p.file for p in report.problems}  # a short copy: verify says "truncated"
    report.problems[:0] = [p for p in problems if p.file not in flagged]
    if not report.ok:
        raise refusal(report)
    return total


def _parent_fd(into: BundleFolder, name: str) -> int:
    """A descriptor of the folder that holds ``name`` (a checked name), made (0700) where
    missing; never reached through a symbolic link."""
    at = os.dup(into.fd)
    for part in name.split("/")[:-1]:
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o700, dir_fd=at)
            nxt = os.open(part, _DIR_FLAGS, dir_fd=at)
        except OSError as err:
            raise BundleError(
                f"cannot make {part}/ for {name} in {into.path}: {err.strerror} (a symbolic "
                "link or a file where a folder belongs?); receive into a fresh folder"
            ) from None
        finally:
            os.close(at)
        at = nxt
    return at


def _receive_file(
    into: BundleFolder, name: str, size: int, read: ReadPart, chunk: int
) -> tuple[int, Problem | None]:
    """Pull one listed file of ``size`` bytes into ``into``; a Problem when the source's
    copy is not of that size (verify then says what arrived)."""
    parent = _parent_fd(into, name)
    try:
        fd = os.open(name.rsplit("/", 1)[-1],
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=parent)  # fmt: skip
    except FileExistsError as err:
        raise BundleError(
            f"{name} is already in {into.path}: a file the manifest lists arrived some other "
            "way; receive into a fresh folder"
        ) from err
    finally:
        os.close(parent)
    got, at_source = 0, size
    with os.fdopen(fd, "wb") as out:
        while got < size:
            data, at_source = read(name, got, min(chunk, size - got))
            if not data:
                break  # the source's copy is shorter: verify says truncated
            out.write(data[: size - got])
            got += min(len(data), size - got)
    if at_source != size:
        return got, Problem(
            name, f"size mismatch at the source: {at_source} bytes, the manifest says {size}",
            "size",
        )  # fmt: skip
    return got, None


# --------------------------------------------------------------------------- restore


def restore(
    bundle: Bundle | str | os.PathLike[str],
    *,
    netns: str | None = None,
    log_dir: str | os.PathLike[str] | None = None,
    progress: Progress = _quiet,
    trust_owner: bool = False,
    **restore_options: Any,
) -> criu_rpc.RestoreResult:
    """Restore a bundle (verified first when given as a path, ``trust_owner`` as for
    :func:`load`); returns the restored root PID.

    The restore runs from a scratch folder of symlinks to the bundle's images (its listed
    and streamed regular files only), with CRIU's work folder (log, ``stats-restore``) outside
    the bundle: whatever CRIU writes, the bundle stays byte-identical and verifiable. CRIU's
    log goes to ``log_dir/restore.log`` when ``log_dir`` is given (kept); otherwise it is kept
    only on failure and named in the CheckpointError.
    ``restore_options`` go to :func:`criu_rpc.restore` (``restore_sibling``, ``pidfile``, ...).
    """
    if not isinstance(bundle, Bundle):
        progress("verifying the bundle")
        bundle = load(bundle, progress=progress, trust_owner=trust_owner)
    scratch = Path(tempfile.mkdtemp(prefix="dpmigrate-restore-"))
    os.chmod(scratch, 0o700)
    try:
        for name in sorted(os.listdir(bundle.images_dir)):
            image = bundle.images_dir / name
            if name != "stats-restore" and stat.S_ISREG(os.lstat(image).st_mode):
                os.symlink(image, scratch / name)
        progress("restoring with CRIU")
        logs = Path(log_dir) if log_dir is not None else scratch
        result = criu_rpc.restore(scratch, netns=netns, log_dir=logs, **restore_options)
    except CheckpointError:
        for link in scratch.iterdir():  # keep the log (and CRIU's stats), drop the links
            if link.is_symlink():
                link.unlink()
        raise
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    result.images_dir = str(bundle.images_dir)
    if log_dir is None:
        shutil.rmtree(scratch, ignore_errors=True)
        result.log_file = ""
    else:
        with contextlib.suppress(OSError):
            shutil.rmtree(scratch)
    return result
