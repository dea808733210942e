"""The process pool that checks images and writes shards; its results come back in item order, so the
output never depends on ``--workers``."""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager


def default_workers() -> int:
    """The ``--workers`` default: one process per CPU, at most 8."""
    return min(8, os.cpu_count() or 1)


@contextmanager
def ordered_map(workers: int):
    """An ``imap(fn, items, chunksize)`` giving results in item order whatever ``workers`` is, so the
    output never depends on it. On exit (also by an error) the tasks not started are cancelled and the
    running ones are waited for: no one writes after this.

    A ``ProcessPoolExecutor``, not ``multiprocessing.Pool``: ``Pool.terminate()`` after a worker's error
    can deadlock (its task-feeding thread blocks on the queue's lock while the pool joins it; seen here
    as a hang of the sharding tests), and a worker killed by the OS hangs a ``Pool`` but raises
    ``BrokenProcessPool`` from an executor."""
    if workers <= 1:
        yield lambda fn, items, chunksize=1: map(fn, items)
        return
    # spawn: no fork of a parent holding torch/OpenMP threads
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
    try:
        yield lambda fn, items, chunksize=1: pool.map(fn, items, chunksize=chunksize)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
