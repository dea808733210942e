"""The process pool that checks images and writes shards; its results come back in item order, so the
output never depends on ``--workers``."""

from __future__ import annotations

import multiprocessing as mp
import os
from contextlib import contextmanager


def default_workers() -> int:
    """The ``--workers`` default: one process per CPU, at most 8."""
    return min(8, os.cpu_count() or 1)


@contextmanager
def ordered_map(workers: int):
    """An ``imap(fn, items, chunksize)`` giving results in item order whatever ``workers`` is, so the
    output never depends on it; the pool is terminated on exit (an error stops the other workers)."""
    if workers <= 1:
        yield lambda fn, items, chunksize=1: map(fn, items)
        return
    pool = mp.get_context("spawn").Pool(workers)  # spawn: no fork of a parent holding torch/OpenMP threads
    try:
        yield pool.imap
    finally:
        pool.terminate()  # also joins the workers: no one writes after this
