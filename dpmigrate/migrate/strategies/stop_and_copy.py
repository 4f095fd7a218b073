"""Stop-and-copy: the destination runs a CRIU page server; the source's CRIU dumps the
quiesced stage, streaming its memory straight into it, and the destination restores once it
has every page. The source is dumped with leave-running and stays asleep until the end."""

from __future__ import annotations

from typing import Any

from dpmigrate.migrate.strategies.base import SPACE_MARGIN, Strategy


class StopAndCopy(Strategy):
    name = "stop-and-copy"

    @classmethod
    def space_needed(cls, stage_memory: int) -> int:
        return stage_memory + stage_memory // 10 + SPACE_MARGIN  # the pages land on disk

    def cutover(self, frozen: dict[str, Any]) -> None:
        m = self.m
        server = m.call(m.destination, "page_server", **m.me)
        m.undo.push(f"stop the page server on {m.destination}",
                    lambda: m.call(m.destination, "cancel_transfer", **m.stage_ref))  # fmt: skip
        m.holds_files(m.destination)
        m.holds_files(m.source)
        result = m.call(
            m.source, "dump_to_page_server", **m.me,
            page_server=[server["address"], server["port"]], quiesced=frozen,
        )  # fmt: skip
        m.source_bundle = result["bundle"]
        done = m.call(m.destination, "finish_page_server", **m.stage_ref)
        criu = result["criu"]
        m.report.frozen_time_s = round(criu["frozen_time"] / 1e6, 4)
        m.report.pages_written = int(criu["pages_written"])
        m.report.transferred_bytes = int(done["pages_bytes"]) + m.pull()

    def restore(self) -> None:
        m = self.m
        m.call(m.destination, "restore_images", **m.me, lazy_source=None)
        m.undo.push(f"discard the restored copy on {m.destination}",
                    lambda: m.call(m.destination, "discard_stage", **m.stage_ref))  # fmt: skip
