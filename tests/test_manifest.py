"""App manifests: the example loads; every kind of mistake is one clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpmigrate.errors import ConfigError
from dpmigrate.runtime.manifest import App

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "flows" / "app.toml"

STAGES = """
[app]
name = "t"
[stages.gen]
entry = "stages:Generator"
[stages.table]
entry = "stages:FlowTable"
[stages.check]
entry = "stages:Checker"
"""


def test_example_loads_in_pipeline_order() -> None:
    app = App.load(EXAMPLE)
    assert app.name == "flows"
    assert [s.name for s in app.stages] == ["gen", "table", "check"]
    assert app.nodes == ("node1", "node2", "node3")
    assert [(r.src_stage, r.dst_stage, r.capacity) for r in app.rings] == [
        ("gen", "table", 1024), ("table", "check", 1024)]  # fmt: skip


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "stages.py").write_text((EXAMPLE.parent / "stages.py").read_text())
    path = tmp_path / "app.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("extra", "phrase"),
    [
        ('[[rings]]\nfrom = "gen.out"\nto = "nope.in"\n', "unknown stage 'nope'"),
        (
            '[[rings]]\nfrom = "gen.out"\nto = "table.in"\n[[rings]]\nfrom = "gen.out"\nto = "check.in"\n',
            "already used",
        ),
        (
            '[[rings]]\nname = "r"\nfrom = "gen.out"\nto = "table.in"\n[[rings]]\nname = "r"\n'
            'from = "table.out"\nto = "check.in"\n',
            "duplicate ring 'r'",
        ),
        ('[[rings]]\nfrom = "gen.out"\nto = "table.in"\ncapacity = "big"\n', "rings[0].capacity"),
        ('[[rings]]\nfrom = "gen.out"\nto = "table.in"\ncapacity = 0\n', "positive integer"),
        (
            '[[rings]]\nfrom = "gen.out"\nto = "table.in"\ntransport = "carrier-pigeon"\n',
            "transport",
        ),
        ('[[rings]]\nfrom = "gen"\nto = "table.in"\n', "'stage.port'"),
        ('[[rings]]\nfrom = "gen.wrong"\nto = "table.in"\n', "no output port 'wrong'"),
        ('[[rings]]\nfrom = "gen.out"\nto = "table.in"\nspeed = 1\n', "unknown key(s) ['speed']"),
    ],
)
def test_bad_rings(tmp_path: Path, extra: str, phrase: str) -> None:
    with pytest.raises(ConfigError) as info:
        App.load(_write(tmp_path, STAGES + extra))
    assert phrase in str(info.value)


def test_cycle_is_named(tmp_path: Path) -> None:
    text = STAGES.replace("stages:Checker", "stages:FlowTable") + (
        '[[rings]]\nfrom = "table.out"\nto = "check.in"\n'
        '[[rings]]\nfrom = "check.out"\nto = "table.in"\n'
    )
    with pytest.raises(
        ConfigError, match=r"cycle (table -> check -> table|check -> table -> check)"
    ):
        App.load(_write(tmp_path, text))


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ('[app]\nname = "t"\n[stages.a]\nnode = "n"\n', "stages.a.entry is missing"),
        ('[app]\nname = "t"\n[stages.a]\nentry = "nomodule_xyz:A"\n', "cannot import module"),
        ('[app]\nname = "t"\n[stages.a]\nentry = "stages:Nope"\n', "not a dpmigrate Service"),
        ('[app]\nname = "t"\n[stages.a]\nentry = "stages"\n', "'module:Class'"),
        (
            '[app]\nname = "t"\n[stages.a]\nentry = "stages:Generator"\nbatch = true\n',
            "stages.a.batch",
        ),
        ('[app]\nname = 5\n[stages.a]\nentry = "stages:Generator"\n', "app.name"),
        (
            '[app]\nname = "t"\n[stages.a]\nentry = "stages:Generator"\n[stages.a]\nentry = "x:Y"\n',
            "line",
        ),
        ('[app]\nname = "t"\n', "[stages]"),
    ],
)
def test_bad_stages(tmp_path: Path, text: str, phrase: str) -> None:
    with pytest.raises(ConfigError) as info:
        App.load(_write(tmp_path, text))
    assert phrase in str(info.value)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        App.load("/nonexistent/app.toml")
