"""Vision backbone families (CLIP, DINOv2, SigLIP): everything that differs between them, one adapter each.

The rest of geoloc sees one interface (``geoloc.backbone``): a module mapping ``(N, 3, S, S)`` images to
``(N, D)`` vectors, its transformer blocks (what phase 2 unfreezes and layer decay counts), the used
modules above the last block, and the parameters the chosen pooling never reaches (kept frozen: DDP
fails on a trainable parameter without a gradient). Each family says, in one small class:

| | CLIP | DINOv2 | SigLIP |
|---|---|---|---|
| transformers class | ``CLIPVisionModel[WithProjection]`` | ``Dinov2Model`` | ``SiglipVisionModel`` |
| ``projection`` | projected CLS (CLIP's image embedding) | refused: no projection | attention-pooling head (SigLIP's image embedding) |
| ``cls`` | CLS after post-layernorm | CLS after the final layernorm | refused: no CLS token |
| ``mean`` | patch tokens after post-layernorm (PIGEON) | patch tokens after the final layernorm | all tokens after post-layernorm |
| blocks | ``encoder.layers`` | ``encoder.layer`` | ``encoder.layers`` |
| above the blocks | post-layernorm, projection | layernorm | post-layernorm, head |
| unused (frozen) | post-layernorm under ``mean`` | ``mask_token`` (masked pre-training only) | - (``mean`` builds no head) |
| input size | config ``image_size`` | processor crop size (224; config's 518 is the position grid) | processor size |
| mean/std without processor config | OpenAI CLIP's | ImageNet's | 0.5 |

A pooling a family has no such thing for is refused (:class:`geoloc.config.ConfigError` naming
``model.pooling`` and the family) rather than silently mapped, so a config never means two different
embeddings. ``transformers`` is imported inside functions only (importing it takes seconds).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from geoloc.config import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv2's (BitImageProcessor defaults)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


class Family:
    """What one backbone family does differently; subclasses fill in the table above."""

    name = ""
    model_types: tuple[str, ...] = ()  # config.model_type of a full checkpoint and of its vision tower
    config_class = ""  # transformers class of the vision config (rebuilds backbone_config.json)
    poolings: ClassVar[dict[str, str]] = {}  # model.pooling -> what the embedding is
    refused: ClassVar[dict[str, str]] = {}  # model.pooling -> why the family has none, what to use
    mean, std = CLIP_MEAN, CLIP_STD  # when the checkpoint ships no preprocessor_config.json
    required_keys: tuple[str, ...] = ()  # backbone_config.json keys that fix the shapes
    interpolates = True  # forward takes interpolate_pos_encoding (DINOv2 interpolates by itself)

    def check_pooling(self, pooling: str, where: str) -> None:
        if pooling in self.refused:
            raise ConfigError(
                f"model.pooling={pooling}: {self.name} backbone {where} {self.refused[pooling]}"
            )
        if pooling not in self.poolings:
            raise ConfigError(f"model.pooling={pooling!r}: {self.name} offers {list(self.poolings)}")

    def vision_config(self, config, pooling: str):
        """The vision tower's config from a checkpoint's config (full model or vision tower only)."""
        return getattr(config, "vision_config", config)

    def model_class(self, pooling: str) -> str:
        raise NotImplementedError

    def embed_dim(self, vision, pooling: str) -> int:
        return int(vision.hidden_size)

    def forward_kwargs(self, pixels: torch.Tensor, vision) -> dict:
        """Other sizes (TTA scales, a processor crop) need interpolated position embeddings."""
        if not self.interpolates:
            return {}
        return {"interpolate_pos_encoding": tuple(pixels.shape[-2:]) != (vision.image_size,) * 2}

    def pool(self, out, pooling: str) -> torch.Tensor:  # transformers output -> (N, D)
        raise NotImplementedError

    def inner(self, hf: nn.Module) -> nn.Module:
        """The module holding embeddings, encoder and the final norm (some releases wrap it)."""
        return getattr(hf, "vision_model", hf)

    def blocks(self, hf: nn.Module) -> nn.ModuleList:
        return self.inner(hf).encoder.layers

    def top(self, hf: nn.Module) -> list[nn.Module]:
        """Modules above the last block (final norm, projection or pooling head), where present."""
        raise NotImplementedError

    def unused(self, hf: nn.Module, pooling: str) -> list[nn.Parameter]:
        """Parameters the pooling never reaches: kept frozen, since DDP fails on one without a gradient."""
        return []

    def image_size(self, vision, processor: dict) -> int:
        return int(vision.image_size)


class ClipFamily(Family):
    name = "CLIP"
    model_types = ("clip", "clip_vision_model")
    config_class = "CLIPVisionConfig"
    poolings: ClassVar[dict[str, str]] = {
        "projection": "the projected CLS token (CLIP's image embedding)",
        "cls": "the CLS token after post-layernorm",
        "mean": "the mean of the patch tokens (PIGEON)",
    }
    required_keys = (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size", "image_size",
    )  # fmt: skip

    def vision_config(self, config, pooling: str):
        """A full CLIPModel dir may save a vision_config without ``projection_dim`` (the 512 default then
        appears and loading the projection fails on a size mismatch): the top-level value is the truth."""
        if hasattr(config, "vision_config"):
            vision = config.vision_config
            vision.projection_dim = config.projection_dim
            return vision
        return config

    def model_class(self, pooling: str) -> str:
        return "CLIPVisionModelWithProjection" if pooling == "projection" else "CLIPVisionModel"

    def embed_dim(self, vision, pooling: str) -> int:
        return int(vision.projection_dim if pooling == "projection" else vision.hidden_size)

    def pool(self, out, pooling: str) -> torch.Tensor:
        if pooling == "projection":
            return out.image_embeds
        if pooling == "cls":
            return out.pooler_output  # CLS token after post-layernorm
        return out.last_hidden_state[:, 1:].mean(dim=1)  # (N, 1 + P, D) -> patch tokens' mean

    def top(self, hf: nn.Module) -> list[nn.Module]:
        projection = getattr(hf, "visual_projection", None)  # only built for projection pooling
        return [self.inner(hf).post_layernorm] + ([projection] if projection is not None else [])

    def unused(self, hf: nn.Module, pooling: str) -> list[nn.Parameter]:
        # mean pooling reads last_hidden_state, which CLIP returns before its post-layernorm
        return list(self.inner(hf).post_layernorm.parameters()) if pooling == "mean" else []


class Dinov2Family(Family):
    name = "DINOv2"
    model_types = ("dinov2",)
    config_class = "Dinov2Config"
    poolings: ClassVar[dict[str, str]] = {
        "cls": "the CLS token after the final layernorm (DINOv2's image embedding)",
        "mean": "the mean of the patch tokens after the final layernorm",
    }
    refused: ClassVar[dict[str, str]] = {
        "projection": "has no image projection: use model.pooling=cls (its layer-normed CLS token, the "
        "image embedding DINOv2 was trained for) or model.pooling=mean (its patch tokens' mean)",
    }
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    required_keys = ("hidden_size", "mlp_ratio", "num_hidden_layers", "num_attention_heads", "patch_size")
    interpolates = False  # Dinov2Embeddings interpolates whenever the patch grid differs

    def model_class(self, pooling: str) -> str:
        return "Dinov2Model"

    def pool(self, out, pooling: str) -> torch.Tensor:
        if pooling == "cls":
            return out.pooler_output  # = last_hidden_state[:, 0], layer-normed
        return out.last_hidden_state[:, 1:].mean(dim=1)  # (N, 1 + P, D) -> patch tokens' mean

    def blocks(self, hf: nn.Module) -> nn.ModuleList:
        return hf.encoder.layer

    def top(self, hf: nn.Module) -> list[nn.Module]:
        return [hf.layernorm]

    def unused(self, hf: nn.Module, pooling: str) -> list[nn.Parameter]:
        # only read with bool_masked_pos (iBOT pre-training); kept rather than dropped from the config, so
        # the state-dict keys are the same under every transformers release
        mask_token = getattr(hf.embeddings, "mask_token", None)
        return [mask_token] if mask_token is not None else []

    def image_size(self, vision, processor: dict) -> int:
        """The processor's crop (224 for every released DINOv2): the config's 518 only sizes the position
        table, which the model interpolates to any grid."""
        return processor_size(processor, default=224)


class SiglipFamily(Family):
    name = "SigLIP"
    model_types = ("siglip", "siglip_vision_model")
    config_class = "SiglipVisionConfig"
    poolings: ClassVar[dict[str, str]] = {
        "projection": "the attention-pooling head's output (SigLIP's image embedding)",
        "mean": "the mean of all tokens after post-layernorm",
    }
    refused: ClassVar[dict[str, str]] = {
        "cls": "has no CLS token: use model.pooling=projection (its attention-pooling head, the image "
        "embedding SigLIP was trained with) or model.pooling=mean (the mean of its tokens)",
    }
    mean, std = SIGLIP_MEAN, SIGLIP_STD
    required_keys = ClipFamily.required_keys

    def vision_config(self, config, pooling: str):
        vision = getattr(config, "vision_config", config)
        if pooling == "projection" and not getattr(vision, "vision_use_head", True):
            raise ConfigError(
                "model.pooling=projection: this SigLIP checkpoint has no attention-pooling head "
                "(vision_use_head=false): use model.pooling=mean"
            )
        vision.vision_use_head = pooling == "projection"  # mean pooling: build (and run) no head at all
        return vision

    def model_class(self, pooling: str) -> str:
        return "SiglipVisionModel"

    def pool(self, out, pooling: str) -> torch.Tensor:
        if pooling == "projection":
            return out.pooler_output  # (N, D) from the attention-pooling head
        return out.last_hidden_state.mean(dim=1)  # (N, P, D): no CLS token, every token is a patch

    def top(self, hf: nn.Module) -> list[nn.Module]:
        inner = self.inner(hf)
        head = getattr(inner, "head", None) if getattr(inner, "use_head", False) else None
        return [inner.post_layernorm] + ([head] if head is not None else [])

    def image_size(self, vision, processor: dict) -> int:
        return processor_size(processor, default=int(vision.image_size))


FAMILIES: tuple[Family, ...] = (ClipFamily(), Dinov2Family(), SiglipFamily())


def family_of(model_type: str | None, where: str) -> Family:
    """The family reading configs of ``model_type``; anything else is an error naming ``where``."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    known = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)
    raise ConfigError(f"{where}: model_type {model_type!r} is not a supported backbone family: {known}")


def processor_size(processor: dict, default: int) -> int:
    """The square input size a ``preprocessor_config.json`` produces: its crop when it crops, else its size.

    ``size`` may be ``{"height", "width"}``, ``{"shortest_edge"}`` or a bare int (older files); geoloc's
    views are square, so a resize of the shortest edge followed by a crop gives a square of the crop size.
    """
    crop = processor.get("crop_size") if processor.get("do_center_crop", "crop_size" in processor) else None
    for key, value in (("crop_size", crop), ("size", processor.get("size"))):
        if value is None:
            continue
        side = _square_side(value)
        if side is None:
            raise ValueError(f"preprocessor_config.json: key {key!r} is not a square size: {value!r}")
        return side
    return default


def _square_side(value) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, dict):
        if "height" in value and value.get("height") == value.get("width"):
            return int(value["height"])
        if set(value) == {"shortest_edge"}:
            return int(value["shortest_edge"])
    return None
