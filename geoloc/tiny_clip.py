"""A tiny CLIP checkpoint built locally, laid out like the real ones (for tests and the demo).

Real checkpoints such as ``geolocal/StreetCLIP`` are full ``CLIPModel`` directories whose
``vision_config`` carries ``projection_dim`` and which ship a ``preprocessor_config.json``; this builds the
same layout from a small config, offline, with random weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from geoloc.preprocess import CLIP_MEAN, CLIP_STD


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
    import torch
    from transformers import CLIPConfig, CLIPModel

    out_dir = Path(out_dir)
    vision = {
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": patch_size,
        "projection_dim": projection_dim,  # like OpenAI-derived checkpoints: the vision config carries it
    }
    text = {
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "vocab_size": 128,
        "max_position_embeddings": 16,
        "projection_dim": projection_dim,
    }
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(out_dir)
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
