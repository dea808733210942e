"""GeoModel: a shared CLIP vision backbone per view, view fusion, and heads by name.

The V views of a sample go through the backbone as one batch ``(B*V, 3, H, W)``; their embeddings are
fused into one vector per sample, honouring the view mask (a missing view is left out, never averaged in
as zeros). ``forward_features`` and ``forward_head`` are separate so the frozen phase can train the heads
on cached view embeddings. The heads (``model.heads``, see :mod:`geoloc.heads`) read the fused, normalised
embedding; the forward returns ``{"embedding": (B, D'), <head>: <output>, ...}``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from geoloc.backbone import backbone_depths, enable_gradient_checkpointing, load_backbone
from geoloc.config import ModelConfig
from geoloc.contract import VIEWS
from geoloc.heads import HeadSizes, build_heads

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


# ----------------------------------------------------------------------------- model


class GeoModel(nn.Module):
    """Shared backbone over V views -> fusion -> normalised embedding -> heads by name."""

    def __init__(
        self,
        backbone: nn.Module,
        embed_dim: int,
        cfg: ModelConfig,
        sizes: HeadSizes,
        num_views: int = len(VIEWS),
    ):
        super().__init__()
        self.backbone = backbone
        self.embed_dim = embed_dim
        self.num_classes, self.num_cells = sizes.num_classes, sizes.num_cells
        self.fusion = FUSIONS[cfg.fusion](embed_dim, num_views)
        dim = self.fusion.out_dim
        # CLIP outputs are not unit-scale (mean-pooled tokens have large outlier channels): normalise once
        self.norm = nn.LayerNorm(dim)
        self.heads = build_heads(cfg.heads, dim, cfg.head_hidden, cfg.dropout, sizes)

    def forward_features(self, pixels: torch.Tensor, view_mask: torch.Tensor) -> torch.Tensor:
        """(B, V, 3, H, W), (B, V) -> (B, V, D) view embeddings; missing views are set to 0."""
        b, v = pixels.shape[:2]
        emb = self.backbone(pixels.flatten(0, 1)).view(b, v, -1)  # one backbone batch of B*V images
        # where() rather than * so garbage (even NaN) pixels of a missing view cannot leak through
        return torch.where(view_mask.unsqueeze(-1), emb, torch.zeros((), dtype=emb.dtype, device=emb.device))

    def forward_head(self, view_emb: torch.Tensor, view_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, V, D), (B, V) -> ``{"embedding": (B, D'), <head>: output}`` (state/cell logits, gps degrees)."""
        view_emb = torch.where(view_mask.unsqueeze(-1), view_emb, torch.zeros_like(view_emb))
        fused = self.fusion(view_emb, view_mask)  # (B, D')
        h = self.norm(fused)
        return {"embedding": fused, **{name: head(h) for name, head in self.heads.items()}}

    def forward(self, pixels: torch.Tensor, view_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_head(self.forward_features(pixels, view_mask), view_mask)


def build_model(cfg: ModelConfig, sizes: HeadSizes) -> GeoModel:
    """Pretrained backbone (``cfg.backbone``) + fresh heads; applies checkpointing / compile options."""
    backbone, dim = load_backbone(cfg.backbone, cfg.pooling)
    model = GeoModel(backbone, dim, cfg, sizes)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.compile:
        model.backbone.compile()  # in place: the state-dict keys stay unprefixed
    return model


# ----------------------------------------------------------------------------- trainer helpers


NO_DECAY_NAMES = ("position_embedding", "cls_token", "mask_token", "head.probe")


def _no_decay(name: str, p: torch.Tensor) -> bool:
    ndim = len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 partitioned params keep their shape in ds_shape
    # biases, norms, CLIP's class token (1-D); position tables and the (1, 1, D) tokens of DINOv2 (CLS,
    # mask) and SigLIP (the pooling head's probe), which are embeddings too
    return ndim <= 1 or any(key in name for key in NO_DECAY_NAMES)


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

    depths = backbone_depths(model)
    for name, p in model.backbone.named_parameters():
        if p.requires_grad:
            depth = depths[name]
            add(f"backbone.depth{depth}", p, backbone_lr * layer_decay**depth, not _no_decay(name, p))
    for name, p in model.named_parameters():
        if p.requires_grad and not name.startswith("backbone."):
            add("head", p, head_lr, not _no_decay(name, p))
    return list(groups.values())


def head_parameters(model: GeoModel) -> list[nn.Parameter]:
    """Everything but the backbone (fusion, norm, heads): what phase 1 trains."""
    return [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
