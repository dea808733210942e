"""Preparing a phase for the accelerator, and getting full weights back out of it.

Each phase builds a model and an AdamW and prepares exactly those two (the WebDataset loaders stay
unprepared, see geoloc.data). Under DeepSpeed every phase gets its own engine: the batch sizes are set
explicitly before each ``prepare`` (the first one replaces the JSON's ``"auto"`` values in place), and
under ZeRO-3 weights are loaded whole and gathered back for the export and the next phase.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from geoloc.errors import TrainingError

if TYPE_CHECKING:
    from geoloc.config import Config
    from geoloc.train.context import RunContext, RunOptions

PHASE_NAMES = ("frozen", "finetune")

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- accelerator


def make_accelerator(cfg: Config, opts: RunOptions):
    """An Accelerator from the launch config (env); gloo on CPU, where the NCCL default cannot work."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, ProjectConfiguration

    from geoloc.distributed import maybe_trace_collectives, process_group_kwargs, start_parent_watchdog
    from geoloc.train.tracking import log_with

    start_parent_watchdog()  # a rank whose launcher was killed stops instead of running on orphaned
    accelerator = Accelerator(  # gradient accumulation is set per phase (geoloc.train.engine.prepare)
        log_with=log_with(opts.report_to),
        project_config=ProjectConfiguration(
            project_dir=str(opts.output_dir), automatic_checkpoint_naming=False
        ),
        kwargs_handlers=process_group_kwargs(cfg.train.dist_timeout_s),
    )
    maybe_trace_collectives(accelerator.process_index)
    if accelerator.num_processes > 1 and accelerator.distributed_type == DistributedType.NO:
        # e.g. `accelerate launch --multi_gpu` without GPUs: N processes that never talk to each other
        raise TrainingError(
            f"{accelerator.num_processes} processes were launched but accelerate set up no distributed "
            "backend (no GPU?); on CPU launch with ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu ..."
        )
    if accelerator.is_main_process:
        for warning in launch_warnings(cfg, accelerator):
            log.warning(warning)
    return accelerator


def launch_warnings(cfg: Config, accelerator) -> list[str]:
    """Launch settings that run, but not as the config or the user most likely meant."""
    warnings = [precision_warning(str(accelerator.distributed_type), accelerator.device.type,
                                  accelerator.mixed_precision)]  # fmt: skip
    if is_deepspeed(accelerator):
        ds_clip = accelerator.state.deepspeed_plugin.deepspeed_config.get("gradient_clipping", 0.0)
        warnings.append(clip_warning(cfg.train.clip_grad, ds_clip))
    return [w for w in warnings if w is not None]


def precision_warning(distributed_type: str, device_type: str, mixed_precision: str) -> str | None:
    """A warning when DeepSpeed on GPU would train in fp32 (the shipped ZeRO configs need the flag)."""
    if distributed_type.endswith("DEEPSPEED") and device_type == "cuda" and mixed_precision == "no":
        return (
            "DeepSpeed is training in fp32 (mixed_precision 'no'): about twice the memory and several times "
            "slower than bf16. The ZeRO configs take their precision from the launcher: "
            "accelerate launch --config_file accelerate_configs/4xa100_zero2.yaml --mixed_precision bf16 ..."
        )
    return None


def clip_warning(clip_grad: float, ds_clipping) -> str | None:
    """A warning when ``train.clip_grad`` differs from the DeepSpeed JSON's ``gradient_clipping``.

    Under DeepSpeed the engine clips (``"auto"`` becomes accelerate's 1.0, absent means no clipping).
    """
    effective = 1.0 if ds_clipping == "auto" else float(ds_clipping or 0.0)
    if effective == float(clip_grad):
        return None
    return (
        f"train.clip_grad={clip_grad} is not used under DeepSpeed: the engine clips gradients to the JSON's "
        f"gradient_clipping={effective} (0 = off); set the two alike to silence this"
    )


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def input_dtype(accelerator) -> torch.dtype:
    """The dtype model inputs must have: DeepSpeed bf16 runs the module itself in bf16 (no autocast)."""
    if is_deepspeed(accelerator) and accelerator.mixed_precision == "bf16":
        return torch.bfloat16
    return torch.float32


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

    def forward(self, view_emb: torch.Tensor, view_mask: torch.Tensor):  # (B, V, D), (B, V) -> outputs dict
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
    from geoloc.train.loop import updates_per_epoch
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
        model = build_model(ctx.cfg.model, ctx.labels.sizes)
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
