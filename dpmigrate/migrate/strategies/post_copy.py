"""Post-copy: the source's CRIU dumps everything but the memory and stays behind as a page
server; the destination restores at once, its lazy-pages daemon pulling the pages on demand
and in the background. The source stays frozen until every page has moved (``finish``)."""

from __future__ import annotations

from typing import Any

from dpmigrate.migrate.strategies.base import Strategy


class PostCopy(Strategy):
    name = "post-copy"
    needs_lazy_pages = True

    def cutover(self, frozen: dict[str, Any]) -> None:
        m = self.m
        m.holds_files(m.source)
        result = m.call(m.source, "lazy_dump", **m.me, quiesced=frozen)
        self.lazy_source = [result["address"], result["port"]]
        # The source's CRIU serves pages to whoever restores: released first on a rollback,
        # so the source resumes (still asleep in its quiesce).
        m.undo.push(f"release the lazy-pages source on {m.source}", self._release)
        m.source_bundle = result["bundle"]
        m.report.transferred_bytes = m.pull()

    def _release(self) -> None:
        self.m.call(self.m.source, "lazy_abort", **self.m.stage_ref)

    def restore(self) -> None:
        m = self.m
        m.call(m.destination, "restore_images", **m.me, lazy_source=self.lazy_source)

        def discard() -> None:  # the source's page server first, then the copy pulling from it
            self._release()
            m.call(m.destination, "discard_stage", **m.stage_ref)
            m.call(m.destination, "cancel_transfer", **m.stage_ref)

        m.undo.push(f"discard the restored copy on {m.destination}", discard)

    def finish(self) -> None:
        m = self.m
        done = m.call(m.source, "lazy_finish", **m.stage_ref)
        m.call(m.destination, "lazy_destination_done", **m.stage_ref)
        criu = done["criu"]
        m.report.frozen_time_s = round(criu["frozen_time"] / 1e6, 4)
        m.report.pages_written = int(criu.get("pages_lazy", 0)) + int(criu.get("pages_written", 0))
        m.report.transferred_bytes += m.report.pages_written * m.page_size
