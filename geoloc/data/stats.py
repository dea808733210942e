"""Counts of what the loader read and skipped, shared by the main process and its DataLoader workers.

Bad data never stops a run silently: each skip is logged where it happens and counted here, and
:class:`~geoloc.data.loader.Loader` reports the totals at the end of a pass.
"""

from __future__ import annotations

import logging
import multiprocessing as mp

log = logging.getLogger(__package__)  # one logger name for the whole loader: "geoloc.data"


class LoadStats:
    """Counters shared by the main process and its DataLoader workers (shared memory)."""

    KINDS = ("samples", "tar_errors", "missing_views", "bad_views", "incomplete_samples", "short_shards")

    def __init__(self):
        self._counts = mp.Array("q", len(self.KINDS))  # survives pickling to workers at start-up

    def add(self, kind: str, n: int = 1) -> None:
        with self._counts.get_lock():
            self._counts[self.KINDS.index(kind)] += n

    def as_dict(self) -> dict[str, int]:
        return dict(zip(self.KINDS, self._counts[:]))

    def tar_error(self, exn: Exception) -> bool:
        """WebDataset handler: log and count an unreadable shard or member, go on with the next."""
        log.warning("skipped unreadable shard data: %r", exn)
        self.add("tar_errors")
        return True

    def __repr__(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.as_dict().items())
