"""Fault injection for the crash tests: ``GEOLOC_FAULT=<point>[@<n>][:rank=<r>][:signal=<NAME>|:raise]``
sends the process SIGKILL (or SIGNAME, e.g. STOP; or raises a RuntimeError) the n-th time (default the
first) it reaches ``fault_point("<point>")`` on rank r (default any rank).

The points sit where a real crash hurts most: ``frozen.update`` / ``finetune.update`` (gradients computed,
optimiser not yet stepped), ``checkpoint.written`` (every file of a checkpoint written, not yet
committed), ``cache.batch`` (mid-way through the embedding cache), ``phase.end`` (a phase finished, the
next not yet built), ``predict.batch`` (inference, after a batch). With the variable unset, a fault point
costs one dictionary lookup.
"""

from __future__ import annotations

import functools
import os
import signal

ENV = "GEOLOC_FAULT"
_hits: dict[str, int] = {}


@functools.lru_cache(maxsize=4)
def parse(spec: str) -> tuple[str, int, int | None, int]:
    """``"finetune.update@2:rank=1:signal=STOP"`` -> ``("finetune.update", 2, 1, SIGSTOP)``."""
    point, *options = spec.split(":")
    name, _, nth = point.partition("@")
    opts = dict(option.partition("=")[::2] for option in options)
    rank = int(opts["rank"]) if "rank" in opts else None
    return (
        name,
        int(nth or 1),
        rank,
        0 if "raise" in opts else int(getattr(signal, f"SIG{opts.get('signal', 'KILL')}")),
    )


def fault_point(name: str) -> None:
    """Signal this process here if ``GEOLOC_FAULT`` asks for it (tests of crash safety)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, nth, rank, signum = parse(spec)
    if name != target or (rank is not None and rank != int(os.environ.get("RANK", "0"))):
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == nth and signum == 0:
        raise RuntimeError(f"injected fault at {name} (GEOLOC_FAULT)")
    if _hits[name] == nth:
        os.kill(os.getpid(), signum)
