"""The interface every migration strategy implements (DESIGN.md §6).

The engine (:mod:`dpmigrate.migrate.engine`) runs the phases — preflight, prepare, quiesce,
transfer, restore, reconnect, verify, then past the point of no return the clean-up — and keeps
the undo log. A strategy fills in what differs between ways of moving a stage:

* :meth:`Strategy.prepare` while the source still runs (a state-sync strategy streams the
  state here; the CRIU strategies have nothing to do before the freeze);
* :meth:`Strategy.cutover` once the stage is quiesced: move what the destination needs;
* :meth:`Strategy.restore`: bring the stage up on the destination, asleep, adopted by its agent;
* :meth:`Strategy.finish` past the point of no return (post-copy: wait until every page moved).

Each step pushes onto the engine's undo log how to take back what it did, right after it did
it, so a failure anywhere before the point of no return leaves the stage running on its source.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from dpmigrate.migrate.engine import Migration

#: Room left free beside what a strategy writes to the destination's disk.
SPACE_MARGIN = 32 << 20


class Strategy:
    name: ClassVar[str]
    #: the destination must support CRIU's lazy pages (userfaultfd)
    needs_lazy_pages: ClassVar[bool] = False
    #: the strategy does work in the prepare phase (reported as a phase of its own)
    prepares: ClassVar[bool] = False
    #: the strategy moves the stage with CRIU: both nodes' CRIU and CPUs must agree
    uses_criu: ClassVar[bool] = True

    def __init__(self, migration: Migration) -> None:
        self.m = migration

    @classmethod
    def space_needed(cls, stage_memory: int) -> int:
        """Bytes the destination's folder must have free for a stage using that memory."""
        return SPACE_MARGIN

    def prepare(self) -> None:
        """While the source runs (nothing to do for a CRIU strategy)."""

    def cutover(self, frozen: dict[str, Any]) -> None:
        """The stage is quiesced (``frozen``: its positions, state version and digest)."""
        raise NotImplementedError

    def restore(self) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Past the point of no return, before the source is ended."""
