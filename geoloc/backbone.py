"""The CLIP vision backbone: loading (hub id or local dir), pooling, and what phase 2 unfreezes.

``transformers`` is imported inside functions only: importing it takes seconds and CLI ``--help`` must
stay fast. Every dimension comes from the checkpoint's config.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from geoloc.config import POOLINGS

log = logging.getLogger(__name__)


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


# ----------------------------------------------------------------------------- freezing


def backbone_blocks(model) -> list[nn.Module]:
    """The backbone's transformer blocks, first to last."""
    return list(model.backbone.vision_model.encoder.layers)


def _unused_modules(model) -> list[nn.Module]:
    """Backbone modules the pooling never reads: mean pooling skips the CLS token's post-layernorm.

    Trainable, they get no gradient and DDP (find_unused_parameters=False) fails at the next step. A
    projection exists only for projection pooling (``_hf_class``), which uses it.
    """
    backbone = model.backbone
    return [backbone.vision_model.post_layernorm] if backbone.pooling == "mean" else []


def _top_modules(model) -> list[nn.Module]:
    """Used backbone modules above the last block: post-layernorm and the projection, as pooled."""
    projection = getattr(model.backbone.model, "visual_projection", None)
    top = [model.backbone.vision_model.post_layernorm] + ([projection] if projection is not None else [])
    unused = _unused_modules(model)
    return [m for m in top if all(m is not u for u in unused)]


def set_backbone_trainable(model, last_n: int | bool | None) -> None:
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


def backbone_depths(model) -> dict[str, int]:
    """Backbone parameter name -> depth from the top (BEiT-style layer decay).

    0 = post-layernorm / projection, 1 = last block, ..., L = first block, L+1 = embeddings + pre-norm.
    """
    blocks = backbone_blocks(model)
    depth_of = {id(p): len(blocks) - i for i, blk in enumerate(blocks) for p in blk.parameters()}
    depth_of.update({id(p): 0 for m in _top_modules(model) for p in m.parameters()})
    return {n: depth_of.get(id(p), len(blocks) + 1) for n, p in model.backbone.named_parameters()}


def enable_gradient_checkpointing(model, use_reentrant: bool = False) -> None:
    """Recompute backbone activations in backward (transformers 5 name first, old name as fallback).

    Non-reentrant, whatever the installed transformers defaults to (its older releases chose reentrant):
    a reentrant checkpoint whose inputs need no grad (the output of frozen blocks, with
    ``train.unfreeze_last_n``) returns outputs without grad, so the unfrozen blocks would get none.
    """
    hf = model.backbone.model
    enable = getattr(hf, "activation_checkpointing_enable", None) or hf.gradient_checkpointing_enable
    enable({"use_reentrant": use_reentrant})  # first parameter of both: the torch checkpoint kwargs
