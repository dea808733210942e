"""Real size on a CPU: StreetCLIP's architecture (ViT-L/14-336, random weights) through the three CLIs.

``bench/real_size.py`` runs shard_dataset.py -> train.py (one frozen epoch on the embedding cache, two
fine-tune updates at batch 1, activation checkpointing off) -> train.py --phase finetune (two updates,
checkpointing on) -> infer.py on 5 generated samples; these tests check what came out: shapes, the
336 px input path, the embedding cache, the export/reload round trip and the submission. Timings and
peak memory are the bench's to print, not asserted here.

Slow (about 8 minutes on 2 cores, ~11 GB of RAM at peak, ~12 GB of disk in the temp dir): marked
``slow``. The ViT-L checkpoint (1.2 GB) is built once and cached in ``~/.cache/geoloc/test-vitl``.
"""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import real_size

pytestmark = [pytest.mark.slow, pytest.mark.realsize]

VITL = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
}


@pytest.fixture(scope="module")
def streetclip_dir():
    return real_size.vitl_checkpoint()


@pytest.fixture(scope="module")
def pipeline(streetclip_dir, tmp_path_factory):
    result = real_size.pipeline(tmp_path_factory.mktemp("real_size"), streetclip_dir)
    for step in result["steps"].values():
        assert step.rc == 0, f"{step.name}: rc={step.rc}\n{step.log.read_text()[-4000:]}"
    assert list(result["steps"]) == ["shard", "train", "train-ckpt", "infer"]
    return result["paths"]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_cached_checkpoint_has_streetclips_vision_config(streetclip_dir):
    config = json.loads((streetclip_dir / "config.json").read_text())
    vision = config["vision_config"]
    assert {k: vision[k] for k in VITL} == VITL
    assert config["projection_dim"] == 768 and vision["hidden_act"] == "quick_gelu"
    pre = json.loads((streetclip_dir / "preprocessor_config.json").read_text())
    assert pre["crop_size"] == {"height": 336, "width": 336}


def test_shards_and_the_frozen_phases_embedding_cache(pipeline):
    from geoloc.train.cache import load_table

    manifest = json.loads((pipeline["shards"] / "manifest.json").read_text())
    assert {k: v["count"] for k, v in manifest["splits"].items()} == {"train": 2, "val": 1, "test": 2}
    tables = {p.stem: load_table(p) for p in pipeline["cache"].glob("*/*.pt")}
    assert sorted(tables) == ["train", "val"]
    assert tables["train"].emb.shape == (2, 4, 768) and tables["val"].emb.shape == (1, 4, 768)  # (N, V, D)
    assert torch.isfinite(tables["train"].emb).all() and tables["train"].view_mask.all()


def test_both_phases_trained_and_the_checkpointing_run_too(pipeline):
    from geoloc.config import read_config

    plain = [r for r in metrics(pipeline["run"]) if "train/loss" in r]
    assert [r["phase_index"] for r in plain] == [1, 2, 2]  # 1 cached update, 2 fine-tune updates at batch 1
    ckpt = [r for r in metrics(pipeline["run_ckpt"]) if "train/loss" in r]
    assert [r["phase_index"] for r in ckpt] == [2, 2]
    assert all(math.isfinite(r["train/loss"]) for r in plain + ckpt)
    assert read_config(pipeline["run_ckpt"] / "config.yaml").model.gradient_checkpointing
    assert not read_config(pipeline["run"] / "config.yaml").model.gradient_checkpointing
    for run in ("run", "run_ckpt"):  # keep_checkpoints=1: one 3.6 GB checkpoint left of each run
        assert len(list((pipeline[run] / "checkpoints").iterdir())) == 1


def test_export_reloads_with_the_336px_path_and_reproduces_the_val_score(pipeline):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from geoloc.data import make_eval_loader, resolve_shards
    from geoloc.export import load_model_dir
    from geoloc.metrics import Prior
    from geoloc.predict import evaluate, predict
    from geoloc.preprocess import Preprocessor

    loaded = load_model_dir(pipeline["run"] / "model")
    backbone = loaded.model.backbone
    assert {k: getattr(backbone.config, k) for k in VITL} == VITL
    assert loaded.preprocess["image_size"] == 336 and loaded.meta["embed_dim"] == 768
    embeddings = backbone.vision_model.embeddings.position_embedding.weight
    assert embeddings.shape == (577, 1024)  # (336 / 14)^2 patches + CLS: no interpolation at 336 px
    pre = Preprocessor(**loaded.preprocess)
    assert pre(torch.zeros(1, 4, 3, 256, 256, dtype=torch.uint8)).shape == (1, 4, 3, 336, 336)

    loader = make_eval_loader(
        resolve_shards(str(pipeline["shards"]), "val"), batch_size=4, encoder=loaded.encoder, num_workers=0
    )
    try:
        decoder = loaded.decoder(loaded.cfg.decode)  # the run's decoding, which validation used
        preds = predict(
            loaded.model, loader, pre, Accelerator(cpu=True), progress=False, batch_size=4, decoder=decoder
        )
    finally:
        AcceleratorState._reset_state(True)
    exported = json.loads((pipeline["run"] / "model" / "geoloc.json").read_text())["extra"]
    assert preds.probs.shape == (1, loaded.encoder.num_classes) and preds.gps.shape == (1, 2)
    got = evaluate(preds, loaded.encoder, Prior.from_dict(loaded.prior))["score"]
    assert got == pytest.approx(exported["val"]["score"], abs=1e-6)  # same code path, same batch shape


def test_infer_writes_a_valid_submission_for_every_test_sample(pipeline):
    import pandas as pd

    from geoloc.contract import SAMPLE_SUBMISSION, read_submission_template
    from geoloc.infer.submission import validate_submission

    template = read_submission_template(pipeline["root"] / SAMPLE_SUBMISSION)
    assert validate_submission(pipeline["submission"], template) == []
    sub = pd.read_csv(pipeline["submission"], dtype={"sample_id": str})
    assert sub["sample_id"].tolist() == template["sample_id"].tolist() and len(sub) == 2
