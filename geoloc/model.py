"""GeoModel: a shared CLIP vision backbone per view, view fusion, a state head and a GPS head.

The V views of a sample go through the backbone as one batch ``(B*V, 3, H, W)``; their embeddings are
fused into one vector per sample, honouring the view mask (a missing view is left out, never averaged in
as zeros). ``forward_features`` and ``forward_head`` are separate so the frozen phase can train the heads
on cached view embeddings. Every dimension comes from the checkpoint's config.

``transformers`` is imported inside functions only: importing it takes seconds and CLI ``--help`` must
stay fast.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import torch
from torch import nn

from geoloc.config import ModelConfig
from geoloc.contract import VIEWS

log = logging.getLogger(__name__)

LAT_RANGE = (18.0, 72.0)  # the GPS head's output box (degrees): the US incl. Alaska and Hawaii
LON_RANGE = (-180.0, -65.0)
POOLINGS = ("projection", "cls", "mean")


class ModelOutput(NamedTuple):
    """A NamedTuple so accelerate (fp32 output conversion), DDP and DeepSpeed traverse it like a tuple."""

    logits: torch.Tensor  # (B, C) state logits over contiguous classes
    gps: torch.Tensor  # (B, 2) latitude, longitude in degrees
    embedding: torch.Tensor  # (B, D') fused sample embedding (before the heads' normalisation)


# ----------------------------------------------------------------------------- backbone


class ClipBackbone(nn.Module):
    """A transformers CLIP vision model plus the pooling that turns an image into one vector."""

    def __init__(self, hf_model: nn.Module, pooling: str):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r}: choose one of {list(POOLINGS)}")
        self.model = hf_model  # CLIPVisionModelWithProjection for "projection", else CLIPVisionModel
        self.pooling = pooling

    @property
    def config(self):
        return self.model.config

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    @property
    def vision_model(self) -> nn.Module:
        """The CLIPVisionModel (embeddings, encoder, post-layernorm) inside either wrapper."""
        return getattr(self.model, "vision_model", self.model)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, D)
        # other sizes (e.g. TTA scales) need interpolated position embeddings; the native size does not
        interpolate = tuple(pixels.shape[-2:]) != (self.image_size, self.image_size)
        out = self.model(pixel_values=pixels, interpolate_pos_encoding=interpolate)
        if self.pooling == "projection":
            return out.image_embeds
        if self.pooling == "cls":
            return out.pooler_output  # CLS token after post-layernorm
        return out.last_hidden_state[:, 1:].mean(dim=1)  # mean of the patch tokens (PIGEON)


def _hf_class(pooling: str):
    from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection if pooling == "projection" else CLIPVisionModel


def _embed_dim(vision_config, pooling: str) -> int:
    return vision_config.projection_dim if pooling == "projection" else vision_config.hidden_size


def _vision_config(name_or_path: str):
    """The vision config of a CLIPModel or CLIP vision checkpoint, with the right ``projection_dim``.

    A full CLIPModel dir may save a vision_config without ``projection_dim`` (the 512 default then
    appears and loading the projection fails on a size mismatch): the top-level value is the truth.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path)
    if hasattr(config, "vision_config"):  # full CLIPModel checkpoint
        vision = config.vision_config
        vision.projection_dim = config.projection_dim
        return vision
    if config.model_type != "clip_vision_model":
        raise ValueError(f"{name_or_path}: not a CLIP checkpoint (model_type={config.model_type!r})")
    return config


def load_backbone(name_or_path: str, pooling: str) -> tuple[ClipBackbone, int]:
    """Pretrained CLIP vision backbone from a hub id or local dir -> (module, view-embedding dim D)."""
    from transformers.utils import logging as hf_logging

    vision = _vision_config(name_or_path)
    # A full CLIPModel dir (StreetCLIP) also holds the text tower: transformers would print a table of
    # ~200 "UNEXPECTED" keys. That is expected here; missing keys are what matter, and are checked below.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        hf_model, info = _hf_class(pooling).from_pretrained(
            name_or_path, config=vision, attn_implementation="sdpa", output_loading_info=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    if info["unexpected_keys"]:
        log.info(
            "%s: ignored %d weights outside the vision tower", name_or_path, len(info["unexpected_keys"])
        )
    if info["missing_keys"]:  # e.g. pooling "projection" from a checkpoint without a projection
        missing = sorted(info["missing_keys"])
        raise ValueError(f"{name_or_path}: weights missing for pooling={pooling!r}: {missing[:5]}")
    return ClipBackbone(hf_model, pooling), _embed_dim(vision, pooling)


