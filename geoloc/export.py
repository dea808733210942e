"""The exported model directory ``<run>/model/``: everything inference needs, nothing it must download.

Layout (see ARCHITECTURE.md)::

    model.safetensors     full GeoModel state dict, fp32, contiguous (ZeRO-3: the gathered one)
    backbone_config.json  the CLIP vision config, so the backbone is rebuilt without hub access
    geoloc.json           label encoder, preprocessing, soft-label settings, centroids, prior, dims
    config.yaml           the resolved run config

The directory is written under a temporary name and renamed into place, so a crash never leaves a
half-written model directory behind. Loading needs neither the hub, the original checkpoint nor DeepSpeed.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from geoloc.config import Config, read_config, save_config
from geoloc.contract import VIEWS
from geoloc.labels import LabelEncoder
from geoloc.model import GeoModel, backbone_from_config

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
BACKBONE_CONFIG = "backbone_config.json"
META = "geoloc.json"
RUN_CONFIG = "config.yaml"
REQUIRED_FILES = (WEIGHTS, BACKBONE_CONFIG, META, RUN_CONFIG)
PREPROCESS_KEYS = ("image_size", "mean", "std")
# wrappers add these to state-dict keys (DDP / DeepSpeed engine, torch.compile of the whole model)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class LoadedModel:
    model: GeoModel  # in eval mode, on the requested device
    cfg: Config
    encoder: LabelEncoder
    preprocess: dict  # image_size, mean, std
    centroids: np.ndarray  # (C, 2) lat/lon degrees per contiguous class
    prior: dict
    meta: dict  # the whole geoloc.json


def unwrap(model: nn.Module) -> nn.Module:
    """The GeoModel inside DDP / DeepSpeed / torch.compile wrappers."""
    while not isinstance(model, GeoModel):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"expected a GeoModel (possibly wrapped), got {type(model).__name__}")
        model = inner
    return model


def vision_config_dict(model: nn.Module) -> dict:
    """The backbone's CLIP vision config as a plain dict (what ``backbone_config.json`` holds)."""
    return unwrap(model).backbone.config.to_dict()


def _clean_key(key: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def _fp32_state(state_dict: dict) -> dict[str, torch.Tensor]:
    """Own CPU copies (safetensors refuses shared storage); floating tensors in fp32."""
    out = {}
    for key, t in state_dict.items():
        t = t.detach().to("cpu")
        out[_clean_key(key)] = (t.float() if t.is_floating_point() else t).contiguous().clone()
    return out


def _json_default(obj):
    if isinstance(obj, (np.ndarray, np.generic, torch.Tensor)):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _check_inputs(num_classes: int, encoder: LabelEncoder, preprocess: dict, centroids: np.ndarray) -> None:
    if encoder.num_classes != num_classes:
        raise ValueError(f"label encoder has {encoder.num_classes} classes, model has {num_classes}")
    if centroids.shape != (num_classes, 2):
        raise ValueError(f"centroids must be ({num_classes}, 2), got {centroids.shape}")
    missing = [k for k in PREPROCESS_KEYS if k not in preprocess]
    if missing:
        raise ValueError(f"preprocess dict lacks {missing}")


def _meta(cfg, embed_dim, num_classes, encoder, preprocess, centroids, prior, extra) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "views": list(VIEWS),
        "pooling": cfg.model.pooling,
        "fusion": cfg.model.fusion,
        "embed_dim": int(embed_dim),
        "num_classes": int(num_classes),
        "label_encoder": encoder.to_dict(),
        "preprocess": {k: preprocess[k] for k in PREPROCESS_KEYS},
        "soft_labels": {"mode": cfg.loss.soft_labels, "tau_km": cfg.loss.tau_km},
        "centroids": centroids.tolist(),
        "prior": prior,
        "extra": extra or {},
    }


def _write_files(tmp: Path, state: dict, cfg: Config, vision_config: dict, meta: dict) -> None:
    from safetensors.torch import save_file

    save_file(state, tmp / WEIGHTS, metadata={"format": "pt"})
    (tmp / BACKBONE_CONFIG).write_text(json.dumps(vision_config, indent=2, default=_json_default))
    (tmp / META).write_text(json.dumps(meta, indent=2, default=_json_default))
    save_config(cfg, tmp / RUN_CONFIG)


def _swap_into_place(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``, replacing an existing directory; the old one goes only at the end."""
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def save_model_dir(
    path: str | Path,
    *,
    model_state_dict: dict,
    cfg: Config,
    vision_config: dict,
    embed_dim: int,
    num_classes: int,
    encoder: LabelEncoder,
    preprocess: dict,
    centroids,
    prior: dict,
    extra: dict | None = None,
) -> Path:
    """Write the model directory atomically (replacing an existing one); returns its path."""
    path = Path(path)
    centroids = np.asarray(centroids, dtype=np.float64)
    _check_inputs(num_classes, encoder, preprocess, centroids)
    meta = _meta(cfg, embed_dim, num_classes, encoder, preprocess, centroids, prior, extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier crash of this very process id
    tmp.mkdir()
    try:
        _write_files(tmp, _fp32_state(model_state_dict), cfg, vision_config, meta)
        _swap_into_place(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only still there if writing failed
    return path


def _require_files(path: Path) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: model directory not found")
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path}: not a complete geoloc model directory, missing {', '.join(missing)}"
        )


def load_model_dir(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the exported model (eval mode) from ``path`` alone: no hub, no DeepSpeed."""
    from safetensors.torch import load_file

    path = Path(path)
    _require_files(path)
    meta = json.loads((path / META).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path / META}: format_version {meta.get('format_version')}, expected {FORMAT_VERSION}"
        )
    cfg = read_config(path / RUN_CONFIG)
    vision = json.loads((path / BACKBONE_CONFIG).read_text())
    backbone, dim = backbone_from_config(vision, meta["pooling"])
    if dim != meta["embed_dim"]:
        raise ValueError(
            f"{path}: backbone config gives embed_dim {dim}, geoloc.json says {meta['embed_dim']}"
        )
    model = GeoModel(backbone, dim, meta["num_classes"], cfg.model)
    try:
        model.load_state_dict(load_file(path / WEIGHTS), strict=True)
    except RuntimeError as err:  # key or shape mismatch: name the file
        raise RuntimeError(f"{path / WEIGHTS}: weights do not fit the saved config: {err}") from None
    return LoadedModel(
        model=model.to(device).eval(),
        cfg=cfg,
        encoder=LabelEncoder.from_dict(meta["label_encoder"]),
        preprocess=meta["preprocess"],
        centroids=np.asarray(meta["centroids"], dtype=np.float64),
        prior=meta["prior"],
        meta=meta,
    )
