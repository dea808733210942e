"""The model card (``README.md``) of an exported model directory, in the Hugging Face hub's format.

The card is a pure function of the directory's own files (``geoloc.json``, ``config.yaml``), so it always
describes the weights beside it: :func:`write_model_card` runs at every export
(``geoloc.export.save_model_dir``) and again after training (``geoloc.train.index``), once the retrieval
index and the val table of every decoder are in ``geoloc.json``. It gives the data (the shard manifest's
counts and hashes, recorded at export under ``extra.data``), the val metrics (the exported epoch's and the
best decoder's), the resolved config, the label mapping (original state index -> name), the intended use
and its limits, and the licence, which the backbone's weights decide (StreetCLIP: CC-BY-NC-4.0).

The YAML front matter carries what the hub reads: ``license``, ``library_name``, ``tags``, ``metrics``,
``base_model`` (when the backbone is a hub id) and a ``model-index`` with the val results.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

CARD = "README.md"
# substrings of model.backbone (a hub id or a local path, lower-cased) -> (hub licence id, what to say)
LICENCES = (
    (
        "streetclip",
        "cc-by-nc-4.0",
        "StreetCLIP's weights are licensed CC-BY-NC-4.0: **non-commercial use only**",
    ),
    ("openai/clip", "mit", "OpenAI CLIP's weights are licensed MIT"),
    ("facebook/dinov2", "apache-2.0", "Meta's DINOv2 weights are licensed Apache-2.0"),
    ("google/siglip", "apache-2.0", "Google's SigLIP weights are licensed Apache-2.0"),
)
UNKNOWN_LICENCE = (
    "unknown",
    "the backbone's licence is not known to geoloc: check the backbone's licence before any use",
)
# val metrics shown in the card, in order, with their labels
CARD_METRICS = (
    ("score", "competition score"),
    ("cls_score", "state part of the score"),
    ("gps_score", "GPS part of the score"),
    ("top1_acc", "top-1 state accuracy"),
    ("top5_acc", "top-5 state accuracy"),
    ("mean_km", "mean error (km)"),
    ("median_km", "median error (km)"),
    ("n", "val samples"),
)


def backbone_licence(backbone: str) -> tuple[str, str]:
    """``(hub licence id, sentence)`` for a backbone hub id or path; unknown ones say to check."""
    name = str(backbone).lower()
    for needle, licence, sentence in LICENCES:
        if needle in name:
            return licence, sentence
    return UNKNOWN_LICENCE


def data_summary(manifest: dict) -> dict:
    """What the card says about the data: split counts, skips and the source hashes of a shard manifest
    (no paths: the card may be published)."""
    dedup = manifest.get("near_duplicates") or {}
    return {
        "splits": {split: int(info["count"]) for split, info in manifest["splits"].items()},
        "skipped": len(manifest.get("skipped", [])),
        "missing_views": len(manifest.get("missing_views", [])),
        "csv_sha256": manifest.get("csv_sha256"),
        "source_sha256": manifest.get("source_sha256", {}),
        "seed": manifest.get("seed"),
        "val_fraction": manifest.get("val_fraction"),
        "near_duplicates": {k: dedup[k] for k in ("mode", "dropped") if k in dedup},
    }


def best_decoder_row(meta: dict) -> dict | None:
    """The row of ``decoders_val`` with the best val score (None before the table exists)."""
    table = meta.get("decoders_val") or []
    return max(table, key=lambda row: row["score"]) if table else None


def _hub_id(backbone: str) -> str | None:
    """``backbone`` when it looks like a hub id (``owner/name``, not a local path), else None."""
    parts = str(backbone).split("/")
    local = str(backbone).startswith((".", "/", "~")) or Path(backbone).exists()
    return backbone if len(parts) == 2 and all(parts) and not local else None


def _model_index(name: str, val: dict) -> list[dict]:
    metrics = [
        {"type": key, "name": f"val {label}", "value": round(float(val[key]), 6)}
        for key, label in CARD_METRICS
        if key in val and key != "n"
    ]
    task = {"type": "image-classification", "name": "US state and GPS point from four street views"}
    dataset = {"type": "geoloc-shards", "name": "the training run's val split", "split": "val"}
    return [{"name": name, "results": [{"task": task, "dataset": dataset, "metrics": metrics}]}]


def front_matter(meta: dict, run_cfg: dict) -> dict:
    """The card's YAML header: licence, library, tags, metrics, base model, val results."""
    backbone = run_cfg.get("model", {}).get("backbone", "")
    licence, _ = backbone_licence(backbone)
    header = {
        "license": licence,
        "library_name": "geoloc",
        "pipeline_tag": "image-classification",
        "tags": ["geoloc", "geolocation", "street-view", "clip", "pigeon", "us-states", *meta["heads"]],
        "metrics": ["accuracy"],
    }
    if _hub_id(backbone):
        header["base_model"] = backbone
    val = (meta.get("extra") or {}).get("val")
    if val:
        header["model-index"] = _model_index("geoloc " + "+".join(meta["heads"]), val)
    return header