def backbone_from_config(vision_config_dict: dict, pooling: str) -> tuple[ClipBackbone, int]:
    """The same backbone with random weights from a saved vision config (no hub access needed)."""
    from transformers import CLIPVisionConfig

    vision = CLIPVisionConfig.from_dict(dict(vision_config_dict))
    hf_model = _hf_class(pooling)._from_config(vision, attn_implementation="sdpa")
    return ClipBackbone(hf_model, pooling), _embed_dim(vision, pooling)


# ----------------------------------------------------------------------------- fusion


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim of ``scores`` (B, V) using only ``mask`` (B, V); all-masked rows -> 0."""
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1) * mask  # an all-masked row is uniform before the * mask


class AverageFusion(nn.Module):
    """Mean over the present views; a sample without views gets zeros."""

    def __init__(self, dim: int, num_views: int):
        super().__init__()
        self.out_dim = dim

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # (B, V, D), (B, V) -> (B, D)
        m = mask.unsqueeze(-1).to(x.dtype)  # (B, V, 1)
        return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class ConcatFusion(nn.Module):
    """Views side by side (missing ones zeroed) plus the mask itself, so the head knows what is absent."""

    def __init__(self, dim: int, num_views: int):
        super().__init__()
        self.out_dim = num_views * dim + num_views

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # -> (B, V*D + V)
        x = x * mask.unsqueeze(-1).to(x.dtype)
        return torch.cat([x.flatten(1), mask.to(x.dtype)], dim=1)


class WeightedFusion(nn.Module):
    """A learned weight per view direction (softmax over the present views); starts as the average."""

    def __init__(self, dim: int, num_views: int):
        super().__init__()
        self.out_dim = dim
        self.view_logits = nn.Parameter(torch.zeros(num_views))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # -> (B, D)
        w = masked_softmax(self.view_logits.to(x.dtype).expand(mask.shape), mask)  # (B, V)
        return torch.einsum("bv,bvd->bd", w, x)


class AttentionFusion(nn.Module):
    """Content-dependent weights: a learned query scores each present view; starts as the average."""

    def __init__(self, dim: int, num_views: int):
        super().__init__()
        self.out_dim = dim
        self.key = nn.Linear(dim, dim)
        self.query = nn.Parameter(torch.zeros(dim))  # zero query = equal weights at init

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # -> (B, D)
        scores = self.key(x) @ self.query.to(x.dtype) / math.sqrt(x.shape[-1])  # (B, V)
        w = masked_softmax(scores, mask)
        return torch.einsum("bv,bvd->bd", w, x)


FUSIONS = {
    "average": AverageFusion,
    "concat": ConcatFusion,
    "weighted": WeightedFusion,
    "attention": AttentionFusion,
}


# ----------------------------------------------------------------------------- heads


class Fp32Linear(nn.Linear):
    """A head's last Linear, computed and returned in fp32 under autocast and with bf16 weights.

    bf16 has 8 mantissa bits: a bf16 longitude moves in 0.5 degree steps (~40 km), and logits that
    differ by less than a step tie in the top-5. The layer is tiny, so fp32 costs nothing. Same
    parameter names as ``nn.Linear``, and a module call, so ZeRO-3 still gathers its weights.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in) -> (B, out) fp32
        bias = None if self.bias is None else self.bias.float()
        with torch.autocast(device_type=x.device.type, enabled=False):
            return nn.functional.linear(x.float(), self.weight.float(), bias)


def state_head(dim: int, hidden: int, num_classes: int, dropout: float) -> nn.Sequential:
    head = nn.Sequential(
        nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), Fp32Linear(hidden, num_classes)
    )
    nn.init.normal_(head[-1].weight, std=1e-3)  # small last layer: near-uniform logits at the start
    nn.init.zeros_(head[-1].bias)
    return head


