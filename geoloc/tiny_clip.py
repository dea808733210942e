"""A tiny CLIP checkpoint built locally, laid out like the real ones (for tests and the demo).

Real checkpoints such as ``geolocal/StreetCLIP`` are full ``CLIPModel`` directories whose
``vision_config`` carries ``projection_dim`` and which ship a ``preprocessor_config.json``; this builds the
same layout from a small config, offline, with random weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from geoloc.preprocess import CLIP_MEAN, CLIP_STD

# StreetCLIP's vision tower: the config of openai/clip-vit-large-patch14-336, which geolocal/StreetCLIP
# fine-tunes without changing it (ViT-L/14 at 336 px: 577 tokens, 304 M weights, projection to 768).
STREETCLIP_VISION = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}


def build_tiny_clip(
    out_dir: str | Path,
    image_size: int = 56,
    hidden_size: int = 32,
    num_layers: int = 2,
    projection_dim: int = 16,
    patch_size: int = 14,
    seed: int = 0,
) -> Path:
    """Save a random-weight CLIPModel (vision + text) with preprocessor config to ``out_dir``."""
    vision = {
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": patch_size,
        "projection_dim": projection_dim,  # like OpenAI-derived checkpoints: the vision config carries it
    }
    return build_clip(out_dir, vision, seed=seed)


def build_clip(out_dir: str | Path, vision: dict, seed: int = 0) -> Path:
    """Save a random-weight CLIPModel with the vision config ``vision`` and a small text tower.

    The layout is a real checkpoint's (full CLIPModel dir, ``projection_dim`` in the vision config,
    ``preprocessor_config.json``); the text tower has one layer because the trainer never loads it.
    ``build_clip(dir, STREETCLIP_VISION)`` is StreetCLIP's vision architecture (1.2 GB of fp32 weights).
    """
    import torch
    from transformers import CLIPConfig, CLIPModel

    out_dir = Path(out_dir)
    projection_dim = vision["projection_dim"]
    text = {  # one layer as wide as the vision tower (as build_tiny_clip always made it)
        "hidden_size": vision["hidden_size"],
        "intermediate_size": vision["hidden_size"] * 2,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "vocab_size": 128,
        "max_position_embeddings": 16,
        "projection_dim": projection_dim,
    }
    config = CLIPConfig(text_config=text, vision_config=dict(vision), projection_dim=projection_dim)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(out_dir)
    image_size = vision["image_size"]
    (out_dir / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "CLIPImageProcessor",
                "crop_size": {"height": image_size, "width": image_size},
                "size": {"shortest_edge": image_size},
                "image_mean": list(CLIP_MEAN),
                "image_std": list(CLIP_STD),
            },
            indent=2,
        )
    )
    return out_dir
