"""Checks shared by the training tests: a run's exported directory is a hub model (config.json, a model card
describing the run, ``GeolocModel.from_pretrained`` giving ``load_model_dir``'s outputs bit for bit)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml


def check_hub_export(model_dir: Path) -> dict:
    """Returns the card's YAML header."""
    from geoloc.export import load_model_dir
    from geoloc.hf_model import GeolocModel

    loaded, hub = load_model_dir(model_dir), GeolocModel.from_pretrained(model_dir)
    size = loaded.preprocess["image_size"]
    g = torch.Generator().manual_seed(0)
    pixels, mask = (
        torch.randn(2, 4, 3, size, size, generator=g),
        torch.tensor([[1, 1, 1, 1], [0, 1, 0, 0]]).bool(),
    )
    with torch.no_grad():
        want, got = loaded.model(pixels, mask), hub(pixels, mask)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    decoded, want_decoded = hub.decoder()(got), loaded.decoder()(want)
    assert all(torch.equal(decoded[k], want_decoded[k]) for k in want_decoded)
    meta = json.loads((model_dir / "geoloc.json").read_text())
    card = (model_dir / "README.md").read_text()
    header = yaml.safe_load(card.split("\n---\n", 1)[0].removeprefix("---\n"))
    assert header["library_name"] == "geoloc" and header["license"] == "unknown"  # a local tiny CLIP
    values = {m["type"]: m["value"] for m in header["model-index"][0]["results"][0]["metrics"]}
    assert values["score"] == round(meta["extra"]["val"]["score"], 6)
    splits = meta["extra"]["data"]["splits"]
    assert f"train {splits['train']}, val {splits['val']}" in card
    if meta.get("decoders_val"):  # written again after the decoder table
        assert f"({len(meta['decoders_val'])} in `geoloc.json` under `decoders_val`)" in card
    return header
