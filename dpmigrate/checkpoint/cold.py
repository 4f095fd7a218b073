"""What a *cold* restore reads from a stage bundle: its state snapshot and ring positions.

A cold restore (DESIGN.md §5 (c)) starts a fresh instance of the stage from ``state.bin``
(the explicit state at the checkpoint's point) and ``rings.json`` (the stage's context: app,
stage, manifest, run folder, model and the ring positions of that point) — for when CRIU
cannot restore the images: another kernel or CPU, no CRIU on the target. So it needs neither
``images/`` nor this machine's CRIU, CPU flags or kernel to match the manifest, and
:func:`read` checks none of them. It checks everything it uses: the manifest, through the one
reader of bundles (:func:`dpmigrate.checkpoint.bundle.decode_manifest`: format, version and
every field of its type), the size and sha256 of ``state.bin`` and ``rings.json`` as the
manifest lists them, that the context is complete, and that the snapshot decodes to the
version and digest the context recorded at the checkpoint.

It reads the folder as :func:`~dpmigrate.checkpoint.bundle.verify` does: through one
:class:`~dpmigrate.checkpoint.bundle.BundleFolder`, never following a link; a symbolic link or
special file anywhere in the bundle is refused, and so — before anything is read — is a
bundle of another user or one group or others may write, unless ``trust_owner``. Anything
wrong is one BundleError line naming the file or field; nothing is changed or deleted.

The agent side of the restore is :mod:`dpmigrate.migrate.cold_restore`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from dpmigrate.checkpoint import bundle as bundles
from dpmigrate.errors import BundleError, ConfigError
from dpmigrate.statesync.state import State

#: What ``rings.json`` must hold for a stage to start from it.
CONTEXT_KEYS = ("app", "stage", "manifest", "run_dir", "model", "positions")


@dataclasses.dataclass(frozen=True)
class ColdBundle:
    """A stage bundle's point, verified: where the stage starts when restored cold."""

    path: Path
    manifest: dict[str, Any]
    state: State
    #: rings.json: app, stage, manifest, run_dir, model, positions, state_version, state_digest
    context: dict[str, Any]

    @property
    def key(self) -> str:
        return f"{self.context['app']}/{self.context['stage']}"

    @property
    def node(self) -> str | None:
        """The node the stage was checkpointed on."""
        node = self.manifest.get("node")
        return str(node) if node else None

    @property
    def leave_running(self) -> bool:
        """The stage ran on after the checkpoint (a later point may be in its journal)."""
        return bool(self.manifest.get("leave_running"))

    @property
    def inputs(self) -> dict[str, int]:
        return dict(self.context["positions"]["inputs"])

    @property
    def outputs(self) -> dict[str, int]:
        return dict(self.context["positions"]["outputs"])