def _table(rows: list[list], head: list[str]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _fmt(value) -> str:
    """4 decimals for scores and rates, 1 for km, none for whole numbers."""
    value = float(value)
    if value.is_integer():
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.4f}"


def metrics_section(meta: dict) -> str:
    """The exported epoch's val metrics and the decoder table's best row."""
    extra = meta.get("extra") or {}
    val = extra.get("val")
    if not val:
        return "No val metrics were recorded with this export."
    where = f"phase {extra.get('phase', '?')}, epoch {extra.get('epoch', '?')}"
    rows = [[label, _fmt(val[key])] for key, label in CARD_METRICS if key in val]
    text = f"The exported (best) epoch ({where}), decoded as during validation:\n\n"
    text += _table(rows, ["metric", "val"])
    best = best_decoder_row(meta)
    if best is not None:
        d = best["decoder"]
        text += (
            f"\n\nAfter training, every decoding the model can serve was scored on val "
            f"({len(meta['decoders_val'])} in `geoloc.json` under `decoders_val`); the best, "
            f"`{d['state']}+{d['gps']}` with knn_alpha {d['knn_alpha']}, is the default: val score "
            f"{_fmt(best['score'])}, top-1 {_fmt(best['top1_acc'])}, mean {_fmt(best['mean_km'])} km. "
            "The val split chose both the epoch and the decoder, so these numbers are slightly optimistic."
        )
    return text


def data_section(meta: dict) -> str:
    data = (meta.get("extra") or {}).get("data")
    if not data:
        return "The data were not recorded with this export."
    order = {"train": 0, "val": 1, "test": 2}
    splits = sorted(data["splits"].items(), key=lambda kv: (order.get(kv[0], 3), kv[0]))
    counts = ", ".join(f"{split} {n}" for split, n in splits)
    dedup = data.get("near_duplicates") or {}
    skips = f"skipped while sharding: {data['skipped']}; missing views: {data['missing_views']}"
    lines = [
        f"- Samples per split: {counts} ({skips}).",
        f"- Split seed {data['seed']}, val fraction {data['val_fraction']}.",
        f"- Labels CSV sha256: `{data['csv_sha256']}`.",
    ]
    lines += [f"- `{name}` sha256: `{digest}`." for name, digest in sorted(data["source_sha256"].items())]
    if dedup:
        lines.append(
            f"- Near-duplicate check: {dedup.get('mode')} (train samples dropped: {dedup.get('dropped', 0)})."
        )
    return "\n".join(lines)


def labels_section(meta: dict) -> str:
    enc = meta["label_encoder"]
    names = enc.get("state_names") or [str(i) for i in enc["state_indices"]]
    rows = [[cls, idx, name] for cls, (idx, name) in enumerate(zip(enc["state_indices"], names))]
    return (
        "The model's classes are contiguous; submissions and `infer.py` use the original state indices:\n\n"
        + _table(rows, ["class", "original state index", "state"])
    )


