"""Tiny DINOv2 and SigLIP checkpoints built locally, laid out like the released ones (tests, benches).

Like ``geoloc.tiny_clip`` for CLIP: random weights, offline, the real directory layout:

- DINOv2 (``facebook/dinov2-*``): a ``Dinov2Model`` dir whose config ``image_size`` (518) sizes the
  position table, and a ``BitImageProcessor`` config that resizes the shortest edge to 256 and crops 224
  with ImageNet's mean/std. The tiny one keeps those ratios: a position grid larger than the crop, so the
  model always interpolates, as the real one does.
- SigLIP (``google/siglip-*``): a full ``SiglipModel`` dir (vision + text tower), and a
  ``SiglipImageProcessor`` config resizing to the model's size with mean = std = 0.5.

``build_tiny_backbone(family, dir)`` builds any of the three families at one common size.
"""

from __future__ import annotations

import json
from pathlib import Path

from geoloc.families import IMAGENET_MEAN, IMAGENET_STD, SIGLIP_MEAN, SIGLIP_STD

# Published architectures (config.json of the hub checkpoints), for cost comparisons with random weights
DINOV2_LARGE = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "mlp_ratio": 4,
                "patch_size": 14, "image_size": 518}  # facebook/dinov2-large, run at its 224 crop  # fmt: skip
SIGLIP_LARGE_384 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                    "num_attention_heads": 16, "patch_size": 16, "image_size": 384}  # fmt: skip
SIGLIP_SO400M_384 = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                     "num_attention_heads": 16, "patch_size": 14, "image_size": 384}  # fmt: skip
DINOV2_CROP = 224  # what every released DINOv2 image processor feeds the model


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2))


def build_dinov2(out_dir: str | Path, config: dict, crop: int = DINOV2_CROP, seed: int = 0) -> Path:
    """Save a random-weight ``Dinov2Model`` with ``config`` and a processor that crops ``crop`` px."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    Dinov2Model(Dinov2Config(**config)).save_pretrained(out_dir)
    _write_json(
        out_dir / "preprocessor_config.json",
        {
            "image_processor_type": "BitImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": round(crop * 256 / 224)},  # the released 256 -> 224 ratio
            "do_center_crop": True,
            "crop_size": {"height": crop, "width": crop},
            "image_mean": list(IMAGENET_MEAN),
            "image_std": list(IMAGENET_STD),
        },
    )
    return out_dir


def build_siglip(out_dir: str | Path, vision: dict, seed: int = 0) -> Path:
    """Save a random-weight full ``SiglipModel`` (vision ``vision`` + a one-layer text tower)."""
    import torch
    from transformers import SiglipConfig, SiglipModel

    out_dir = Path(out_dir)
    text = {  # one layer: the trainer never loads it; token ids inside the tiny vocabulary
        "hidden_size": vision["hidden_size"], "intermediate_size": vision["hidden_size"] * 2,
        "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 128, "max_position_embeddings": 16,
        "pad_token_id": 1, "bos_token_id": 126, "eos_token_id": 127,
    }  # fmt: skip
    torch.manual_seed(seed)
    SiglipModel(SiglipConfig(text_config=text, vision_config=dict(vision))).save_pretrained(out_dir)
    size = vision["image_size"]
    _write_json(
        out_dir / "preprocessor_config.json",
        {
            "image_processor_type": "SiglipImageProcessor",
            "do_resize": True,
            "size": {"height": size, "width": size},
            "image_mean": list(SIGLIP_MEAN),
            "image_std": list(SIGLIP_STD),
        },
    )
    return out_dir


def build_tiny_dinov2(
    out_dir: str | Path, image_size: int = 56, hidden_size: int = 32, num_layers: int = 2,
    patch_size: int = 14, seed: int = 0,
) -> Path:  # fmt: skip
    """A tiny DINOv2 fed ``image_size`` px crops; its position table is for ~2.3x that (518 / 224)."""
    grid = round(image_size * 518 / 224 / patch_size)
    config = {
        "hidden_size": hidden_size, "num_hidden_layers": num_layers, "num_attention_heads": 2, "mlp_ratio": 2,
        "patch_size": patch_size, "image_size": grid * patch_size,
    }  # fmt: skip
    return build_dinov2(out_dir, config, crop=image_size, seed=seed)


def build_tiny_siglip(
    out_dir: str | Path, image_size: int = 56, hidden_size: int = 32, num_layers: int = 2,
    patch_size: int = 14, seed: int = 0,
) -> Path:  # fmt: skip
    """A tiny full SigLIP checkpoint (vision tower with its attention-pooling head)."""
    vision = {
        "hidden_size": hidden_size, "intermediate_size": hidden_size * 2, "num_hidden_layers": num_layers,
        "num_attention_heads": 2, "image_size": image_size, "patch_size": patch_size,
    }  # fmt: skip
    return build_siglip(out_dir, vision, seed=seed)


def build_tiny_backbone(family: str, out_dir: str | Path, **kw) -> Path:
    """``family`` in ``clip | dinov2 | siglip``: a tiny checkpoint of it (same keywords for all three)."""
    from geoloc.tiny_clip import build_tiny_clip

    builders = {"clip": build_tiny_clip, "dinov2": build_tiny_dinov2, "siglip": build_tiny_siglip}
    if family not in builders:
        raise ValueError(f"family {family!r}: choose one of {list(builders)}")
    return builders[family](out_dir, **kw)
