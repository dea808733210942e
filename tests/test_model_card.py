"""The model card (README.md) of an exported directory: the hub's YAML header, the licence the backbone
decides, data, val metrics, label mapping and config; written at every export."""

import json

import pytest
import yaml
from _infer_helpers import export_tiny_model

from geoloc.model_card import CARD, backbone_licence, data_summary, model_card

META = {
    "heads": ["state", "cell", "gps"],
    "fusion": "attention",
    "decoder": {"state": "cells", "gps": "bayes", "knn_alpha": 0.5},
    "label_encoder": {"state_indices": [3, 7, 40], "state_names": ["Arizona", "Colorado", "Texas"]},
    "extra": {
        "phase": "finetune",
        "epoch": 4,
        "val": {
            "score": 0.61234,
            "cls_score": 0.7,
            "gps_score": 0.5,
            "top1_acc": 0.55,
            "top5_acc": 0.9,
            "mean_km": 412.5,
            "median_km": 300.0,
            "n": 1600.0,
        },
        "data": data_summary(
            {
                "splits": {"train": {"count": 14000}, "val": {"count": 1600}, "test": {"count": 4000}},
                "skipped": [{"sample_id": "x"}] * 3,
                "missing_views": [],
                "csv_sha256": "c" * 64,
                "source_sha256": {"train.csv": "a" * 64},
                "seed": 0,
                "val_fraction": 0.1,
                "near_duplicates": {"mode": "drop", "dropped": 7, "pairs": []},
                "data_root": "/home/someone/private/data",
            }
        ),
    },
    "decoders_val": [
        {
            "decoder": {"state": "head", "gps": "regression", "knn_alpha": 0.0},
            "score": 0.6,
            "top1_acc": 0.5,
            "mean_km": 450.0,
        },
        {
            "decoder": {"state": "cells", "gps": "bayes", "knn_alpha": 0.5},
            "score": 0.65,
            "top1_acc": 0.56,
            "mean_km": 380.0,
        },
    ],
}
RUN_CONFIG = "model:\n  backbone: geolocal/StreetCLIP\n  fusion: attention\ntrain:\n  seed: 0\n"


def _split(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    header, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


@pytest.mark.parametrize(
    ("backbone", "licence"),
    [
        ("geolocal/StreetCLIP", "cc-by-nc-4.0"),
        ("/models/streetclip-copy", "cc-by-nc-4.0"),
        ("openai/clip-vit-large-patch14-336", "mit"),
        ("facebook/dinov2-large", "apache-2.0"),
        ("google/siglip-so400m-patch14-384", "apache-2.0"),
        ("someone/other-clip", "unknown"),
    ],
)
def test_the_backbone_decides_the_licence(backbone, licence):
    got, sentence = backbone_licence(backbone)
    assert got == licence
    if licence == "unknown":
        assert "check the backbone's licence" in sentence
    if licence == "cc-by-nc-4.0":
        assert "CC-BY-NC-4.0" in sentence and "non-commercial" in sentence


def test_header_has_what_the_hub_reads():
    header, _ = _split(model_card(META, RUN_CONFIG))
    assert header["license"] == "cc-by-nc-4.0" and header["library_name"] == "geoloc"
    assert header["base_model"] == "geolocal/StreetCLIP" and "metrics" in header
    assert {"geolocation", "cell"} <= set(header["tags"])
    (result,) = header["model-index"][0]["results"]
    values = {m["type"]: m["value"] for m in result["metrics"]}
    assert values["top1_acc"] == 0.55 and values["score"] == 0.61234 and "n" not in values


def test_body_gives_data_metrics_labels_config_and_intended_use():
    _, body = _split(model_card(META, RUN_CONFIG))
    assert "train 14000, val 1600, test 4000" in body and "c" * 64 in body and "a" * 64 in body
    assert "skipped while sharding: 3" in body and "drop (train samples dropped: 7)" in body
    assert "/home/someone" not in body  # no local paths of the data in a card that may be published
    assert "| top-1 state accuracy | 0.5500 |" in body and "| val samples | 1600 |" in body
    assert "phase finetune, epoch 4" in body
    assert "`cells+bayes` with knn_alpha 0.5" in body and "val score 0.6500" in body  # the table's best
    assert "| 2 | 40 | Texas |" in body
    assert RUN_CONFIG.strip() in body
    assert "US only" in body and "four street-level photos" in body
    assert "CC-BY-NC-4.0" in body


def test_a_bare_export_says_what_was_not_recorded():
    meta = {k: v for k, v in META.items() if k not in ("extra", "decoders_val")}
    header, body = _split(model_card(meta, "model:\n  backbone: /local/clip\n"))
    assert header["license"] == "unknown" and "base_model" not in header and "model-index" not in header
    assert "The data were not recorded" in body and "No val metrics were recorded" in body


def test_every_export_writes_the_card_of_its_own_files(tiny_clip_dir, tiny_data_root, tmp_path):
    model_dir = export_tiny_model(tiny_clip_dir, tiny_data_root, tmp_path / "model")
    card = (model_dir / CARD).read_text()
    meta = json.loads((model_dir / "geoloc.json").read_text())
    assert card == model_card(meta, (model_dir / "config.yaml").read_text())
    names = meta["label_encoder"]["state_names"]
    assert all(
        f"| {c} | {i} | {n} |" in card
        for c, (i, n) in enumerate(zip(meta["label_encoder"]["state_indices"], names))
    )
    assert not [p.name for p in model_dir.iterdir() if p.name.startswith(".")]  # no temporary file left
