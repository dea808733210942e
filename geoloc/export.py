"""The exported model directory ``<run>/model/``: everything inference needs, nothing it must download.

Layout (see ARCHITECTURE.md)::

    model.safetensors     full GeoModel state dict, fp32, contiguous (ZeRO-3: the gathered one)
    backbone_config.json  the vision config (CLIP, DINOv2 or SigLIP), so the backbone is rebuilt without hub access
    geoloc.json           label encoder, preprocessing, soft-label settings, centroids, prior, dims
    config.yaml           the resolved run config
    config.json           derived from the above: transformers' ``from_pretrained`` / ``AutoModel`` (geoloc.hub)
    README.md             the model card (geoloc.model_card): data, val metrics, config, labels, licence

The directory is written under a temporary name and renamed into place, so a crash never leaves a
half-written model directory behind. Loading needs neither the hub, the original checkpoint nor DeepSpeed.

``geoloc.json`` records the sha256 of ``model.safetensors``; loading (:func:`load_model_dir`, and
:func:`load_weights` for ``train.py --init-from``) verifies it, so flipped or truncated weight bytes are an
error naming the file, never a silently different model. A directory exported before checksums existed
loads with a warning. Every unreadable file (bad JSON, not a mapping, a missing key, a bad
``config.yaml``, an unreadable safetensors file) is a :class:`ModelDirError` naming the file and key.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from geoloc.backbone import backbone_from_config
from geoloc.config import Config, ConfigError, config_to_dict, read_config, save_config
from geoloc.contract import VIEWS
from geoloc.errors import GeolocError
from geoloc.families import family_of
from geoloc.fileio import file_sha256
from geoloc.labels import LabelEncoder
from geoloc.model import GeoModel

FORMAT_VERSION = 2  # 2: heads by name, geocells, decoder, retrieval index (1: fixed state + gps heads)
INDEX_DIR = "index"  # the retrieval index of training embeddings (geoloc.retrieval), when built
WEIGHTS = "model.safetensors"
BACKBONE_CONFIG = "backbone_config.json"
META = "geoloc.json"
RUN_CONFIG = "config.yaml"
HUB_CONFIG = "config.json"  # for transformers' from_pretrained / AutoModel (geoloc.hub); checked on load
MODEL_TYPE = "geoloc"  # config.json's model_type, registered with AutoConfig by geoloc.hf_model
REQUIRED_FILES = (WEIGHTS, BACKBONE_CONFIG, META, RUN_CONFIG)
PREPROCESS_KEYS = ("image_size", "mean", "std")
WEIGHTS_SHA256 = "weights_sha256"  # geoloc.json key: sha256 of model.safetensors, checked on every load
META_KEYS = (
    "format_version",
    "pooling",
    "embed_dim",
    "num_classes",
    "label_encoder",
    "preprocess",
    "centroids",
    "prior",
)
# wrappers add these to state-dict keys (DDP / DeepSpeed engine, torch.compile of the whole model)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


log = logging.getLogger(__name__)


class ModelDirError(GeolocError, ValueError):
    """An exported model directory is unusable; the message names the file (and the key)."""


@dataclass
class LoadedModel:
    model: GeoModel  # in eval mode, on the requested device
    cfg: Config
    encoder: LabelEncoder
    preprocess: dict  # image_size, mean, std
    centroids: np.ndarray  # (C, 2) lat/lon degrees per contiguous class
    prior: dict
    meta: dict  # the whole geoloc.json
    cells: object = None  # geoloc.geocells.GeoCells, or None without a cell head
    index: object = None  # geoloc.retrieval.EmbeddingIndex of training embeddings, or None

    @property
    def heads(self) -> list[str]:
        return list(self.meta["heads"])

    def decode_config(self, **overrides):
        """The model's default decoding (the one that won on val, else the run's), with ``overrides``."""
        from dataclasses import replace

        from geoloc.config import DecodeConfig

        return replace(DecodeConfig(**self.meta.get("decoder", {})), **overrides)

    def decoder(self, spec=None, device="cpu", passthrough: tuple[str, ...] = ()):
        """A :class:`geoloc.decoders.Decoder` of this model (``spec``: a DecodeConfig, default its own);
        ``passthrough``: raw outputs it hands on beside its decoded values (e.g. ``("embedding",)``)."""
        from geoloc.decoders import Decoder

        spec = spec or self.decode_config()
        return Decoder(spec, self.heads, self.encoder, self.cells, self.index, device, passthrough)


def vision_config_dict(model: nn.Module) -> dict:
    """The backbone's vision config as a plain dict (what ``backbone_config.json`` holds)."""
    from geoloc.distributed import eval_module

    return eval_module(model).backbone.config.to_dict()


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


def json_default(obj):
    """``json.dumps`` default for numpy scalars and arrays."""
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


