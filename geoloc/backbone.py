"""The vision backbone (CLIP, DINOv2 or SigLIP): loading (hub id or local dir), pooling, what phase 2
unfreezes, checkpointing.

What differs between the families lives in ``geoloc.families`` (one small adapter each); this module is
the interface the model, the trainer and the export use. ``transformers`` is imported inside functions
only: importing it takes seconds and CLI ``--help`` must stay fast. Every dimension comes from the
checkpoint's config.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from geoloc.config import POOLINGS
from geoloc.families import Family, family_of

log = logging.getLogger(__name__)


class VisionBackbone(nn.Module):
    """A transformers vision model plus the pooling that turns an image into one vector."""

    def __init__(self, hf_model: nn.Module, pooling: str, family: Family | None = None):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r}: choose one of {list(POOLINGS)}")
        self.model = hf_model  # e.g. CLIPVisionModelWithProjection for "projection", else CLIPVisionModel
        self.pooling = pooling
        self.family = family or family_of(hf_model.config.model_type, type(hf_model).__name__)
        self.family.check_pooling(pooling, type(hf_model).__name__)

    @property
    def config(self):
        return self.model.config

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    @property
    def vision_model(self) -> nn.Module:
        """The module holding embeddings, encoder and final norm (CLIPVisionModel inside either wrapper)."""
        return self.family.inner(self.model)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, D)
        out = self.model(pixel_values=pixels, **self.family.forward_kwargs(pixels, self.model.config))
        return self.family.pool(out, self.pooling)


ClipBackbone = VisionBackbone  # its name before DINOv2 and SigLIP


def _hf_class(family: Family, pooling: str):
    import transformers

    return getattr(transformers, family.model_class(pooling))


def _config_errors() -> tuple[type[Exception], ...]:
    """What a config's ``from_dict`` raises on a bad value: recent releases validate each field with
    huggingface_hub's strict dataclasses, whose error is no ValueError."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # older huggingface_hub: configs do not validate
        return (TypeError, ValueError)
    return (TypeError, ValueError, StrictDataclassError)


def checkpoint_family(name_or_path: str):
    """``(family, full config)`` of a checkpoint (hub id or dir), from its config.json alone."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path)
    return family_of(config.model_type, f"model.backbone={name_or_path}"), config


def _vision_config(name_or_path: str, pooling: str):
    """The family and vision config of a checkpoint; a pooling the family has none of is refused here."""
    family, config = checkpoint_family(name_or_path)
    family.check_pooling(pooling, name_or_path)
    return family, family.vision_config(config, pooling)


def load_backbone(name_or_path: str, pooling: str) -> tuple[VisionBackbone, int]:
    """Pretrained vision backbone from a hub id or local dir -> (module, view-embedding dim D)."""
    from transformers.utils import logging as hf_logging

    family, vision = _vision_config(name_or_path, pooling)
    # A full CLIPModel / SiglipModel dir (StreetCLIP) also holds the text tower: transformers would print a
    # table of ~200 "UNEXPECTED" keys. That is expected here; missing keys are what matter (checked below).
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        hf_model, info = _hf_class(family, pooling).from_pretrained(
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
    return VisionBackbone(hf_model, pooling, family), family.embed_dim(vision, pooling)


def backbone_from_config(vision_config_dict: dict, pooling: str) -> tuple[VisionBackbone, int]:
    """The same backbone with random weights from a saved vision config (no hub access needed).

    The dict's ``model_type`` picks the family (an export written before DINOv2 and SigLIP holds a CLIP
    vision config, which always names its model_type; a dict without one is read as CLIP).
    """
    import transformers

    family = family_of(vision_config_dict.get("model_type", "clip_vision_model"), "backbone config")
    family.check_pooling(pooling, "in backbone_config.json")
    try:
        vision = getattr(transformers, family.config_class).from_dict(dict(vision_config_dict))
    except _config_errors() as err:  # a value of the wrong type or out of range
        raise ValueError(f"{family.name} vision config: {str(err).strip()}") from None
    hf_model = _hf_class(family, pooling)._from_config(vision, attn_implementation="sdpa")
    return VisionBackbone(hf_model, pooling, family), family.embed_dim(vision, pooling)


# ----------------------------------------------------------------------------- freezing


def backbone_blocks(model) -> list[nn.Module]:
    """The backbone's transformer blocks, first to last."""
    return list(model.backbone.family.blocks(model.backbone.model))


def _unused_parameters(model) -> list[nn.Parameter]:
    """Backbone parameters the pooling never reads (e.g. CLIP's post-layernorm under mean pooling).

    Trainable, they get no gradient and DDP (find_unused_parameters=False) fails at the next step.
    """
    backbone = model.backbone
    return backbone.family.unused(backbone.model, backbone.pooling)


def _top_parameters(model) -> list[nn.Parameter]:
    """Used backbone parameters above the last block: final norm, projection or pooling head."""
    backbone = model.backbone
    unused = {id(p) for p in _unused_parameters(model)}
    top = backbone.family.top(backbone.model)
    return [p for m in top for p in m.parameters() if id(p) not in unused]


def set_backbone_trainable(model, last_n: int | bool | None) -> None:
    """None/False: frozen; 0 or True: whole backbone; N: last N blocks + what sits above them.

    N above the backbone's block count (or negative) is an error naming ``train.unfreeze_last_n``.

    Parameters the pooling does not use stay frozen either way (see ``_unused_parameters``).
    """
    if last_n is None or last_n is False:
        trainable = []
    elif last_n is True or last_n == 0:
        trainable = list(model.backbone.parameters())
    else:
        blocks = backbone_blocks(model)
        if not 0 < last_n <= len(blocks):  # a slice [-99:] would quietly unfreeze everything
            raise ValueError(
                f"train.unfreeze_last_n={last_n}: the backbone has {len(blocks)} blocks; "
                f"use 1..{len(blocks)}, or 0 for the whole backbone"
            )
        trainable = [p for blk in blocks[-last_n:] for p in blk.parameters()] + _top_parameters(model)
    model.backbone.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    for p in _unused_parameters(model):
        p.requires_grad_(False)


def backbone_depths(model) -> dict[str, int]:
    """Backbone parameter name -> depth from the top (BEiT-style layer decay).

    0 = what sits above the blocks (final norm, projection, pooling head), 1 = last block, ...,
    L = first block, L+1 = embeddings (+ CLIP's pre-norm).
    """
    blocks = backbone_blocks(model)
    depth_of = {id(p): len(blocks) - i for i, blk in enumerate(blocks) for p in blk.parameters()}
    depth_of.update({id(p): 0 for p in _top_parameters(model)})
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
