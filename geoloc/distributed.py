"""What every multi-process command shares: the process group's timeout, a watchdog for orphaned ranks,
evaluation without hidden collectives, and a trace that makes the collective invariant checkable.

The collective invariant (ARCHITECTURE.md): every loop that runs on all ranks either has no collective
inside it, or reaches every collective the same number of times on every rank. Ranks of an evaluation
loop get different numbers of batches (shards split unevenly), so evaluation runs through
:func:`eval_module` (no DDP wrapper: DDP broadcasts its buffers at EVERY forward, also under no_grad) and,
when the parameters are ZeRO-3 partitions (each forward gathers them), through :func:`lockstep`. Training
loops are equal by construction (every rank gets the same number of full batches per epoch).

Checking it: with ``GEOLOC_TRACE_COLLECTIVES=DIR`` every rank writes ``DIR/rank<R>.log``, one line per
collective (``op @ geoloc/file.py:line`` of the first geoloc frame calling it). The layout tests launch
real processes and require the ranks' files to be identical; after a hang the files show where each rank
waited.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch

TRACE_ENV = "GEOLOC_TRACE_COLLECTIVES"
EXIT_ORPHANED = 70  # exit status of a rank whose launcher died
# the torch.distributed entry points a rank can block in (DDP, DeepSpeed and accelerate call these)
COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "all_gather_object",
    "gather", "gather_object", "broadcast", "broadcast_object_list", "_broadcast_coalesced", "reduce",
    "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "all_to_all", "all_to_all_single",
    "scatter", "scatter_object_list", "barrier", "monitored_barrier",
)  # fmt: skip


# ----------------------------------------------------------------------------- process group


def process_group_kwargs(timeout_s: float) -> list:
    """``kwargs_handlers`` for ``Accelerator``: the collective timeout; gloo for several CPU processes.

    With the timeout a rank that stops (SIGSTOP, a hung filesystem) ends the job after ``timeout_s``
    instead of the backend's default (30 min gloo, 10 min NCCL), and a single plain process gets no
    process group at all (accelerate creates none for it).
    """
    from accelerate.utils import InitProcessGroupKwargs

    kwargs = {"timeout": timedelta(seconds=float(timeout_s))}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        kwargs["backend"] = "gloo"  # NCCL cannot run on CPU
    return [InitProcessGroupKwargs(**kwargs)]


def is_timeout(err: BaseException) -> bool:
    """Whether ``err`` is a collective that timed out (gloo and NCCL word it differently)."""
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("timed out" in text or "timeout" in text)


def timeout_message(rank: int, timeout_s: float, where: str) -> str:
    return (
        f"rank {rank}: a collective waited {timeout_s:g} s ({where}) without the other ranks: one of them "
        "stopped, hung or died. Raise the limit if a rank legitimately works that long alone"
    )


def shutdown() -> None:
    """Destroy the process group after a successful run, on every rank at once (left to interpreter exit,
    gloo's threads can abort the process with "terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # every rank leaves together: a rank that destroyed its group while the main rank was still
        # writing its report (infer.py --eval's t-SNE) aborted the same way, under gloo
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- orphaned ranks


def start_parent_watchdog(interval_s: float = 1.0) -> threading.Thread | None:
    """End this rank when its launcher dies (torchrun/accelerate start ranks in their own sessions, so a
    SIGKILLed launcher would leave them running forever). Only under a launcher (``TORCHELASTIC_RUN_ID``):
    a plain ``python train.py`` whose shell exits must keep running (``nohup``)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    parent, rank = os.getppid(), os.environ.get("RANK", "?")

    def watch():
        while os.getppid() == parent:
            time.sleep(interval_s)
        sys.stderr.write(f"rank {rank}: the launcher (pid {parent}) is gone; stopping this rank\n")
        sys.stderr.flush()
        os._exit(EXIT_ORPHANED)  # checkpoints and exports are written atomically: nothing half-done stays

    thread = threading.Thread(target=watch, name="geoloc-parent-watchdog", daemon=True)
    thread.start()
    return thread


# ----------------------------------------------------------------------------- evaluation


def eval_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module evaluation forwards go through: DDP, DeepSpeed engine and torch.compile wrappers removed.

    DDP broadcasts its buffers at every forward (``broadcast_buffers=True``), also under ``no_grad``: ranks
    with different batch counts would then wait for each other forever. The unwrapped module has the
    same (shared) weights and no collective, except ZeRO-3 partitions (see :func:`needs_lockstep`).
    """
    from torch.nn.parallel import DistributedDataParallel

    engine = getattr(sys.modules.get("deepspeed"), "DeepSpeedEngine", None)
    wrappers = (DistributedDataParallel,) + ((engine,) if engine is not None else ())
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile(model)
            model = model._orig_mod
        else:
            return model


def needs_lockstep(module: torch.nn.Module) -> bool:
    """ZeRO-3 partitioned parameters (``ds_id``): every forward gathers them, a collective."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def lockstep(batches, accelerator, filler):
    """``batches``, and ``filler()`` on ranks that ran out, until no rank has a batch left.

    One small gather per step, reached equally often on every rank: the ranks forward the same number
    of times, as partitioned (ZeRO-3) parameters need.
    """
    it = iter(batches)
    while True:
        batch = next(it, None)
        alive = accelerator.gather(torch.tensor([batch is not None], device=accelerator.device))
        if int(alive.sum()) == 0:
            return
        yield batch if batch is not None else filler()


# ----------------------------------------------------------------------------- tracing


def _caller() -> str:
    """``path:line`` of the innermost geoloc frame outside this module (or of the outermost frame)."""
    frame, here = sys._getframe(2), Path(__file__).name
    while frame is not None:
        path = frame.f_code.co_filename
        if f"{os.sep}geoloc{os.sep}" in path and not path.endswith(here):
            return f"geoloc{path.split(f'{os.sep}geoloc', 1)[1]}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


class CollectiveTrace:
    """Appends ``op @ caller`` to ``folder/rank<R>.log`` for every outermost collective call."""

    def __init__(self, folder: str | Path, rank: int):
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.file = open(Path(folder) / f"rank{rank}.log", "w")  # noqa: SIM115 - open for the process life
        self.depth = threading.local()

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def traced(*args, **kwargs):
            outer = getattr(self.depth, "n", 0) == 0  # all_gather_object calls all_gather: record it once
            if outer:
                self.file.write(f"{name} @ {_caller()}\n")
                self.file.flush()  # after a hang the file shows where this rank waits
            self.depth.n = getattr(self.depth, "n", 0) + 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth.n -= 1

        traced.__geoloc_traced__ = True
        return traced


_TRACE: list[CollectiveTrace] = []  # one per process, however many commands it runs


def maybe_trace_collectives(rank: int) -> CollectiveTrace | None:
    """Install the trace when ``GEOLOC_TRACE_COLLECTIVES`` names a folder (tests, hang diagnosis)."""
    folder = os.environ.get(TRACE_ENV)
    if not folder or _TRACE:
        return _TRACE[0] if _TRACE else None
    import torch.distributed as dist

    trace = CollectiveTrace(folder, rank)
    _TRACE.append(trace)
    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is not None and not getattr(fn, "__geoloc_traced__", False):
            setattr(dist, name, trace.wrap(name, fn))
    return trace


def read_trace(folder: str | Path) -> dict[int, list[str]]:
    """``{rank: [line, ...]}`` of a traced run."""
    files = sorted(Path(folder).glob("rank*.log"))
    return {int(f.stem[4:]): f.read_text().splitlines() for f in files}