def _meta(cfg, embed_dim, num_classes, encoder, preprocess, centroids, prior, cells, extra) -> dict:
    from dataclasses import asdict

    return {
        "format_version": FORMAT_VERSION,
        "views": list(VIEWS),
        "pooling": cfg.model.pooling,
        "fusion": cfg.model.fusion,
        "heads": list(cfg.model.heads),
        "embed_dim": int(embed_dim),
        "num_classes": int(num_classes),
        "num_cells": 0 if cells is None else int(cells.num_cells),
        "label_encoder": encoder.to_dict(),
        "preprocess": {k: preprocess[k] for k in PREPROCESS_KEYS},
        "soft_labels": {"mode": cfg.loss.soft_labels, "tau_km": cfg.loss.tau_km},
        "centroids": centroids.tolist(),
        "cells": None if cells is None else cells.to_dict(),
        "decoder": asdict(cfg.decode),  # the run's; replaced by the one that wins on val (geoloc.train.index)
        "prior": prior,
        "extra": extra or {},
    }


def _write_files(tmp: Path, state: dict, cfg: Config, vision_config: dict, meta: dict) -> None:
    from safetensors.torch import save_file

    save_file(state, tmp / WEIGHTS, metadata={"format": "pt"})
    meta = {**meta, WEIGHTS_SHA256: file_sha256(tmp / WEIGHTS)}  # of the bytes on disk, verified on load
    (tmp / BACKBONE_CONFIG).write_text(json.dumps(vision_config, indent=2, default=json_default))
    (tmp / META).write_text(json.dumps(meta, indent=2, default=json_default))
    save_config(cfg, tmp / RUN_CONFIG)
    from geoloc.hub_config import hub_config_dict, write_hub_files  # (it imports this module)

    write_hub_files(tmp, hub_config_dict(meta, vision_config, config_to_dict(cfg)["model"]))


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
    cells=None,
    extra: dict | None = None,
) -> Path:
    """Write the model directory atomically (replacing an existing one); returns its path.

    ``cells``: the run's ``geoloc.geocells.GeoCells`` (saved in geoloc.json; needed with a cell head)."""
    path = Path(path)
    centroids = np.asarray(centroids, dtype=np.float64)
    _check_inputs(num_classes, encoder, preprocess, centroids)
    meta = _meta(cfg, embed_dim, num_classes, encoder, preprocess, centroids, prior, cells, extra)
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


def read_json_mapping(path: Path, required: tuple[str, ...]) -> dict:
    """A JSON object holding ``required`` keys; anything else is an error naming the file (and key)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelDirError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ModelDirError(f"{path}: expected a JSON object (a mapping), got {type(data).__name__}")
    missing = [k for k in required if k not in data]
    if missing:
        raise ModelDirError(f"{path}: missing key(s) {missing}")
    return data


def read_meta(path: Path) -> dict:
    """``geoloc.json`` of the model directory ``path``, its keys and format version checked."""
    meta = read_json_mapping(path / META, META_KEYS)
    if meta["format_version"] != FORMAT_VERSION:
        older = (
            " (written before heads by name: export it again with this version)"
            if meta["format_version"] == 1
            else ""
        )
        raise ModelDirError(
            f"{path / META}: format_version {meta['format_version']!r}, expected {FORMAT_VERSION}{older}"
        )
    missing = [k for k in ("heads", "num_cells", "cells", "decoder") if k not in meta]
    if missing:
        raise ModelDirError(f"{path / META}: missing key(s) {missing}")
    preprocess = meta["preprocess"]
    missing = [k for k in PREPROCESS_KEYS if not isinstance(preprocess, dict) or k not in preprocess]
    if missing:
        raise ModelDirError(f"{path / META}: key 'preprocess' lacks {missing}")
    return meta


def _verify_weights(path: Path, meta: dict) -> None:
    """The weights' sha256 against ``geoloc.json``; a directory exported before checksums only warns."""
    expected = meta.get(WEIGHTS_SHA256)
    if expected is None:
        log.warning(
            "%s: no %s in %s (exported before checksums): weights not verified", path, WEIGHTS_SHA256, META
        )
        return
    actual = file_sha256(path / WEIGHTS)
    if actual != expected:
        raise ModelDirError(
            f"{path / WEIGHTS}: modified or corrupted since export: its sha256 is {actual}, "
            f"{META} records {expected}"
        )


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """``model.safetensors`` as a state dict; a truncated or foreign file is an error naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path / WEIGHTS)
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelDirError(f"{path / WEIGHTS}: not a readable safetensors file ({err})") from None


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The verified weights of an exported model directory (``train.py --init-from`` starts from them)."""
    path = Path(path)
    _require_files(path)
    meta = read_meta(path)
    _verify_weights(path, meta)
    return _read_weights(path)


