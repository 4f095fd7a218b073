"""The flows example in the in-process model: deterministic, nothing lost or duplicated."""

from __future__ import annotations

import json
from pathlib import Path

from support import run_cli

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "flows" / "app.toml"


def test_flows_in_process_is_complete_and_deterministic() -> None:
    runs = []
    for _ in range(2):
        result = run_cli("run", str(EXAMPLE), "--model", "in-process", "--json")
        assert result.returncode == 0, result.stderr
        runs.append(json.loads(result.stdout))
    first, second = runs
    assert first["model"] == "in-process"
    checker = first["checker"]
    assert checker == {**checker, "received": 20000, "lost": 0, "duplicated": 0}
    assert checker["digest"] == second["checker"]["digest"]
    stages = {s["name"]: s for s in first["stages"]}
    assert stages["gen"]["msgs_out"] == stages["table"]["msgs_in"] == 20000
    assert stages["table"]["metrics"]["flows"] == 512
    assert all(s["done"] for s in first["stages"])


def test_bad_manifest_is_one_clear_line(tmp_path) -> None:
    bad = tmp_path / "app.toml"
    bad.write_text('[app]\nname = "x"\n[stages.a]\nentry = "nowhere:Nothing"\n')
    for path, phrase in (
        (bad, "cannot import module 'nowhere'"),
        (tmp_path / "no.toml", "does not exist"),
    ):
        result = run_cli("run", str(path), "--json")
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and phrase in lines[0] and "Traceback" not in result.stderr
