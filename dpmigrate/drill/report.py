"""The drills' report: a rich table for people, JSON for machines (``--json``)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from dpmigrate.drill.scenarios import DrillResult


def as_json(results: list[DrillResult]) -> dict[str, Any]:
    """``{"drills": [...], "passed": bool}``: one entry per drill run, in order."""
    return {"drills": [r.as_dict() for r in results], "passed": all(r.passed for r in results)}


def _num(value: int | None) -> str:
    return "-" if value is None else str(value)


def table(results: list[DrillResult]) -> Table:
    t = Table(title="chaos drills")
    for col, justify in (("drill", "left"), ("result", "left"), ("lost", "right"),
                         ("duplicated", "right"), ("downtime", "right"), ("time", "right"),
                         ("detail", "left")):  # fmt: skip
        t.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in results:
        t.add_row(
            r.name, "[green]PASS[/]" if r.passed else "[bold red]FAIL[/]", _num(r.lost),
            _num(r.duplicated),
            "-" if r.downtime_s is None else f"{r.downtime_s * 1000:,.0f} ms",
            f"{r.time_s:.1f} s", r.detail,
        )  # fmt: skip
    return t