def gps_head(dim: int, hidden: int) -> nn.Sequential:
    head = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden // 2), nn.GELU())
    head.append(Fp32Linear(hidden // 2, 2))
    nn.init.normal_(head[-1].weight, std=1e-3)  # starts at the centre of the box
    nn.init.zeros_(head[-1].bias)
    return head


def bound_latlon(z: torch.Tensor) -> torch.Tensor:
    """Unbounded (B, 2) -> (lat, lon) degrees inside LAT_RANGE x LON_RANGE via tanh, at least in fp32."""
    z = z.to(torch.promote_types(z.dtype, torch.float32))  # bf16 degrees come in 0.25-1 degree steps
    lo = z.new_tensor([LAT_RANGE[0], LON_RANGE[0]])
    hi = z.new_tensor([LAT_RANGE[1], LON_RANGE[1]])
    return (lo + hi) / 2 + (hi - lo) / 2 * torch.tanh(z)


# ----------------------------------------------------------------------------- model


class GeoModel(nn.Module):
    """Shared backbone over V views -> fusion -> (state logits, GPS, fused embedding)."""

    def __init__(
        self,
        backbone: nn.Module,
        embed_dim: int,
        num_classes: int,
        cfg: ModelConfig,
        num_views: int = len(VIEWS),
    ):
        super().__init__()
        self.backbone = backbone
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.fusion = FUSIONS[cfg.fusion](embed_dim, num_views)
        dim = self.fusion.out_dim
        # CLIP outputs are not unit-scale (mean-pooled tokens have large outlier channels): normalise once
        self.norm = nn.LayerNorm(dim)
        self.state_head = state_head(dim, cfg.head_hidden, num_classes, cfg.dropout)
        self.gps_head = gps_head(dim, cfg.head_hidden)

    def forward_features(self, pixels: torch.Tensor, view_mask: torch.Tensor) -> torch.Tensor:
        """(B, V, 3, H, W), (B, V) -> (B, V, D) view embeddings; missing views are set to 0."""
        b, v = pixels.shape[:2]
        emb = self.backbone(pixels.flatten(0, 1)).view(b, v, -1)  # one backbone batch of B*V images
        # where() rather than * so garbage (even NaN) pixels of a missing view cannot leak through
        return torch.where(view_mask.unsqueeze(-1), emb, torch.zeros((), dtype=emb.dtype, device=emb.device))

    def forward_head(self, view_emb: torch.Tensor, view_mask: torch.Tensor) -> ModelOutput:
        """(B, V, D), (B, V) -> ModelOutput(logits (B, C), gps (B, 2), embedding (B, D'))."""
        view_emb = torch.where(view_mask.unsqueeze(-1), view_emb, torch.zeros_like(view_emb))
        fused = self.fusion(view_emb, view_mask)  # (B, D')
        h = self.norm(fused)
        return ModelOutput(self.state_head(h), bound_latlon(self.gps_head(h)), fused)

    def forward(self, pixels: torch.Tensor, view_mask: torch.Tensor) -> ModelOutput:
        return self.forward_head(self.forward_features(pixels, view_mask), view_mask)


def build_model(cfg: ModelConfig, num_classes: int) -> GeoModel:
    """Pretrained backbone (``cfg.backbone``) + fresh heads; applies checkpointing / compile options."""
    backbone, dim = load_backbone(cfg.backbone, cfg.pooling)
    model = GeoModel(backbone, dim, num_classes, cfg)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.compile:
        model.backbone.compile()  # in place: the state-dict keys stay unprefixed
    return model


# ----------------------------------------------------------------------------- trainer helpers


def backbone_blocks(model: GeoModel) -> list[nn.Module]:
    """The backbone's transformer blocks, first to last."""
    return list(model.backbone.vision_model.encoder.layers)


def _unused_modules(model: GeoModel) -> list[nn.Module]:
    """Backbone modules the pooling never reads: mean pooling skips the CLS token's post-layernorm.

    Trainable, they get no gradient and DDP (find_unused_parameters=False) fails at the next step. A
    projection exists only for projection pooling (``_hf_class``), which uses it.
    """
    backbone = model.backbone
    return [backbone.vision_model.post_layernorm] if backbone.pooling == "mean" else []


def _top_modules(model: GeoModel) -> list[nn.Module]:
    """Used backbone modules above the last block: post-layernorm and the projection, as pooled."""
    projection = getattr(model.backbone.model, "visual_projection", None)
    top = [model.backbone.vision_model.post_layernorm] + ([projection] if projection is not None else [])
    unused = _unused_modules(model)
    return [m for m in top if all(m is not u for u in unused)]


def set_backbone_trainable(model: GeoModel, last_n: int | bool | None) -> None:
    """None/False: frozen; 0 or True: whole backbone; N: last N blocks + post-layernorm + projection.

    N above the backbone's block count (or negative) is an error naming ``train.unfreeze_last_n``.

    Modules the pooling does not use stay frozen either way (see ``_unused_modules``).
    """
    if last_n is None or last_n is False:
        trainable = []
    elif last_n is True or last_n == 0:
        trainable = [model.backbone]
    else:
        blocks = backbone_blocks(model)
        if not 0 < last_n <= len(blocks):  # a slice [-99:] would quietly unfreeze everything
            raise ValueError(
                f"train.unfreeze_last_n={last_n}: the backbone has {len(blocks)} blocks; "
                f"use 1..{len(blocks)}, or 0 for the whole backbone"
            )
        trainable = blocks[-last_n:] + _top_modules(model)
    model.backbone.requires_grad_(False)
    for module in trainable:
        module.requires_grad_(True)
    for module in _unused_modules(model):
        module.requires_grad_(False)


def _backbone_depths(model: GeoModel) -> dict[str, int]:
    """Backbone parameter name -> depth from the top (BEiT-style layer decay).

    0 = post-layernorm / projection, 1 = last block, ..., L = first block, L+1 = embeddings + pre-norm.
    """
    blocks = backbone_blocks(model)
    depth_of = {id(p): len(blocks) - i for i, blk in enumerate(blocks) for p in blk.parameters()}
    depth_of.update({id(p): 0 for m in _top_modules(model) for p in m.parameters()})
    return {n: depth_of.get(id(p), len(blocks) + 1) for n, p in model.backbone.named_parameters()}


def _no_decay(name: str, p: torch.Tensor) -> bool:
    ndim = len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 partitioned params keep their shape in ds_shape
    return ndim <= 1 or "position_embedding" in name  # biases, norms, class token, position table


def param_groups(
    model: GeoModel, head_lr: float, backbone_lr: float, weight_decay: float, layer_decay: float = 1.0
) -> list[dict]:
    """AdamW groups: heads/fusion at ``head_lr``; backbone at ``backbone_lr * layer_decay**depth``.

    Only trainable parameters; no weight decay on biases and norms. Each group has a ``name`` and an
    ``initial_lr`` so a scheduler can scale every group by the same factor.
    """
    groups: dict[str, dict] = {}

    def add(name: str, p: torch.Tensor, lr: float, decay: bool) -> None:
        key = f"{name}.{'decay' if decay else 'no_decay'}"
        group = groups.setdefault(
            key, {"name": key, "params": [], "lr": lr, "initial_lr": lr, "weight_decay": weight_decay * decay}
        )
        group["params"].append(p)

    depths = _backbone_depths(model)
    for name, p in model.backbone.named_parameters():
        if p.requires_grad:
            depth = depths[name]
            add(f"backbone.depth{depth}", p, backbone_lr * layer_decay**depth, not _no_decay(name, p))
    for name, p in model.named_parameters():
        if p.requires_grad and not name.startswith("backbone."):
            add("head", p, head_lr, not _no_decay(name, p))
    return list(groups.values())


def enable_gradient_checkpointing(model: GeoModel, use_reentrant: bool = False) -> None:
    """Recompute backbone activations in backward (transformers 5 name first, old name as fallback).

    Non-reentrant, whatever the installed transformers defaults to (its older releases chose reentrant):
    a reentrant checkpoint whose inputs need no grad (the output of frozen blocks, with
    ``train.unfreeze_last_n``) returns outputs without grad, so the unfrozen blocks would get none.
    """
    hf = model.backbone.model
    enable = getattr(hf, "activation_checkpointing_enable", None) or hf.gradient_checkpointing_enable
    enable({"use_reentrant": use_reentrant})  # first parameter of both: the torch checkpoint kwargs


def head_parameters(model: GeoModel) -> list[nn.Parameter]:
    """Everything but the backbone (fusion, norm, heads): what phase 1 trains."""
    return [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
