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
import fnmatch
import hashlib
import json
import os
import platform
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
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as data:
        while chunk := data.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files_under(root: Path) -> list[str]:
    """Every file below ``root`` as a POSIX relative path, manifest excluded, sorted."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in names:
            rel = os.path.relpath(os.path.join(folder, name), root)
            if rel != MANIFEST:
                found.append(Path(rel).as_posix())
    return sorted(found)


def _catalogue(root: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for rel in _files_under(root):
        path = root / rel
        os.chmod(path, 0o600)
        files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
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


# --------------------------------------------------------------------------- verify / load


def verify(
    path: str | os.PathLike[str], *, host: HostFacts | None = None, progress: Progress = _quiet
) -> VerifyReport:
    """Check a bundle without changing anything: every file present, of its size and checksum,
    nothing extra, a known format, and restorable on ``host`` (default: this node) — CRIU not
    older than the one that dumped it, every CPU flag of the dumping node present. A different
    kernel release is only a warning (CRIU restores across kernels that support its features).
    """
    root = Path(path)
    report = VerifyReport(str(root))
    manifest_path = root / MANIFEST
    if not root.is_dir():
        report.problems.append(Problem(str(root), "not a folder (no bundle here)", "missing"))
        return report
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        report.problems.append(
            Problem(MANIFEST, "missing (an incomplete or foreign folder, not a bundle)", "missing")
        )
        return report
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        report.problems.append(Problem(MANIFEST, f"unreadable ({err})", "manifest"))
        return report
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        report.problems.append(Problem(MANIFEST, f"not a {FORMAT} manifest", "manifest"))
        return report
    if manifest.get("format_version") != FORMAT_VERSION:
        report.problems.append(
            Problem(
                MANIFEST,
                f"unknown format version {manifest.get('format_version')!r} (this dpmigrate "
                f"reads version {FORMAT_VERSION}); use the dpmigrate that wrote it",
                "manifest",
            )
        )
        return report
    listing = _listing_problems(manifest)
    if listing:
        report.problems.extend(listing)
        return report
    report.manifest = manifest
    files = manifest["files"]
    streamed = tuple(manifest.get("streamed", ()))
    present = set(_files_under(root))
    arrived = {rel for rel in present - set(files) if _is_streamed(rel, streamed)}
    for rel in sorted(present - set(files) - arrived):
        report.problems.append(Problem(rel, "extra file, not listed in the manifest", "extra"))
    for pattern in streamed:
        if not any(_is_streamed(rel, (pattern,)) for rel in arrived):
            report.problems.append(
                Problem(
                    pattern, "missing: the page server was to write it, none arrived", "missing"
                )
            )
    for rel, entry in sorted(files.items()):
        file = root / rel
        if rel not in present:
            report.problems.append(Problem(rel, "missing", "missing"))
            continue
        size = file.stat().st_size
        if size != entry["size"]:
            what = "truncated" if size < entry["size"] else "size mismatch"
            report.problems.append(
                Problem(rel, f"{what}: {size} bytes, the manifest says {entry['size']}", "size")
            )
            continue
        progress(f"checking {rel}")
        try:
            digest = _sha256(file)
        except OSError as err:
            report.problems.append(Problem(rel, f"unreadable ({err.strerror})", "missing"))
            continue
        if digest != entry["sha256"]:
            report.problems.append(
                Problem(rel, "checksum mismatch: the file was altered or corrupted", "checksum")
            )
    _check_host(report, manifest, host or HostFacts.local())
    return report


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot name a file of a bundle, or None: it must be a relative POSIX path
    of at most a few components, each starting with a letter or a digit and made of
    ``A-Z a-z 0-9 . _ + -`` (so never empty, ``.``, ``..`` or hidden), and not the manifest.
    Checked before any such name is opened, written or served."""
    if not isinstance(name, str):
        return f"{name!r} is not a string"
    if len(name) > _MAX_NAME:
        return f"a name longer than {_MAX_NAME} characters"
    parts = name.split("/")
    if len(parts) > _MAX_DEPTH or not all(_COMPONENT_RE.fullmatch(part) for part in parts):
        return f"{name[:80]!r} is not a plain relative file name inside the bundle"
    if name == MANIFEST:
        return f"{MANIFEST} is the manifest itself, not a file it lists"
    return None


