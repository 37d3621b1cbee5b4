"""Live build progress: shards and clips done, failures, clips/s and ETA (rich)."""

from __future__ import annotations

import sys
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class BuildProgress:
    def __init__(
        self, total_shards: int, total_clips: int, enabled: bool = True, already_shards: int = 0, already_clips: int = 0
    ):
        self.enabled = enabled and sys.stderr.isatty() or enabled == "force"
        self.t0 = time.time()
        self.clips_done = 0
        self.clips_failed = 0
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            disable=not self.enabled,
            transient=False,
        )
        self._shards = self._progress.add_task("shards", total=total_shards, completed=already_shards, rate="")
        self._clips = self._progress.add_task("clips", total=total_clips, completed=already_clips, rate="")

    def __enter__(self):
        self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self._progress.__exit__(*exc)

    def shard_finished(self, written: int, failed: int) -> None:
        self.clips_done += written
        self.clips_failed += failed
        rate = self.clips_done / max(time.time() - self.t0, 1e-6)
        self._progress.update(self._shards, advance=1, rate=f"failed clips: {self.clips_failed}")
        self._progress.update(self._clips, advance=written + failed, rate=f"{rate:.2f} clips/s")
