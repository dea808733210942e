"""The training command: ``run`` -> ``prepare_context`` -> ``train_phase("frozen")`` -> ``train_phase("finetune")``.

Phase 1 (frozen): the backbone is frozen and, by default, only fusion + heads (``HeadView``) are
prepared and trained, on cached per-view embeddings (:mod:`geoloc.train.cache`); with
``train.cache_embeddings=false`` the whole model is prepared and the frozen backbone runs every step.
Phase 2 (finetune): a FRESH model is built from phase 1's weights, the backbone (or its last N blocks)
unfrozen, and model + a new AdamW are prepared again. DeepSpeed fixes the set of trained parameters
when it builds its engine, so the phase-1 engine is destroyed (``accelerator.free_memory``) and a new one
built rather than mutated; the DeepSpeed batch size is set explicitly for each engine, because the
first ``prepare`` replaces the JSON's ``"auto"`` values in place.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn

from geoloc.faults import fault_point
from geoloc.train.context import RunContext, RunOptions, TrainingError, prepare_context
from geoloc.train.engine import (
    HeadView,
    broadcast_state,
    build_geo_model,
    gathered_state,
    make_optimizer,
    merged_state,
    prepare,
    training_seed,
)
from geoloc.train.loop import Phase, TrainState, run_phase
from geoloc.train.validation import validate_cached, validate_pixels

# ----------------------------------------------------------------------------- batches and forwards


def rng_neutral(iterable):
    """Iterate without the DataLoader's start-up draw from the global RNG (it seeds its workers).

    That draw happens at the first ``next``: before a mid-epoch checkpoint in an uninterrupted run,
    after the restore in a resumed one. Hiding it keeps dropout/augmentation RNG identical in both.
    """
    with torch.random.fork_rng(devices=[]):
        it = iter(iterable)
        first = next(it, None)
    if first is not None:
        yield first
        yield from it


def loader_batches(ctx: RunContext, batch_size: int, epoch: int):
    from geoloc.data import make_train_loader

    acc, cfg = ctx.accelerator, ctx.cfg
    loader = make_train_loader(
        ctx.shards["train"], batch_size=batch_size, num_samples=ctx.counts["train"], epoch=epoch,
        seed=cfg.train.seed, rank=acc.process_index, world_size=acc.num_processes,
        num_workers=cfg.data.num_workers, shuffle_buffer=cfg.data.shuffle_buffer, encoder=ctx.labels.encoder,
        shard_counts=ctx.data.shard_counts(cfg.data.train_split),  # drops empty, checks the others
        on_short=cfg.data.on_short_shard,
    )  # fmt: skip
    return rng_neutral(loader)


def cached_batches(ctx: RunContext, table, batch_size: int, epoch: int):
    from geoloc.train.cache import epoch_batches

    acc = ctx.accelerator
    index = epoch_batches(
        len(table), batch_size, epoch, ctx.cfg.train.seed, acc.process_index, acc.num_processes
    )
    return (table.rows(rows) for rows in index)


def cached_forward(ctx: RunContext, model, batch: dict):
    emb = batch["emb"].to(ctx.accelerator.device, ctx.input_dtype)  # (B, V, D)
    return model(emb, batch["view_mask"].to(ctx.accelerator.device))


def pixel_forward(ctx: RunContext, frozen_backbone: bool, model, batch: dict):
    from geoloc.distributed import eval_module

    if frozen_backbone:
        eval_module(model).backbone.eval()  # as when the cache is built: no dropout in a frozen backbone
    ctx.preprocessor.train()  # augmentation (if configured) during training only
    device = ctx.accelerator.device
    # non_blocking: the loader pins its batches on CUDA, so the copy overlaps with compute
    pixels = ctx.preprocessor(batch["images"].to(device, non_blocking=True))  # (B, V, 3, S, S)
    return model(pixels, batch["view_mask"].to(device, non_blocking=True))


# ----------------------------------------------------------------------------- export


def export_best(
    ctx: RunContext, geo_model: nn.Module, phase: Phase, metrics: dict, state: TrainState
) -> None:
    """Write RUN/model/ from the current (best) weights; every rank calls (ZeRO-3 gathers)."""
    from geoloc.export import save_model_dir, vision_config_dict
    from geoloc.model_card import data_summary

    # under DeepSpeed bf16 these are the bf16 module weights, not the fp32 master copy the optimiser holds
    weights = phase.full_state()
    if ctx.accelerator.is_main_process:
        save_model_dir(
            ctx.run_dir / "model", model_state_dict=weights, cfg=ctx.cfg,
            vision_config=vision_config_dict(geo_model), embed_dim=geo_model.embed_dim,
            num_classes=geo_model.num_classes, encoder=ctx.labels.encoder, preprocess=ctx.preprocess,
            centroids=ctx.labels.centroids.numpy(), prior=ctx.labels.prior, cells=ctx.labels.cells,
            extra={"val": metrics, "phase": phase.name, "epoch": state.epoch, "global_step": state.global_step,
                   "num_processes": ctx.accelerator.num_processes,
                   "distributed_type": str(ctx.accelerator.distributed_type),
                   "data": data_summary(ctx.manifest)},  # for the model card (geoloc.model_card)
        )  # fmt: skip
    ctx.accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------- phases


def frozen_phase(ctx: RunContext, geo_model: nn.Module) -> Phase:
    """Phase 1: train fusion + heads with the backbone frozen (on cached embeddings by default)."""
    from geoloc.backbone import set_backbone_trainable

    t = ctx.cfg.train
    set_backbone_trainable(geo_model, None)
    geo_model.to(ctx.accelerator.device)
    if t.cache_embeddings:
        from geoloc.train.cache import cached_steps, load_or_compute

        tables = load_or_compute(ctx, geo_model)
        module, batch_size = HeadView(geo_model), t.frozen_batch_size
        num_batches = cached_steps(len(tables["train"]), batch_size, ctx.accelerator.num_processes)
    else:
        module, batch_size = geo_model, t.batch_size
        num_batches = ctx.counts["train"] // (batch_size * ctx.accelerator.num_processes)
    optimizer, scheduler = make_optimizer(ctx, geo_model, num_batches, t.grad_accum, t.epochs_frozen)
    hidden = geo_model.backbone.config.hidden_size
    model, optimizer = prepare(ctx, module, optimizer, batch_size, t.grad_accum, hidden)
    if t.cache_embeddings:
        batches, forward = (
            partial(cached_batches, ctx, tables["train"], batch_size),
            partial(cached_forward, ctx),
        )
        validate = partial(validate_cached, ctx, model, tables["val"], forward)
    else:
        batches, forward = partial(loader_batches, ctx, batch_size), partial(pixel_forward, ctx, True)
        validate = partial(validate_pixels, ctx, model)
    return Phase(
        "frozen", t.epochs_frozen, model, optimizer, scheduler, batches, num_batches, batch_size, t.grad_accum,
        forward, validate, full_state=lambda: merged_state(geo_model, gathered_state(ctx, model)),
    )  # fmt: skip


def finetune_phase(ctx: RunContext, geo_model: nn.Module) -> Phase:
    """Phase 2: backbone (or its last N blocks) unfrozen, per-group lrs, optional EMA.

    Its own batch size and accumulation (``train.finetune_*``): backward through the backbone needs far
    more memory per sample than phase 1.
    """
    from geoloc.backbone import set_backbone_trainable
    from geoloc.train.ema import EMA

    t = ctx.cfg.train
    batch_size, accum = t.finetune_batch_size, t.finetune_grad_accum
    set_backbone_trainable(geo_model, t.unfreeze_last_n)
    num_batches = ctx.counts["train"] // (batch_size * ctx.accelerator.num_processes)
    optimizer, scheduler = make_optimizer(ctx, geo_model, num_batches, accum, t.epochs_finetune)
    hidden = geo_model.backbone.config.hidden_size
    model, optimizer = prepare(ctx, geo_model, optimizer, batch_size, accum, hidden)
    ema = EMA(model, t.ema_decay) if t.ema_decay > 0 else None
    return Phase(
        "finetune", t.epochs_finetune, model, optimizer, scheduler, partial(loader_batches, ctx, batch_size),
        num_batches, batch_size, accum, partial(pixel_forward, ctx, False), partial(validate_pixels, ctx, model),
        full_state=lambda: merged_state(geo_model, gathered_state(ctx, model)), ema=ema,
    )  # fmt: skip


def train_phase(
    ctx: RunContext, state: TrainState, resume_from: Path | None, weights: dict | None
) -> tuple[dict, TrainState]:
    """Build, (resume,) train and tear down one phase; returns the final full weights on every rank."""
    from accelerate.utils import set_seed

    geo_model = build_geo_model(ctx, weights)  # the common seed: the same model on every rank
    build = frozen_phase if state.phase == "frozen" else finetune_phase
    phase = build(ctx, geo_model)
    # reseeded after the build: the same RNG stream whether or not the embedding cache had to be computed
    # (its DataLoader draws), and each rank its own dropout masks and crops
    set_seed(training_seed(ctx.cfg.train.seed, state.phase, ctx.accelerator.process_index))
    if resume_from is not None:  # weights, optimiser, scheduler, EMA and this rank's RNG
        state = TrainState.from_dict(ctx.checkpoints.load(resume_from, phase))
    run_phase(ctx, phase, state, partial(export_best, ctx, geo_model))
    final = broadcast_state(ctx, phase.full_state())
    ctx.accelerator.free_memory()  # destroys a DeepSpeed engine: phase 2 builds its own
    return final, state


# ----------------------------------------------------------------------------- the command


def starting_point(ctx: RunContext) -> tuple[TrainState, Path | None]:
    """A fresh state at the first requested phase, or the one saved in the checkpoint to resume.

    The main process picks and verifies the checkpoint (files, hashes, pickles) for every rank; a
    checkpoint of another run (labels, shards, config keys a resume keeps) is refused here, before any
    model is built.
    """
    from geoloc.train.resume import check_resumable

    fresh = TrainState(phase=ctx.opts.phases[0])
    if not ctx.opts.resume:
        return fresh, None
    try:
        path, meta = ctx.checkpoints.choose(ctx.opts.resume)
    except FileNotFoundError as err:
        if ctx.opts.resume == "latest":  # preemptible jobs always pass --resume latest
            ctx.accelerator.print(f"{err}; starting from scratch")
            return fresh, None
        raise TrainingError(str(err)) from None
    for note in check_resumable(path, meta.get("run", {}), ctx.checkpoints.run_info):
        ctx.accelerator.print(note)
    state = TrainState.from_dict(meta["state"])
    if state.phase not in ctx.opts.phases:
        raise TrainingError(f"{path} is a {state.phase} checkpoint but --phase {ctx.opts.phase} was asked")
    return state, path


def initial_weights(opts: RunOptions) -> dict | None:
    """Verified weights of ``--init-from`` (an exported model directory), else None."""
    if opts.init_from is None:
        return None
    from geoloc.export import ModelDirError, load_weights

    try:
        return load_weights(opts.init_from)
    except (FileNotFoundError, ModelDirError) as err:
        raise TrainingError(f"--init-from {opts.init_from}: {err} (expected an exported RUN/model)") from None


def phase_epochs(cfg, name: str) -> int:
    return cfg.train.epochs_frozen if name == "frozen" else cfg.train.epochs_finetune


def check_supported(ctx: RunContext) -> None:
    """Refuse combinations that would fail late (after the embedding cache was built)."""
    if ctx.cfg.train.ema_decay > 0 and ctx.zero_stage == 3:
        raise TrainingError(
            "train.ema_decay > 0 averages full parameters, which ZeRO-3 partitions across ranks: "
            "use ZeRO-2 or DDP, or set train.ema_decay=0"
        )


def run(cfg, opts: RunOptions) -> None:
    """The whole training command: both phases (or the one asked for), resuming when asked."""
    ctx = prepare_context(cfg, opts)
    check_supported(ctx)
    try:
        state, resume_from = starting_point(ctx)
        weights = initial_weights(opts)
        for name in opts.phases[opts.phases.index(state.phase) :]:
            if state.phase != name:  # moving on to the next phase: keep the run-wide counters
                state = TrainState(name, global_step=state.global_step, best_score=state.best_score)
            if phase_epochs(cfg, name) == 0 and resume_from is None:
                continue  # nothing to train: no model, cache or engine to build
            weights, state = train_phase(ctx, state, resume_from, weights)
            resume_from = None
            fault_point("phase.end")  # crash tests: a phase done, the next not built
        if cfg.train.build_index and (ctx.run_dir / "model").is_dir():
            from geoloc.train.index import finalize_model

            finalize_model(ctx)
    finally:
        ctx.tracker.finish()
    if state.best_score is not None:
        ctx.accelerator.print(f"best val score {state.best_score:.4f}; model in {ctx.run_dir / 'model'}")