def _listing_problems(manifest: dict[str, Any]) -> list[Problem]:
    """What is wrong with a manifest's file list and ``streamed`` patterns ([] if nothing)."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(v, dict)
        and type(v.get("size")) is int
        and v["size"] >= 0
        and isinstance(v.get("sha256"), str)
        for v in files.values()
    ):
        return [Problem(MANIFEST, "has no valid file list", "manifest")]
    problems = []
    for name in sorted(files):
        why = name_problem(name)
        if why is not None:
            problems.append(Problem(MANIFEST, f"lists a file it may not: {why}", "manifest"))
    streamed = manifest.get("streamed", [])
    if not isinstance(streamed, list) or not set(streamed) <= set(PAGE_IMAGES):
        problems.append(
            Problem(
                MANIFEST,
                f"'streamed' may only name {', '.join(PAGE_IMAGES)}, not {streamed!r}"[:300],
                "manifest",
            )
        )
    return problems


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


def load(
    path: str | os.PathLike[str], *, host: HostFacts | None = None, progress: Progress = _quiet
) -> Bundle:
    """Verify the bundle, then read it; BundleError (naming file and problem) if anything is
    wrong. Never deletes or changes anything."""
    report = verify(path, host=host, progress=progress)
    if not report.ok or report.manifest is None:
        raise refusal(report)
    root = Path(path).absolute()
    files = report.manifest["files"]
    state = (root / STATE).read_bytes() if STATE in files else None
    rings = None
    if RINGS in files:
        try:
            rings = json.loads((root / RINGS).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BundleError(f"bundle {root} refused: {RINGS}: not JSON ({err})") from err
    return Bundle(root, report.manifest, state, rings)


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
    itself, a symbolic link or anything but a regular file: BundleError."""
    why = name_problem(name)
    if why is None and name not in manifest.get("files", {}):
        why = f"{name!r} is not listed in its manifest; only listed files are served"
    if why is None and (offset < 0 or size < 0):
        why = f"offset {offset} and size {size} must not be negative"
    if why is not None:
        raise BundleError(f"bundle {root}: refusing to read {name[:80]!r}: {why}")
    path = Path(root) / name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        raise BundleError(f"bundle {root}: cannot read {name}: {err.strerror}") from err
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BundleError(f"bundle {root}: {name} is not a regular file; not served")
        return os.pread(fd, size, offset), info.st_size
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
    manifest. Every name is checked before anything is written; files are created new (mode
    0600, folders 0700), never over an existing one. The manifest is written last, so a
    folder that stopped midway has none. On any problem: BundleError naming each file and
    what is wrong, in one line; nothing is removed (the caller owns ``root``).
    """
    folder = Path(root)
    manifest = dict(manifest)
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"bundle {folder} refused: {MANIFEST}: not a {FORMAT} manifest of "
                          f"version {FORMAT_VERSION}")  # fmt: skip
    problems = _listing_problems(manifest)
    if problems:
        raise refusal(VerifyReport(str(folder), problems))
    if (folder / MANIFEST).exists():
        raise BundleError(f"{folder} already holds a bundle; receive into a fresh folder")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    total = 0
    for name, entry in sorted(manifest["files"].items()):
        got, problem = _receive_file(folder, name, int(entry["size"]), read, chunk)
        total += got
        if problem is not None:
            problems.append(problem)
    _write(folder / MANIFEST, json.dumps(manifest, indent=2).encode())
    report = verify(folder, host=host)
    flagged = {p.file for p in report.problems}  # a short copy: verify says "truncated"
    report.problems[:0] = [p for p in problems if p.file not in flagged]
    if not report.ok:
        raise refusal(report)
    return total


def _receive_file(
    folder: Path, name: str, size: int, read: ReadPart, chunk: int
) -> tuple[int, Problem | None]:
    """Pull one listed file of ``size`` bytes into ``folder``; a Problem when the source's
    copy is not of that size (verify then says what arrived)."""
    path = folder / name
    for parent in reversed(path.relative_to(folder).parents[:-1]):
        (folder / parent).mkdir(mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)  # fmt: skip
    except FileExistsError as err:
        raise BundleError(
            f"{name} is already in {folder}: a file the manifest lists arrived some other way; "
            "receive into a fresh folder"
        ) from err
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
    **restore_options: Any,
) -> criu_rpc.RestoreResult:
    """Restore a bundle (verified first when given as a path); returns the restored root PID.

    The restore runs from a scratch folder of symlinks to the bundle's images, with CRIU's
    work folder (log, ``stats-restore``) outside the bundle: whatever CRIU writes, the bundle
    stays byte-identical and verifiable. CRIU's log goes to ``log_dir/restore.log`` when
    ``log_dir`` is given (kept); otherwise it is kept only on failure and named in the
    CheckpointError.
    ``restore_options`` go to :func:`criu_rpc.restore` (``restore_sibling``, ``pidfile``, ...).
    """
    if not isinstance(bundle, Bundle):
        progress("verifying the bundle")
        bundle = load(bundle, progress=progress)
    scratch = Path(tempfile.mkdtemp(prefix="dpmigrate-restore-"))
    os.chmod(scratch, 0o700)
    try:
        for name in sorted(os.listdir(bundle.images_dir)):
            if name != "stats-restore":
                os.symlink(bundle.images_dir / name, scratch / name)
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