def read(path: str | os.PathLike[str], *, trust_owner: bool = False) -> ColdBundle:
    """Verify and read what a cold restore uses of the bundle at ``path`` (see the module).
    ``trust_owner``: accept a bundle of another user, or one group or others may write (as
    for :func:`dpmigrate.checkpoint.bundle.load`)."""
    root = Path(path).absolute()
    try:
        folder = bundles.BundleFolder(root)
    except OSError as err:
        what = (
            "not a folder (no bundle here)"
            if isinstance(err, FileNotFoundError | NotADirectoryError)
            else f"unreadable ({err.strerror})"
        )
        raise _refused(root, str(root), what) from None
    with folder:
        manifest = _manifest(root, folder, trust_owner)
        files = manifest["files"]
        absent = [name for name in (bundles.STATE, bundles.RINGS) if name not in files]
        if absent:
            raise BundleError(
                f"bundle {root} holds no {' and no '.join(absent)} (no state snapshot or ring "
                "positions): it is a process checkpoint (`dpmigrate checkpoint --pid`), which "
                "only CRIU can restore — use `dpmigrate restore DIR` without --cold on a host "
                "whose CRIU, CPU and kernel fit its manifest; for a bundle that can be restored "
                "cold, checkpoint the stage by name (`dpmigrate checkpoint APP/STAGE --out DIR`)"
            )
        snapshot, rings = (
            _checked(root, folder, name, files[name]) for name in (bundles.STATE, bundles.RINGS)
        )
    try:
        context = json.loads(rings.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise _refused(root, bundles.RINGS, f"not JSON ({bundles.shown(str(err))[:200]})") from None
    _check_context(root, context)
    try:
        state = State.restore(snapshot)
    except ConfigError as err:
        raise _refused(root, bundles.STATE, str(err)) from err
    for field, value in (("state_version", state.version), ("state_digest", state.digest())):
        if field in context and context[field] != value:
            raise _refused(
                root, bundles.STATE,
                f"its {field} {value!r} is not the {_shown(context[field])} that "
                f"{bundles.RINGS} recorded at the checkpoint",
            )  # fmt: skip
    named = manifest.get("stage")
    if named and named != f"{context['app']}/{context['stage']}":
        raise _refused(root, bundles.RINGS, "names stage "
                       f"{bundles.shown(context['app'] + '/' + context['stage'])[:200]}, the "
                       f"manifest {named}")  # fmt: skip
    return ColdBundle(root, manifest, state, context)


def _shown(value: object) -> str:
    """``value`` (from a bundle: anything) as it may appear in a one-line message."""
    return bundles.shown(repr(value)[:80])


def _refused(root: Path, name: str, problem: str) -> BundleError:
    return BundleError(
        f"bundle {root} refused for a cold restore: {name}: {problem}. Nothing was restored "
        "and nothing deleted"
    )


def _refusal(root: Path, problems: list[bundles.Problem]) -> BundleError:
    listed = "; ".join(str(p) for p in problems)
    return BundleError(
        f"bundle {root} refused for a cold restore: {listed}. Nothing was restored and "
        "nothing deleted"
    )


def _manifest(root: Path, folder: bundles.BundleFolder, trust_owner: bool) -> dict[str, Any]:
    """The bundle's manifest, decoded and checked as verify does — after the folder's owner
    and modes (unless ``trust_owner``) and the absence of any link or special file."""
    if not trust_owner:
        untrusted = folder.trust_problems()
        if untrusted:
            raise _refusal(root, untrusted)  # nothing of an untrusted bundle is read
    unsafe = folder.unsafe_problems()
    if unsafe:
        raise _refusal(root, unsafe)
    try:
        data = folder.read(bundles.MANIFEST, bundles.MAX_MANIFEST_BYTES)
    except bundles.FileProblem as err:
        problem = err.problem
        if problem.kind == "missing" and problem.problem == "missing":
            problem = bundles.Problem(
                bundles.MANIFEST, "missing (an incomplete or foreign folder, not a bundle)",
                "missing",
            )  # fmt: skip
        raise _refusal(root, [problem]) from None
    return bundles.decode_manifest(data, str(root))


def _checked(root: Path, folder: bundles.BundleFolder, name: str, entry: dict[str, Any]) -> bytes:
    """The bytes of ``name``: a regular file in ``folder`` (reached without following a link)
    of the size and sha256 its manifest entry (checked by decode_manifest) says, read once:
    what is checked is what is used."""
    size = int(entry["size"])
    try:
        fd = folder.open(name)
    except bundles.FileProblem as err:
        raise _refusal(root, [err.problem]) from None
    try:
        with os.fdopen(fd, "rb") as source:
            data = source.read(size + 1)
            actual = max(os.fstat(source.fileno()).st_size, len(data))
    except OSError as err:
        raise _refused(root, name, f"unreadable ({err.strerror})") from None
    if len(data) != size:
        what = "truncated" if len(data) < size else "size mismatch"
        raise _refused(root, name, f"{what}: {actual} bytes, the manifest says {size}")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise _refused(root, name, "checksum mismatch: the file was altered or corrupted")
    return data


def _check_context(root: Path, context: object) -> None:
    if not isinstance(context, dict):
        raise _refused(root, bundles.RINGS, "not an object")
    missing = [key for key in CONTEXT_KEYS if key not in context]
    if missing:
        raise _refused(root, bundles.RINGS, f"lacks {missing}: not a stage checkpoint; restore "
                       "it with `dpmigrate restore DIR` (CRIU) instead")  # fmt: skip
    if not all(isinstance(context[k], str) for k in CONTEXT_KEYS[:-1]):
        raise _refused(root, bundles.RINGS, f"{', '.join(CONTEXT_KEYS[:-1])} must be strings")
    positions = context["positions"]
    if not (
        isinstance(positions, dict)
        and all(_is_positions(positions.get(side)) for side in ("inputs", "outputs"))
    ):
        raise _refused(root, bundles.RINGS, "'positions' must hold 'inputs' and 'outputs', "
                       "each mapping a port to a sequence number >= 0")  # fmt: skip


def _is_positions(value: object) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and type(v) is int and v >= 0 for k, v in value.items()
    )
