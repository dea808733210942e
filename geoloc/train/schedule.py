"""Learning-rate schedule: linear warm-up, then cosine decay to ``min_ratio`` of each group's peak lr.

The schedule is a pure factor of the optimiser-update index, applied by ``LambdaLR`` to every param
group's own initial lr, so the backbone/head lr ratio set by the optimiser builder is kept throughout.

Step the scheduler once per optimiser update (not per micro-batch). Note that ``accelerator.prepare``
wraps a scheduler in ``AcceleratedScheduler``, which steps it ``num_processes`` times per call unless the
Accelerator has ``split_batches=True``; keep it out of ``prepare`` and use
``accelerator.register_for_checkpointing(scheduler)`` so ``save_state`` still covers it.
"""

from __future__ import annotations

import math
from functools import partial

import torch


def _check(total_steps: int, warmup_steps: int, min_ratio: float) -> None:
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps}: need at least one optimiser update")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps={warmup_steps}: must be in [0, total_steps={total_steps}]")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio={min_ratio}: must be in [0, 1]")


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr for the optimiser update with 0-based index ``step``.

    Warm-up: ``(step + 1) / warmup_steps``, so the first update is not wasted at lr 0 and update
    ``warmup_steps - 1`` runs at the peak. Then cosine over ``progress = (step - warmup) / (total - warmup)``,
    which is 0 at the first decay update and reaches 1 (factor ``min_ratio``) at ``step == total_steps``,
    just after the last update. Steps past the end stay at ``min_ratio``.
    """
    _check(total_steps, warmup_steps, min_ratio)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= total_steps:
        return min_ratio
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` scaling each param group's initial lr by :func:`lr_factor` (one step per update)."""
    _check(total_steps, warmup_steps, min_ratio)
    factor = partial(lr_factor, total_steps=total_steps, warmup_steps=warmup_steps, min_ratio=min_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
