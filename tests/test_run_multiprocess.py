"""The flows example as one process per stage (shm rings): same digest as in-process, and a
stage killed with SIGKILL is restarted by the supervisor with nothing lost or duplicated."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from support import checker_of, paced_flows, reference_checker, require, run_cli

from dpmigrate.runtime.manifest import App
from dpmigrate.runtime.multiprocess import MultiProcessRun

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "flows" / "app.toml"


@pytest.fixture
def state_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DPMIGRATE_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


def test_flows_multi_process_matches_in_process(state_dir: Path) -> None:
    require("root")  # unshare --pid needs it
    expected = reference_checker(App.load(EXAMPLE))
    result = run_cli(
        "run",
        str(EXAMPLE),
        "--model",
        "multi-process",
        "--json",
        env={"DPMIGRATE_STATE_DIR": str(state_dir)},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"] == "multi-process"
    assert report["checker"] == {
        "received": 20000,
        "lost": 0,
        "duplicated": 0,
        "digest": expected["digest"],
    }
    rings = [r for s in report["stages"] for r in s["rings"]]
    assert {r["transport"] for r in rings} == {"shm"}
    assert not list((state_dir / "runs").iterdir()), "a clean run must remove its folder"


@pytest.mark.parametrize("victim", ["table", "check", "gen"])
def test_sigkilled_stage_restarts_without_loss(
    tmp_path: Path, state_dir: Path, victim: str
) -> None:
    require("root")
    manifest = paced_flows(tmp_path, total=40000, rate=20000)
    app = App.load(manifest)
    expected = reference_checker(app)
    events: list[str] = []
    run = MultiProcessRun(app, on_event=events.append, state_dir=str(state_dir))
    try:
        run.start()
        deadline = time.monotonic() + 60
        while True:  # kill once the victim is well into the stream
            assert time.monotonic() < deadline, f"no progress: {run.status()}"
            status = {s["name"]: s for s in run.status()}
            moved = status[victim].get("msgs_in", 0) + status[victim].get("msgs_out", 0)
            if moved > 8000 and status[victim]["pid"]:
                break
            run.supervisor.poll()
            time.sleep(0.05)
        os.kill(status[victim]["pid"], signal.SIGKILL)
        assert run.wait(duration=90), f"the app did not finish: {run.status()} {events}"
    finally:
        run.stop()
    stages = {s["name"]: s for s in run.status()}
    assert stages[victim]["restarts"] == 1, events
    assert any(f"stage {victim} died" in e for e in events), events
    checker = checker_of(list(stages.values()))
    assert checker == {"received": 40000, "lost": 0, "duplicated": 0, "digest": expected["digest"]}
    run.cleanup()


def test_sigterm_stops_a_stage_cleanly_and_a_restart_resumes(
    tmp_path: Path, state_dir: Path
) -> None:
    """Disposability: SIGTERM finishes the batch, persists, detaches and exits 0; the whole app
    stopped half-way and started again from the same folder finishes with nothing lost."""
    require("root")
    manifest = paced_flows(tmp_path, total=30000, rate=15000)
    app = App.load(manifest)
    expected = reference_checker(app)
    run = MultiProcessRun(app, state_dir=str(state_dir))
    try:
        run.start()
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, run.status()
            status = {s["name"]: s for s in run.status()}
            if status["check"].get("msgs_in", 0) > 6000 and status["table"]["pid"]:
                break
            time.sleep(0.05)
        os.kill(status["table"]["pid"], signal.SIGTERM)
        table = run.supervisor.stages["table"]
        assert table.proc is not None
        table.proc.wait(15)  # bounded: a SIGTERMed stage exits within its grace
        run.supervisor.poll()
        assert table.exit_codes == [0] and table.finished and table.restarts == 0
        run.stop()  # the rest, mid-stream
    finally:
        run.stop()
    half = checker_of(run.status())
    assert 0 < half["received"] < 30000 and half["lost"] == 0 and half["duplicated"] == 0
    again = MultiProcessRun(app, run_dir=run.run_dir)
    try:
        again.start()
        assert again.wait(duration=90), again.status()
    finally:
        again.stop()
    assert checker_of(again.status()) == {
        "received": 30000,
        "lost": 0,
        "duplicated": 0,
        "digest": expected["digest"],
    }
    again.cleanup()


def test_quiesce_detaches_everything_and_wake_resumes(tmp_path: Path, state_dir: Path) -> None:
    """SIGUSR2 quiesces a stage at a batch boundary: all output acknowledged, rings detached,
    no socket, memfd or growing file left open; SIGUSR1 wakes it and nothing is lost."""
    require("root")
    app = App.load(paced_flows(tmp_path, total=30000, rate=15000))
    expected = reference_checker(app)
    run = MultiProcessRun(app, state_dir=str(state_dir))
    try:
        run.start()
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, run.status()
            table = {s["name"]: s for s in run.status()}["table"]
            if table.get("msgs_in", 0) > 5000 and table["pid"]:
                break
            time.sleep(0.05)
        pid = table["pid"]
        os.kill(pid, signal.SIGUSR2)
        while table.get("phase") != "quiesced":
            assert time.monotonic() < deadline, table
            time.sleep(0.02)
            table = {s["name"]: s for s in run.status()}["table"]
        open_fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        assert not [f for f in open_fds if f.startswith(("socket:", "/memfd:", "pipe:"))], open_fds
        assert not [f for f in open_fds if f.endswith(".log") or "journal" in f], open_fds
        quiesced = table["quiesced"]
        assert quiesced["inputs"]["in"] == table["msgs_in"] > 0
        assert quiesced["outputs"]["out"] == table["msgs_out"]
        time.sleep(0.3)  # the pipeline around it waits (backpressure), nothing is dropped
        os.kill(pid, signal.SIGUSR1)
        assert run.wait(duration=90), run.status()
    finally:
        run.stop()
    stages = {s["name"]: s for s in run.status()}
    assert stages["table"]["restarts"] == 0
    assert checker_of(list(stages.values())) == {
        "received": 30000,
        "lost": 0,
        "duplicated": 0,
        "digest": expected["digest"],
    }
    run.cleanup()
