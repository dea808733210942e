"""The epoch/step loop shared by both phases: steps, validation, best-model export, checkpoints.

A phase is described by a :class:`Phase` (what to call) and its position by a :class:`TrainState` (where
we are), which goes into every checkpoint as JSON. The loop itself knows nothing about DeepSpeed or the
embedding cache; :mod:`geoloc.train.phases` builds the ``Phase`` for each case.

Step semantics: a *batch* is one forward/backward on this rank; an *update* (``step``) is one optimiser
step after the phase's ``grad_accum`` batches. The last window of an epoch may be shorter: its losses are
scaled so that its update, too, is the mean gradient of its batches. The scheduler, ``save_every_steps``,
``log_every`` and ``--stop-after-steps`` count updates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from geoloc.faults import fault_point
from geoloc.train.context import PHASE_NAMES, RunContext, RunInterrupted, TrainingError
from geoloc.train.progress import Throughput, postfix, progress_bar


@dataclass
class TrainState:
    """Where the run is; saved with every checkpoint (JSON) so ``--resume`` continues exactly there."""

    phase: str  # frozen | finetune
    epoch: int = 0  # epoch of the phase being trained (0-based)
    batch: int = 0  # batches of that epoch already trained: a resumed run skips them
    step: int = 0  # optimiser updates in this phase (the scheduler's position)
    global_step: int = 0  # optimiser updates in the whole run (x axis of the curves)
    best_score: float | None = None  # best val score so far, over both phases
    bad_epochs: int = 0  # epochs of this phase without improvement (early stopping)
    finished: bool = False  # the phase has ended (all epochs, or early stopping)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        return cls(**d)


@dataclass
class Phase:
    """Everything the loop calls for one phase; built by :mod:`geoloc.train.phases`."""

    name: str
    epochs: int
    model: torch.nn.Module  # as prepared (plain, DDP or DeepSpeed engine)
    optimizer: object  # as prepared
    scheduler: object  # LambdaLR on the raw optimiser, stepped once per update
    batches: Callable[[int], Iterable[dict]]  # epoch -> this rank's batches
    num_batches: int  # batches per epoch on each rank
    batch_size: int  # per rank
    grad_accum: int  # batches per optimiser update (the accelerator / DeepSpeed engine is set to it)
    forward: Callable[[torch.nn.Module, dict], dict]  # (model, batch) -> {"embedding", <head>: output}
    validate: Callable[[], dict]  # -> competition metrics of the val split (same on every rank)
    full_state: Callable[[], dict]  # -> full GeoModel state dict for export (a collective under ZeRO-3)
    ema: object | None = None  # geoloc.train.ema.EMA, applied for validation and export


# ----------------------------------------------------------------------------- one step


def check_finite(
    accelerator, terms: dict[str, torch.Tensor], where: str, last_checkpoint
) -> dict[str, float]:
    """Mean over ranks of each loss term; raises on every rank if any rank's term is not finite.

    One gather of all terms (in name order, the same on every rank) per batch."""
    names = sorted(terms)
    everyone = accelerator.gather(torch.stack([terms[n].detach().float() for n in names])[None])  # (world, T)
    if not torch.isfinite(everyone).all():
        raise TrainingError(
            f"non-finite loss {everyone[:, names.index('loss')].tolist()} (per rank) at {where}; stopping. The "
            f"last good checkpoint is {last_checkpoint or 'none (no checkpoint was written yet)'}"
        )
    return dict(zip(names, everyone.mean(0).tolist()))


def compute_loss(ctx: RunContext, out: dict, batch: dict) -> dict[str, torch.Tensor]:
    """The criterion's named terms (``loss`` and ``loss_<head>``) for one batch, in fp32."""
    return ctx.criterion(out, ctx.criterion.loss_batch(batch, ctx.accelerator.device))


