"""Preparing a phase for the accelerator, and getting full weights back out of it.

Each phase builds a model and an AdamW and prepares exactly those two (the WebDataset loaders stay
unprepared, see geoloc.data). Under DeepSpeed every phase gets its own engine: the batch sizes are set
explicitly before each ``prepare`` (the first one replaces the JSON's ``"auto"`` values in place), and
under ZeRO-3 weights are loaded whole and gathered back for the export and the next phase.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from geoloc.train.context import PHASE_NAMES, RunContext, TrainingError
from geoloc.train.loop import updates_per_epoch

# ----------------------------------------------------------------------------- modules


class HeadView(nn.Module):
    """A GeoModel without its backbone: the same fusion/norm/head modules (shared, not copied).

    Phase 1 on cached embeddings prepares this, so DDP/DeepSpeed see only what is trained and the
    backbone is neither wrapped, partitioned nor cast. ``forward`` is ``GeoModel.forward_head``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        for name, child in model.named_children():
            if name != "backbone":
                self.add_module(name, child)
        own = [n for n, _ in model.named_parameters(recurse=False)]
        if own:
            raise TypeError(
                f"GeoModel has parameters outside its submodules ({own}); HeadView would miss them"
            )
        self.embed_dim = model.embed_dim
        self._forward_head = type(model).forward_head

    def forward(self, view_emb: torch.Tensor, view_mask: torch.Tensor):  # (B, V, D), (B, V) -> ModelOutput
        return self._forward_head(self, view_emb, view_mask)


# ----------------------------------------------------------------------------- preparing


def configure_deepspeed(ctx: RunContext, batch_size: int, grad_accum: int, hidden_size: int) -> None:
    """Fill what accelerate cannot infer without a prepared DataLoader or a ``model.config``."""
    plugin = ctx.accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    for key in ("scheduler", "optimizer"):
        if key in ds:
            raise TrainingError(
                f"the DeepSpeed JSON defines a {key!r}: remove it (the trainer builds AdamW with per-group "
                "learning rates and steps its own warm-up + cosine schedule)"
            )
    ds["train_micro_batch_size_per_gpu"] = batch_size
    ds["gradient_accumulation_steps"] = grad_accum
    ds["train_batch_size"] = batch_size * grad_accum * ctx.accelerator.num_processes
    zero = ds.setdefault("zero_optimization", {})
    auto = {"reduce_bucket_size": hidden_size * hidden_size,
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": 10 * hidden_size}  # fmt: skip
    zero.update({k: v for k, v in auto.items() if zero.get(k) == "auto"})
    if ctx.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # the export gathers the weights


def prepare(
    ctx: RunContext, module: nn.Module, optimizer, batch_size: int, grad_accum: int, hidden_size: int
):
    """``accelerator.prepare`` of model + optimiser only (loaders stay unprepared, see geoloc.data).

    The phase's ``grad_accum`` goes to the accelerator (``backward`` divides by it) and to the DeepSpeed
    config (the engine divides by it), since the two phases accumulate differently.
    """
    ctx.accelerator.gradient_accumulation_steps = grad_accum
    if ctx.is_deepspeed:
        configure_deepspeed(ctx, batch_size, grad_accum, hidden_size)
    return ctx.accelerator.prepare(module, optimizer)


def make_optimizer(ctx: RunContext, model, num_batches: int, grad_accum: int, epochs: int):
    """AdamW over the trainable groups (per-group lr) and its warm-up + cosine schedule per update."""
    from geoloc.model import param_groups
    from geoloc.train.schedule import make_scheduler

    t = ctx.cfg.train
    groups = param_groups(model, t.head_lr, t.backbone_lr, t.weight_decay, t.layer_decay)
    optimizer = torch.optim.AdamW(groups)
    total = max(1, updates_per_epoch(num_batches, grad_accum) * epochs)
    return optimizer, make_scheduler(optimizer, total, round(t.warmup_ratio * total))


@contextmanager
def whole_weights(ctx: RunContext):
    """Load checkpoints unpartitioned under ZeRO-3.

    accelerate registers its DeepSpeed config with transformers even when ``zero3_init_flag`` is false,
    and transformers then partitions every ``from_pretrained`` (``zero.Init``): the embedding cache could
    not run the backbone and phase 2's model would mix partitioned and plain parameters. The trainer
    loads weights whole (a ViT-L/14 fits any GPU) and lets each engine partition what it trains.
    """
    if ctx.zero_stage != 3:
        yield
        return
    plugin = ctx.accelerator.state.deepspeed_plugin
    if plugin.zero3_init_flag:
        raise TrainingError(
            "zero3_init_flag: true is not supported: set it to false in the accelerate config"
        )
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if plugin.dschf is not None:
            set_hf_deepspeed_config(plugin.dschf)


def build_geo_model(ctx: RunContext, weights: dict | None):
    """Pretrained backbone + fresh heads (seeded), then ``weights`` over them when given."""
    from accelerate.utils import set_seed

    from geoloc.model import build_model

    set_seed(ctx.cfg.train.seed)
    with whole_weights(ctx):
        model = build_model(ctx.cfg.model, ctx.labels.encoder.num_classes)
    if weights is not None:
        model.load_state_dict(weights)
    return model


def training_seed(seed: int, phase: str, process_index: int) -> int:
    """Seed of the global RNGs (dropout, augmentation) for one rank's phase, set AFTER the model is built.

    The model is built with ``seed`` itself, identical on every rank; after that, a shared seed would give
    every rank the same crop boxes and dropout masks. Distinct for every (phase, rank) below 10000 ranks.
    """
    return seed + 10_000 * (PHASE_NAMES.index(phase) + 1) + process_index


def gathered_state(ctx: RunContext, prepared) -> dict | None:
    """The prepared module's full state dict (ZeRO-3: gathered; on the main process only, else None)."""
    state = ctx.accelerator.get_state_dict(prepared)
    if ctx.zero_stage == 3 and not ctx.accelerator.is_main_process:
        return None
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def broadcast_state(ctx: RunContext, state: dict | None) -> dict:
    """Main's state dict on every rank (only ZeRO-3 leaves the other ranks without one)."""
    from accelerate.utils import broadcast_object_list

    if ctx.zero_stage != 3:
        return state
    box = [state]
    broadcast_object_list(box)
    return box[0]


def merged_state(geo_model: nn.Module, prepared_state: dict | None) -> dict | None:
    """Full GeoModel weights: the module's own, overwritten by the prepared (possibly partial) module's."""
    if prepared_state is None:
        return None
    full = {k: v.detach().cpu().clone() for k, v in geo_model.state_dict().items()}
    unknown = sorted(prepared_state.keys() - full.keys())
    if unknown:
        raise KeyError(f"prepared module has keys the GeoModel lacks: {unknown[:5]}")
    return full | prepared_state
