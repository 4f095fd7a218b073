"""The multi-process model: one process per stage on this host, shm rings between them.

A run gets a folder (``DPMIGRATE_STATE_DIR/runs/<app>-<pid>-<time>``; the caller passes the
state dir) holding the ring registry, each stage's journal, status file and log. The
supervisor restarts a crashed stage from its journal; its rings reconnect by name. The folder
is removed after a clean run and kept (its path printed) after a failed one, for the logs.

A stage with ``resources`` runs in a control group of its own (``<run>.local.<stage>``,
:mod:`dpmigrate.runtime.cgroups`), entered before its code runs and recorded in the run
folder's ``cgroups.json``; :meth:`MultiProcessRun.stop` removes exactly those groups.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dpmigrate.runtime import cgroups, stagehost
from dpmigrate.runtime.manifest import App
from dpmigrate.runtime.supervisor import Supervisor, process_start_time

_POLL_S = 0.1


class MultiProcessRun:
    """One app running as supervised processes; a context manager that always stops them."""

    def __init__(
        self,
        app: App,
        model: str = "multi-process",
        run_dir: Path | None = None,
        on_event: Callable[[str], None] | None = None,
        *,
        state_dir: str | None = None,
        resources: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """``run_dir``: the run's folder; by default a new one in ``state_dir``/runs (the
        caller's DPMIGRATE_STATE_DIR: one of the two is needed). ``resources``: this run's
        limits over the manifest's (:meth:`App.with_resources`)."""
        app = app if resources is None else app.with_resources(resources)
        self.app = app
        self.model = model
        if run_dir is None:
            if state_dir is None:
                raise TypeError("MultiProcessRun needs a run_dir or the state_dir to make one in")
            run_dir = Path(state_dir) / "runs" / f"{app.name}-{os.getpid()}-{int(time.time())}"
        self.run_dir = run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.groups = cgroups.StageGroups(self.run_dir / cgroups.RECORD)
        #: where the run's cgroup record is indexed (so `clean` finds it if this process is
        #: killed before stop); None for a caller-chosen run_dir outside a state dir
        self._index_dir = state_dir
        self.supervisor = Supervisor(
            self.run_dir / "logs", on_event=on_event, die_with_supervisor=True,
            groups=self.groups,
        )  # fmt: skip

    def start(self) -> None:
        if self._index_dir is not None and any(not s.resources.empty for s in self.app.stages):
            cgroups.register_record(self._index_dir, self.groups.record.path, os.getpid(),
                                    process_start_time(os.getpid()))  # fmt: skip
        for spec in self.app.stages:
            group = None
            if not spec.resources.empty:
                name = cgroups.group_name(f"{self.run_dir.name}.local", spec.name)
                group = self.groups.create(name, spec.resources)
            self.supervisor.start(
                spec.name,
                stagehost.command(
                    str(self.app.path.resolve()), spec.name, str(self.run_dir), self.model
                ),
                group=group,
            )

    def status(self) -> list[dict[str, Any]]:
        """The stages' last status files, with the supervisor's view (pid, restarts)."""
        out = []
        for name, proc in self.supervisor.stages.items():
            data: dict[str, Any] = {"stage": name, **stagehost.read_status(self.run_dir, name)}
            data.update(name=name, pid=proc.stage_pid, restarts=proc.restarts,
                        finished=proc.finished, failed=proc.failed, log=str(proc.log),
                        resources=proc.resources())  # fmt: skip
            out.append(data)
        return out

    def wait(
        self,
        duration: float | None,
        on_tick: Callable[[list[dict[str, Any]]], None] | None = None,
        tick_interval: float = 0.5,
    ) -> bool:
        """Supervise until every stage finished (True) or ``duration`` passed (False)."""
        start = time.monotonic()
        next_tick = start + tick_interval
        while not self.supervisor.all_finished:
            if duration is not None and time.monotonic() - start >= duration:
                return False
            self.supervisor.poll()
            if on_tick and time.monotonic() >= next_tick:
                on_tick(self.status())
                next_tick = time.monotonic() + tick_interval
            time.sleep(_POLL_S)
        return True

    def stop(self) -> None:
        """Stop the stages, then remove every control group recorded for this run (the
        supervisor removed each finished stage's already; this catches what it could not)."""
        try:
            self.supervisor.stop()
        finally:
            self.groups.remove_all()
            if self._index_dir is not None:
                cgroups.unregister_record(self._index_dir, self.groups.record.path)

    def cleanup(self) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> MultiProcessRun:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