def _labels(path: Path, meta: dict) -> tuple[LabelEncoder, np.ndarray]:
    """The label encoder and the ``(C, 2)`` centroids, checked against ``num_classes``."""
    try:
        encoder = LabelEncoder.from_dict(meta["label_encoder"])
    except (KeyError, TypeError, ValueError) as err:
        raise ModelDirError(f"{path / META}: key 'label_encoder' is unusable ({err!r})") from None
    if encoder.num_classes != meta["num_classes"]:
        raise ModelDirError(
            f"{path / META}: key 'label_encoder' has {encoder.num_classes} classes, 'num_classes' says "
            f"{meta['num_classes']}"
        )
    try:
        centroids = np.asarray(meta["centroids"], dtype=np.float64)
    except (TypeError, ValueError):
        centroids = np.zeros(0)
    if centroids.shape != (encoder.num_classes, 2):
        raise ModelDirError(f"{path / META}: key 'centroids' is not {encoder.num_classes} (lat, lon) pairs")
    return encoder, centroids


def read_backbone_config(path: Path) -> dict:
    """``backbone_config.json``: a vision config of a known family (its ``model_type``; CLIP when it has
    none) holding the keys that fix that family's shapes."""
    vision = read_json_mapping(path / BACKBONE_CONFIG, ())
    try:
        family = family_of(vision.get("model_type", "clip_vision_model"), str(path / BACKBONE_CONFIG))
    except ConfigError as err:
        raise ModelDirError(f"{err} (key 'model_type')") from None
    return read_json_mapping(path / BACKBONE_CONFIG, family.required_keys)


def _build_model(path: Path, meta: dict, cfg: Config) -> GeoModel:
    """An untrained GeoModel shaped like the saved one, from ``backbone_config.json`` and the run config."""
    vision = read_backbone_config(path)
    try:
        backbone, dim = backbone_from_config(vision, meta["pooling"])
    except (TypeError, ValueError, KeyError) as err:
        raise ModelDirError(f"{path / BACKBONE_CONFIG}: not a usable vision config ({err})") from None
    if dim != meta["embed_dim"]:
        raise ModelDirError(
            f"{path}: {BACKBONE_CONFIG} gives embed_dim {dim}, {META} key 'embed_dim' says {meta['embed_dim']}"
        )
    from geoloc.heads import HeadSizes

    return GeoModel(backbone, dim, cfg.model, HeadSizes(meta["num_classes"], meta["num_cells"]))


def load_model_dir(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the exported model (eval mode) from ``path`` alone: no hub, no DeepSpeed.

    Raises ``FileNotFoundError`` for a missing file, :class:`ModelDirError` for an unusable one."""
    path = Path(path)
    _require_files(path)
    meta = read_meta(path)
    encoder, centroids = _labels(path, meta)
    try:
        cfg = read_config(path / RUN_CONFIG)
    except ConfigError as err:
        raise ModelDirError(str(err)) from None
    _verify_weights(path, meta)  # before building the model: a corrupt file fails in seconds
    model = _build_model(path, meta, cfg)
    try:
        model.load_state_dict(_read_weights(path), strict=True)
    except RuntimeError as err:  # key or shape mismatch: name the file
        raise ModelDirError(f"{path / WEIGHTS}: weights do not fit the saved config: {err}") from None
    return LoadedModel(
        model=model.to(device).eval(),
        cfg=cfg,
        encoder=encoder,
        preprocess=meta["preprocess"],
        centroids=centroids,
        prior=meta["prior"],
        meta=meta,
        cells=_cells(path, meta),
        index=_index(path, meta, device),
    )


def _cells(path: Path, meta: dict):
    """The geocells recorded in geoloc.json (None without them)."""
    if meta["cells"] is None:
        return None
    from geoloc.geocells import GeoCells

    try:
        cells = GeoCells.from_dict(meta["cells"])
    except ValueError as err:
        raise ModelDirError(f"{path / META}: key 'cells': {err}") from None
    if cells.num_cells != meta["num_cells"]:
        raise ModelDirError(
            f"{path / META}: key 'cells' has {cells.num_cells} cells, 'num_cells' says {meta['num_cells']}"
        )
    return cells


def _index(path: Path, meta: dict, device):
    """The retrieval index in ``path/index`` (None when the model has none), its checksum verified."""
    digest = meta.get("index_sha256")
    if digest is None:
        return None
    from geoloc.retrieval import EmbeddingIndex, IndexFileError

    folder = path / INDEX_DIR
    if not (folder / "index.safetensors").is_file():
        raise ModelDirError(f"{folder}: geoloc.json records a retrieval index, but it is missing")
    actual = file_sha256(folder / "index.safetensors")
    if actual != digest:
        raise ModelDirError(
            f"{folder / 'index.safetensors'}: modified or corrupted since export (sha256 {actual})"
        )
    try:
        return EmbeddingIndex.load(folder, device=device)
    except IndexFileError as err:
        raise ModelDirError(str(err)) from None