def window_size(i: int, num_batches: int, grad_accum: int) -> int:
    """Batches in the accumulation window of batch ``i`` (0-based): ``grad_accum``, fewer at the epoch's end."""
    return min(grad_accum, num_batches - i // grad_accum * grad_accum)


def train_step(
    ctx: RunContext, phase: Phase, batch: dict, window: int, boundary: bool, where: str
) -> dict[str, float]:
    """Forward/backward of one batch of a ``window``-batch accumulation window; an optimiser update when
    ``boundary``. Returns the rank-mean loss terms by name."""
    acc = ctx.accelerator
    acc.sync_gradients = boundary  # prepared optimisers skip step() and DeepSpeed accumulates until True
    with nullcontext() if boundary else acc.no_sync(phase.model):
        terms = compute_loss(ctx, phase.forward(phase.model, batch), batch)
        means = check_finite(acc, terms, where, ctx.checkpoints.latest())
        # backward divides by grad_accum (DeepSpeed: the engine, by the same gradient_accumulation_steps);
        # a short last window must be divided by its own size to give the mean gradient of its batches
        acc.backward(terms["loss"] * (phase.grad_accum / window))
    if boundary:
        fault_point(f"{phase.name}.update")  # crash tests: gradients computed, weights not yet updated
        if not ctx.is_deepspeed and ctx.cfg.train.clip_grad > 0:  # DeepSpeed clips (JSON gradient_clipping)
            acc.clip_grad_norm_(phase.model.parameters(), ctx.cfg.train.clip_grad)
        phase.optimizer.step()
        phase.scheduler.step()
        phase.optimizer.zero_grad(set_to_none=True)
        if phase.ema is not None:
            phase.ema.update(phase.model)
    return means


# ----------------------------------------------------------------------------- one epoch


def group_lrs(scheduler) -> dict[str, float]:
    """Current lr of the head and (first) backbone group, by the groups' names."""
    lrs = {}
    for group in scheduler.optimizer.param_groups:
        kind = "lr_backbone" if str(group.get("name", "")).startswith("backbone") else "lr_head"
        lrs.setdefault(kind, group["lr"])
    return lrs


def _where(state: TrainState, i: int) -> str:
    return f"step {state.global_step + 1} (phase {state.phase}, epoch {state.epoch + 1}, batch {i + 1})"


class LossMeter:
    """Mean of each loss term (whatever the criterion returns) since the last log line, and samples/s
    since the last update."""

    def __init__(self):
        self.sums, self.seen, self.speed = {}, 0, Throughput()

    def add(self, terms: dict[str, float], samples: int) -> None:
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.seen += 1
        self.speed.add(samples)

    def read(self) -> dict[str, float]:
        return {k: v / self.seen for k, v in self.sums.items()} | {"samples_per_s": self.speed.rate()}

    def reset_losses(self) -> None:
        self.sums, self.seen = {}, 0


def train_epoch(ctx: RunContext, phase: Phase, state: TrainState) -> None:
    """Train the rest of ``state.epoch`` (skipping the ``state.batch`` batches already done)."""
    acc, accum = ctx.accelerator, phase.grad_accum
    phase.model.train()
    meter = LossMeter()
    with progress_bar(phase.num_batches, acc, f"{phase.name} {state.epoch + 1}/{phase.epochs}") as bar:
        bar.update(state.batch)
        for i, batch in enumerate(phase.batches(state.epoch)):
            if i < state.batch:
                continue  # done before the checkpoint we resumed from: the loaders replay deterministically
            window = window_size(i, phase.num_batches, accum)
            boundary = (i + 1) % accum == 0 or i + 1 == phase.num_batches
            lrs = group_lrs(phase.scheduler)  # the lrs this update uses (the scheduler moves on in the step)
            parts = train_step(ctx, phase, batch, window, boundary, _where(state, i))
            meter.add(parts, len(batch["sample_id"]) * acc.num_processes)
            state.batch = i + 1
            bar.update(1)
            if boundary:
                finish_update(ctx, phase, state, meter.read() | lrs, bar)
                if state.global_step % ctx.cfg.train.log_every == 0:
                    meter.reset_losses()
    state.epoch += 1
    state.batch = 0


def finish_update(ctx: RunContext, phase: Phase, state: TrainState, metrics: dict, bar) -> None:
    """Count the update, show and log its metrics, then checkpoint / stop when due."""
    state.step += 1
    state.global_step += 1
    bar.set_postfix(postfix(metrics["loss"], metrics["lr_head"], metrics["samples_per_s"]))
    if state.global_step % ctx.cfg.train.log_every == 0:
        record = {f"train/{k}": v for k, v in metrics.items()} | _position(state, state.epoch + 1)
        ctx.tracker.log(record, state.global_step)
    after_update(ctx, phase, state)


def _position(state: TrainState, epoch: int) -> dict:
    """Numbers only (metrics.jsonl holds floats): phase 1 = frozen, 2 = finetune; epoch 1-based."""
    return {"phase_index": PHASE_NAMES.index(state.phase) + 1, "epoch": epoch}


def after_update(ctx: RunContext, phase: Phase, state: TrainState) -> None:
    """Periodic checkpoint, then the test hook that ends the run like a crash."""
    if ctx.cfg.train.save_every_steps > 0 and state.global_step % ctx.cfg.train.save_every_steps == 0:
        save_checkpoint(ctx, phase, state)
    if ctx.opts.stop_after_steps and state.global_step >= ctx.opts.stop_after_steps:
        raise RunInterrupted(f"stopped after {state.global_step} optimiser updates (--stop-after-steps)")


def save_checkpoint(ctx: RunContext, phase: Phase, state: TrainState):
    tag = f"{state.phase}-e{state.epoch:03d}-b{state.batch:06d}-s{state.global_step:07d}"
    return ctx.checkpoints.save(tag, state.to_dict(), phase)


# ----------------------------------------------------------------------------- epochs


def end_of_epoch(ctx: RunContext, phase: Phase, state: TrainState, export) -> None:
    """Validate (EMA weights if any), export when the score improves, early stopping, checkpoint, then
    ``opts.on_epoch`` (the tuner's report; it may raise to end the run)."""
    with phase.ema.apply_to(phase.model) if phase.ema is not None else nullcontext():
        metrics = phase.validate()
        improved = state.best_score is None or metrics["score"] > state.best_score
        if improved:
            export(phase, metrics, state)  # every rank: gathering weights is a collective under ZeRO-3
    state.best_score = metrics["score"] if improved else state.best_score
    state.bad_epochs = 0 if improved else state.bad_epochs + 1
    patience = ctx.cfg.train.patience
    state.finished = state.epoch >= phase.epochs or (patience > 0 and state.bad_epochs >= patience)
    record = {f"val/{k}": v for k, v in metrics.items()} | {"val/best_score": state.best_score}
    ctx.tracker.log(record | _position(state, state.epoch), state.global_step)
    if ctx.accelerator.is_main_process:
        tqdm.write(f"[{phase.name} epoch {state.epoch}/{phase.epochs}] val score {metrics['score']:.4f} "
                   f"(best {state.best_score:.4f})" + (" -> exported" if improved else ""))  # fmt: skip
    save_checkpoint(ctx, phase, state)
    if ctx.opts.on_epoch is not None:  # the same metrics on every rank (validation gathers them)
        ctx.opts.on_epoch(phase.name, state.epoch, metrics)


def run_phase(ctx: RunContext, phase: Phase, state: TrainState, export) -> TrainState:
    """Train ``phase`` from ``state`` to its end (all epochs or early stopping)."""
    while not state.finished and state.epoch < phase.epochs:
        train_epoch(ctx, phase, state)
        end_of_epoch(ctx, phase, state, export)
    state.finished = True
    return state


def updates_per_epoch(num_batches: int, grad_accum: int) -> int:
    return math.ceil(num_batches / grad_accum)
