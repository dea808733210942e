"""``config.json`` of an exported model directory: what transformers' ``from_pretrained`` / ``AutoModel``
dispatch on (:mod:`geoloc.hf_model`). Derived from ``geoloc.json``, ``backbone_config.json`` and
``config.yaml`` at export, which stay the source of truth; loading checks that it still agrees with them
and never runs code named in it (``auto_map``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from geoloc.config import config_to_dict
from geoloc.contract import VIEWS
from geoloc.export import (
    BACKBONE_CONFIG,
    HUB_CONFIG,
    META,
    MODEL_TYPE,
    RUN_CONFIG,
    LoadedModel,
    ModelDirError,
    json_default,
    read_backbone_config,
    read_json_mapping,
)

log = logging.getLogger(__name__)


def write_hub_files(tmp: Path, hub_config: dict) -> None:
    """``config.json`` (what transformers' ``from_pretrained`` dispatches on) and the model card."""
    from geoloc.model_card import write_model_card

    (tmp / HUB_CONFIG).write_text(json.dumps(hub_config, indent=2, default=json_default))
    write_model_card(tmp)


def hub_config_dict(meta: dict, vision_config: dict, model_section: dict) -> dict:
    """``config.json`` of a model directory: its ``model_type`` (for ``AutoConfig``) and what rebuilds the
    model's shapes without the directory (``GeolocModel(config)``). Everything here is derived from
    ``geoloc.json``, ``backbone_config.json`` and ``config.yaml``, which stay the source of truth: loading
    checks that it still agrees with them (:func:`check_hub_config`)."""
    enc = meta["label_encoder"]
    names = list(enc["state_names"])
    config = {
        "model_type": MODEL_TYPE,
        "architectures": ["GeolocModel"],
        "geoloc_format": meta["format_version"],
        "geoloc_meta": META,
        "clip_vision": vision_config,
        "pooling": meta["pooling"],
        "geoloc_model": model_section,
        "embed_dim": meta["embed_dim"],
        "num_classes": meta["num_classes"],
        "num_cells": meta["num_cells"],
        "num_views": len(meta.get("views", VIEWS)),
        "state_indices": list(enc["state_indices"]),
        "id2label": {str(c): name for c, name in enumerate(names)},
        "label2id": {name: c for c, name in enumerate(names)},
    }
    return json.loads(json.dumps(config, default=json_default))  # as read back from the file


def check_hub_config(path: str | Path, loaded: LoadedModel) -> dict:
    """``config.json`` of ``path`` as a dict, checked against the files ``loaded`` came from; a missing
    one is derived (a directory exported before hub support). Errors name the file and key."""
    path = Path(path)
    vision = read_backbone_config(path)
    want = hub_config_dict(loaded.meta, vision, config_to_dict(loaded.cfg)["model"])
    if not (path / HUB_CONFIG).is_file():
        log.warning("%s: no %s (exported before hub support): derived from %s", path, HUB_CONFIG, META)
        return want
    got = read_json_mapping(path / HUB_CONFIG, ("model_type",))
    if "auto_map" in got:
        raise ModelDirError(
            f"{path / HUB_CONFIG}: key 'auto_map' asks for code from the directory; geoloc never runs code "
            "from a model directory (this file was not written by geoloc)"
        )
    for key, value in want.items():
        if got.get(key) != value:
            raise ModelDirError(
                f"{path / HUB_CONFIG}: key {key!r} disagrees with {META} / {BACKBONE_CONFIG} / {RUN_CONFIG} "
                f"(modified since export?): {str(got.get(key))[:200]} vs {str(value)[:200]}"
            )
    return got