INTENDED_USE = """\
- **What it does**: given four street-level photos of one place in the United States, facing north, east,
  south and west, it ranks the US states the place is most likely in (top 5) and predicts its GPS point.
- **Intended use**: research and benchmarking of visual geolocation, and the competition it was trained
  for. Missing views are allowed (the model fuses the views it gets), but fewer views give worse answers.
- **Limits**: US only, and only the states listed below (a place elsewhere still gets a US state);
  trained on one data set's cameras, seasons and places, so other imagery may be much worse; the val
  metrics come from the same distribution as the training data.
- **Not for**: locating or tracking people, or any decision about a person."""


HOW_TO_LOAD = """\
```python
from geoloc.hub import GeolocModel  # also registers the class with AutoModel

model = GeolocModel.from_pretrained("path/or/hub-id")  # the weights' sha256 is verified
outputs = model(pixel_values, view_mask)  # (B, 4, 3, S, S) preprocessed views, (B, 4) bool
answer = model.decoder()(outputs)  # state_probs (B, C), gps (B, 2), with the default decoding
```

or `accelerate launch infer.py --model DIR ...`. Loading never runs code from the directory."""

FILES = (
    "`model.safetensors` (weights; its sha256 is `weights_sha256` in `geoloc.json`), `backbone_config.json`, "
    "`geoloc.json` (labels, cells, decoders, preprocessing, prior), `config.yaml`, `config.json` (for "
    "`from_pretrained`), `index/` (the retrieval index of the training embeddings, when built)."
)


def summary_section(meta: dict, backbone: str) -> str:
    heads, decoder = "+".join(meta["heads"]), meta.get("decoder", {})
    return (
        f"# geoloc model: `{backbone}` backbone, {heads} heads\n\n"
        f"A geoloc model (PIGEON-style): a vision backbone shared over four views, "
        f"{meta.get('fusion', '?')} fusion, heads {heads}. Default decoding: state "
        f"`{decoder.get('state', '?')}`, point `{decoder.get('gps', '?')}`."
    )


def licence_section(backbone: str) -> str:
    _, sentence = backbone_licence(backbone)
    return f"Backbone `{backbone}`: {sentence}. These weights are fine-tuned from it and carry its terms."


def model_card(meta: dict, run_config_text: str) -> str:
    """The whole ``README.md`` text of a model directory from its geoloc.json and config.yaml."""
    run_cfg = yaml.safe_load(run_config_text) or {}
    backbone = run_cfg.get("model", {}).get("backbone", "?")
    sections = [
        summary_section(meta, backbone),
        "## Intended use and limits\n\n" + INTENDED_USE,
        "## How to load\n\n" + HOW_TO_LOAD,
        "## Licence\n\n" + licence_section(backbone),
        "## Data\n\n" + data_section(meta),
        "## Val metrics\n\n" + metrics_section(meta),
        "## Label mapping\n\n" + labels_section(meta),
        "## Config\n\nThe resolved training config (`config.yaml`):\n\n```yaml\n"
        + run_config_text.strip()
        + "\n```",
        "## Files\n\n" + FILES,
    ]
    header = yaml.safe_dump(front_matter(meta, run_cfg), sort_keys=False, allow_unicode=True)
    return f"---\n{header}---\n\n" + "\n\n".join(sections) + "\n"


def write_model_card(model_dir: str | Path) -> Path:
    """(Re)write ``model_dir/README.md`` from the directory's geoloc.json and config.yaml."""
    from geoloc.export import META, RUN_CONFIG

    model_dir = Path(model_dir)
    meta = json.loads((model_dir / META).read_text(encoding="utf-8"))
    text = model_card(meta, (model_dir / RUN_CONFIG).read_text(encoding="utf-8"))
    tmp = model_dir / f".{CARD}.tmp"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(model_dir / CARD)
    return model_dir / CARD
