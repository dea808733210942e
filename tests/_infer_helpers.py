"""Helpers shared by the infer tests: export a tiny (untrained) GeoModel the way train.py exports one.

The heads are perturbed away from their small initialisation so that the probabilities have a clear
ranking (an ensemble or a 2-process run must reproduce the ranking, not a near-tie).
"""

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from geoloc.config import Config, ModelConfig
from geoloc.contract import SAMPLE_SUBMISSION, read_state_mapping, read_train_table
from geoloc.export import save_model_dir, vision_config_dict
from geoloc.geo import state_centroids
from geoloc.heads import HeadSizes
from geoloc.labels import LabelEncoder
from geoloc.metrics import Prior
from geoloc.model import build_model
from geoloc.preprocess import preprocess_settings

ROOT = Path(__file__).resolve().parents[1]
ENV = {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def export_tiny_model(clip_dir, data_root, out, seed: int = 0) -> Path:
    """A model directory for ``data_root``'s states: encoder, centroids and prior from its train CSV."""
    train = read_train_table(data_root)
    encoder = LabelEncoder.fit(train["state_idx"], read_state_mapping(data_root))
    classes = encoder.encode(train["state_idx"])
    latlon = train[["latitude", "longitude"]].to_numpy(np.float64)
    cfg = Config(model=ModelConfig(backbone=str(clip_dir), head_hidden=16))
    torch.manual_seed(seed)
    model = build_model(cfg.model, HeadSizes(encoder.num_classes)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return save_model_dir(
        out,
        model_state_dict=model.state_dict(),
        cfg=cfg,
        vision_config=vision_config_dict(model),
        embed_dim=model.embed_dim,
        num_classes=model.num_classes,
        encoder=encoder,
        preprocess=preprocess_settings(str(clip_dir)),
        centroids=state_centroids(latlon[:, 0], latlon[:, 1], classes, encoder.num_classes),
        prior=Prior.fit(train["state_idx"], latlon).to_dict(),
    )


def read_csv(path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"sample_id": str})


def template_path(data_root) -> Path:
    return Path(data_root) / SAMPLE_SUBMISSION
