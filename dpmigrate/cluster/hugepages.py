"""Hugepages on demand: a cluster reserves 2 MB pages for its shm rings and gives back exactly
what it added.

The pool is the kernel's one count per host (``vm.nr_hugepages``, here
``/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages``), shared with whoever else uses
hugepages. So a reservation is a *delta*, recorded in the cluster record before the count is
touched (``before``, ``asked``; then ``added``, what the kernel really gave, which can be less
when memory is fragmented), and giving back subtracts that delta from the count as it is *then*
— not a return to ``before``: if someone else changed the count meanwhile, their change stays.
And never below what is in use (pages mapped or reserved by a mapping, ``total - free + resv``):
shrinking below that would only turn live pages into surplus ones. Both cases are said in the
returned lines.

Rings do not depend on this: ``transports.shm`` uses 2 MB pages whenever a free one exists and
falls back to 4 KB pages (and says so in its statistics) when none does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dpmigrate.errors import ConfigError, EnvironmentProblem

#: The 2 MB pool (x86-64's default hugepage size; the shm ring's page).
POOL = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")
PAGE_BYTES = 2 << 20
#: An upper bound on one reservation (a typo such as 100000 would take 200 GB).
MAX_PAGES = 1 << 16


@dataclasses.dataclass(frozen=True)
class Counts:
    """The pool as the kernel reports it, in pages."""

    total: int
    free: int
    resv: int
    surplus: int

    @property
    def in_use(self) -> int:
        """Pages mapped by someone or promised to a mapping: the count may not go below."""
        return self.total - self.free + self.resv


def _read(name: str, pool: Path) -> int:
    try:
        return int((pool / name).read_text().strip())
    except (OSError, ValueError) as err:
        raise EnvironmentProblem(
            f"cannot read {pool / name} ({err}); this kernel has no 2 MB hugepage pool "
            "(CONFIG_HUGETLBFS); run without --hugepages"
        ) from err


def counts(pool: Path = POOL) -> Counts:
    return Counts(*(_read(f"{n}_hugepages", pool) for n in ("nr", "free", "resv", "surplus")))


def _set_total(value: int, pool: Path) -> int:
    """Ask for ``value`` pages; returns what the kernel kept (it gives fewer when short)."""
    try:
        (pool / "nr_hugepages").write_text(f"{value}\n")
    except OSError as err:
        raise EnvironmentProblem(
            f"cannot write {value} to {pool / 'nr_hugepages'}: {err.strerror}; run as root"
        ) from err
    return counts(pool).total


def check_count(pages: Any, where: str) -> int:
    """A number of pages to reserve: 0 (none) .. MAX_PAGES; a ConfigError naming ``where``."""
    if isinstance(pages, bool) or not isinstance(pages, int) or not 0 <= pages <= MAX_PAGES:
        raise ConfigError(
            f"{where}: the number of 2 MB hugepages must be an integer 0..{MAX_PAGES}, got "
            f"{ascii(pages)[:40]} (each ring of the default size needs 3)"
        )
    return pages


def reserve(
    pages: int, save: Callable[[dict[str, Any]], None], pool: Path = POOL
) -> dict[str, Any]:
    """Add ``pages`` to the pool. ``save`` is called with the record entry before the count is
    written (``added`` unknown yet: ``None``) and again with what the kernel gave; the entry
    is returned, with ``note`` set when fewer pages came than asked."""
    before = counts(pool)
    entry: dict[str, Any] = {"pool": str(pool), "page_bytes": PAGE_BYTES, "before": before.total,
                             "asked": pages, "added": None}  # fmt: skip
    save(entry)
    now = _set_total(before.total + pages, pool)
    entry["added"] = max(0, now - before.total)
    if entry["added"] < pages:
        entry["note"] = (
            f"only {entry['added']} of {pages} 2 MB hugepages could be reserved (memory is "
            "short or fragmented): rings that find none free use 4 KB pages and say so in "
            "their statistics (page_fallback)"
        )
    save(entry)
    return entry


def release(entry: dict[str, Any]) -> list[str]:
    """Give back what ``entry`` (from :func:`reserve`) added: the count as it is now minus
    that delta, but never below the pages in use. A line per thing done or not done."""
    pool = Path(str(entry.get("pool") or POOL))
    now = counts(pool)
    before, asked, added = entry.get("before"), entry.get("asked"), entry.get("added")
    if not isinstance(before, int) or not isinstance(asked, int):
        return ["hugepages: the record's entry is incomplete; nothing given back"]
    if not isinstance(added, int):  # interrupted between the write and the record: bound it
        added = max(0, min(asked, now.total - before))
    if added <= 0:
        return []
    lines = []
    if now.total != before + added:
        lines.append(
            f"hugepages: the pool was changed by someone else meanwhile ({before} before, "
            f"{added} added by this cluster, {now.total} now): only this cluster's {added} "
            "are given back"
        )
    target = now.total - added
    if target < now.in_use:
        lines.append(
            f"hugepages: {now.in_use} pages are in use, so the pool stays at {now.in_use}, not "
            f"{target}: {now.in_use - target} of this cluster's pages are still held by "
            "someone (give them back with sysctl vm.nr_hugepages once they are free)"
        )
        target = now.in_use
    if target < now.total:
        kept = _set_total(target, pool)
        lines.append(f"hugepages: {now.total - kept} 2 MB pages given back ({kept} in the pool)")
    return lines
