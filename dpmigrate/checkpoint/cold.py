"""What a *cold* restore reads from a stage bundle: its state snapshot and ring positions.

A cold restore (DESIGN.md §5 (c)) starts a fresh instance of the stage from ``state.bin``
(the explicit state at the checkpoint's point) and ``rings.json`` (the stage's context: app,
stage, manifest, run folder, model and the ring positions of that point) — for when CRIU
cannot restore the images: another kernel or CPU, no CRIU on the target. So it needs neither
``images/`` nor this machine's CRIU, CPU flags or kernel to match the manifest, and
:func:`read` checks none of them. It checks everything it uses: the manifest's format, the
size and sha256 of ``state.bin`` and ``rings.json`` as the manifest lists them, that the
context is complete, and that the snapshot decodes to the version and digest the context
recorded at the checkpoint. Anything wrong is one BundleError naming the file; nothing is
changed or deleted.

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


def read(path: str | os.PathLike[str]) -> ColdBundle:
    """Verify and read what a cold restore uses of the bundle at ``path`` (see the module)."""
    root = Path(path).absolute()
    manifest = _manifest(root)
    files = manifest["files"]
    absent = [name for name in (bundles.STATE, bundles.RINGS) if name not in files]
    if absent:
        raise BundleError(
            f"bundle {root} holds no {' and no '.join(absent)} (no state snapshot or ring "
            "positions): it is a process checkpoint (`dpmigrate checkpoint --pid`), which only "
            "CRIU can restore — use `dpmigrate restore DIR` without --cold on a host whose CRIU, "
            "CPU and kernel fit its manifest; for a bundle that can be restored cold, checkpoint "
            "the stage by name (`dpmigrate checkpoint APP/STAGE --out DIR`)"
        )
    snapshot, rings = (_checked(root, name, files[name]) for name in (bundles.STATE, bundles.RINGS))
    try:
        context = json.loads(rings)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _refused(root, bundles.RINGS, f"not JSON ({err})") from err
    _check_context(root, context)
    try:
        state = State.restore(snapshot)
    except ConfigError as err:
        raise _refused(root, bundles.STATE, str(err)) from err
    for field, value in (("state_version", state.version), ("state_digest", state.digest())):
        if field in context and context[field] != value:
            raise _refused(
                root, bundles.STATE,
                f"its {field} {value!r} is not the {context[field]!r} that {bundles.RINGS} "
                "recorded at the checkpoint",
            )  # fmt: skip
    named = manifest.get("stage")
    if named and named != f"{context['app']}/{context['stage']}":
        raise _refused(root, bundles.RINGS, f"names stage {context['app']}/{context['stage']}, "
                       f"the manifest {named}")  # fmt: skip
    return ColdBundle(root, manifest, state, context)


def _refused(root: Path, name: str, problem: str) -> BundleError:
    return BundleError(
        f"bundle {root} refused for a cold restore: {name}: {problem}. Nothing was restored "
        "and nothing deleted"
    )


def _manifest(root: Path) -> dict[str, Any]:
    name = bundles.MANIFEST
    if not root.is_dir():
        raise _refused(root, str(root), "not a folder (no bundle here)")
    try:
        manifest = json.loads((root / name).read_text())
    except FileNotFoundError as err:
        raise _refused(root, name, "missing (an incomplete or foreign folder)") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _refused(root, name, f"unreadable ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != bundles.FORMAT:
        raise _refused(root, name, f"not a {bundles.FORMAT} manifest")
    if manifest.get("format_version") != bundles.FORMAT_VERSION:
        raise _refused(
            root, name,
            f"unknown format version {manifest.get('format_version')!r} (this dpmigrate reads "
            f"version {bundles.FORMAT_VERSION}); use the dpmigrate that wrote it",
        )  # fmt: skip
    if not isinstance(manifest.get("files"), dict):
        raise _refused(root, name, "has no valid file list")
    return manifest


def _checked(root: Path, name: str, entry: object) -> bytes:
    """The bytes of ``name``: there, a regular file of the size and sha256 its manifest entry
    says (read once: what is checked is what is used)."""
    if not (
        isinstance(entry, dict)
        and type(entry.get("size")) is int
        and isinstance(entry.get("sha256"), str)
    ):
        raise _refused(root, bundles.MANIFEST, f"its entry for {name} is malformed")
    path = root / name
    if path.is_symlink() or not path.is_file():
        raise _refused(root, name, "missing (or not a regular file)")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise _refused(root, name, f"unreadable ({err.strerror})") from err
    if len(data) != entry["size"]:
        what = "truncated" if len(data) < entry["size"] else "size mismatch"
        raise _refused(root, name, f"{what}: {len(data)} bytes, the manifest says {entry['size']}")
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
