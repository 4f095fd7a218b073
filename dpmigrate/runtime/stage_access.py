"""What a stage process may ask of an agent: the few operations a stage needs, for itself.

A stage authenticates with its own key (:func:`~dpmigrate.runtime.control.stage_key`), not
the cluster token, so the code of an app never holds the credential that starts, stops and
migrates stages. Its session may look up and register the rings of its own app, read its
app's placement, publish and read its own standby record and fetch the credentials of its
own app's rings — and nothing else. Everything else is refused before any handler runs, so
a refused request changes nothing.
"""

from __future__ import annotations

from dpmigrate.errors import ProtocolError

#: Operation -> the arguments naming what it touches (checked against the stage's identity).
STAGE_OPERATIONS: dict[str, tuple[str, ...]] = {
    "ping": (),
    "placement": ("app",),
    "register": ("ring",),
    "unregister": ("ring",),
    "lookup": ("ring",),
    "ring_key": ("ring",),
    "ring_tls": (),
    "standbys": ("app", "stage"),
    "mark_standby": ("app", "stage"),
}

_STATESYNC_SUFFIX = ".statesync"


def check(app: str, stage: str, op: object, args: object) -> None:
    """Raise ProtocolError unless stage ``app/stage`` may call ``op`` with ``args``."""
    if not isinstance(op, str) or op not in STAGE_OPERATIONS:
        raise ProtocolError(
            f"operation {op!r} is not open to a stage (stage {app}/{stage} authenticated with "
            "its own key; only the cluster token may use it)"
        )
    if not isinstance(args, dict):
        return  # the operation table refuses it with its own words
    for field in STAGE_OPERATIONS[op]:
        value = args.get(field)
        if not isinstance(value, str):
            continue  # missing or mistyped: the operation table says so
        if field == "app" and value != app:
            raise ProtocolError(f"stage {app}/{stage} may not use {op!r} for app {value!r}")
        if field == "stage" and value != stage:
            raise ProtocolError(f"stage {app}/{stage} may not use {op!r} for stage {value!r}")
        if field == "ring" and not owns_ring(app, stage, value):
            raise ProtocolError(
                f"stage {app}/{stage} may not use {op!r} for ring {value!r}: not one of its "
                "app's rings"
            )


def owns_ring(app: str, stage: str, ring: str) -> bool:
    """A ring of the stage's app; a state-synchronization channel only of the stage itself
    (its primary serves it, its replicas connect to it)."""
    if not ring.startswith(app + "."):
        return False
    if ring.endswith(_STATESYNC_SUFFIX):
        return ring == f"{app}.{stage}{_STATESYNC_SUFFIX}"
    return True
