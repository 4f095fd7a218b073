"""dpmigrate: run data-plane stages across nodes and live-migrate them without losing a message.

The package is laid out by concern (DESIGN.md §2): ``transports`` (rings), ``native`` (the C
core of the shm ring), ``statesync``, ``checkpoint``, ``migrate``, ``runtime``; dependencies
point one way, from ``migrate`` down to ``native``.

The Python API for orchestration scripts::

    from dpmigrate import App, LocalCluster, MultiNodeRun

    app = App.load("examples/flows/app.toml")
    with LocalCluster(nodes=3) as cluster:
        run = MultiNodeRun(app, cluster)
        run.start()
        run.wait(duration=None)
        print(run.status())

The names below are imported on first use, so ``import dpmigrate`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "App": "dpmigrate.runtime.manifest",
    "Service": "dpmigrate.runtime.stage",
    "State": "dpmigrate.statesync.state",
    "LocalCluster": "dpmigrate.migrate",
    "MultiNodeRun": "dpmigrate.runtime.multinode",
    "MultiProcessRun": "dpmigrate.runtime.multiprocess",
    "DpmigrateError": "dpmigrate.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dpmigrate' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
