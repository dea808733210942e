"""Exported model directory: round trip, offline reload without the source checkpoint, errors, atomicity."""

import json
import shutil

import numpy as np
import pytest
import torch

from geoloc import export
from geoloc.config import Config, ModelConfig
from geoloc.export import REQUIRED_FILES, load_model_dir, save_model_dir, vision_config_dict
from geoloc.labels import LabelEncoder
from geoloc.model import build_model

ENCODER = LabelEncoder.fit([3, 7, 12, 40], {3: "Alabama", 7: "Colorado", 12: "Florida", 40: "Texas"})
PREPROCESS = {"image_size": 56, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
CENTROIDS = np.array([[32.8, -86.8], [39.0, -105.5], [28.6, -82.4], [31.5, -99.3]])
PRIOR = {"top_states": [7, 3, 12, 40, -1], "mean_latlon": [33.0, -93.5]}


@pytest.fixture
def clip_copy(tiny_clip_dir, tmp_path):
    """A private copy of the checkpoint, so a test can delete it after export."""
    return shutil.copytree(tiny_clip_dir, tmp_path / "clip")


def _trained_like(clip_dir, fusion="average", pooling="projection"):
    """A model whose head weights differ from a fresh init (a round trip must carry them)."""
    cfg = Config(model=ModelConfig(backbone=str(clip_dir), fusion=fusion, pooling=pooling, head_hidden=16))
    torch.manual_seed(1)
    model = build_model(cfg.model, ENCODER.num_classes)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return cfg, model.eval()


def _save(path, cfg, model, **overrides):
    args = {
        "model_state_dict": model.state_dict(),
        "cfg": cfg,
        "vision_config": vision_config_dict(model),
        "embed_dim": model.embed_dim,
        "num_classes": model.num_classes,
        "encoder": ENCODER,
        "preprocess": PREPROCESS,
        "centroids": CENTROIDS,
        "prior": PRIOR,
    }
    return save_model_dir(path, **{**args, **overrides})


def _inputs():
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[True, True, True, True], [False, True, False, True]])
    return torch.randn(2, 4, 3, 56, 56, generator=g), mask


@pytest.mark.parametrize(("fusion", "pooling"), [("average", "projection"), ("attention", "mean")])
def test_round_trip_gives_identical_outputs_offline_without_source(
    clip_copy, tmp_path, monkeypatch, fusion, pooling
):
    cfg, model = _trained_like(clip_copy, fusion, pooling)
    out_dir = _save(tmp_path / "run" / "model", cfg, model, extra={"val_score": 0.5})
    shutil.rmtree(clip_copy)  # the original checkpoint is gone ...
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # ... and the hub is unreachable
    loaded = load_model_dir(out_dir)
    assert not loaded.model.training
    pixels, mask = _inputs()
    with torch.no_grad():
        a, b = model(pixels, mask), loaded.model(pixels, mask)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.gps, b.gps)
    assert loaded.encoder == ENCODER
    assert loaded.preprocess == PREPROCESS
    np.testing.assert_array_equal(loaded.centroids, CENTROIDS)
    assert loaded.prior == PRIOR
    assert loaded.cfg == cfg
    assert loaded.meta["extra"] == {"val_score": 0.5}
    assert loaded.meta["soft_labels"] == {"mode": cfg.loss.soft_labels, "tau_km": cfg.loss.tau_km}
    assert (loaded.meta["pooling"], loaded.meta["fusion"]) == (pooling, fusion)


def test_weights_saved_fp32_and_wrapper_prefixes_stripped(clip_copy, tmp_path):
    from safetensors import safe_open

    cfg, model = _trained_like(clip_copy)
    # what a DDP/DeepSpeed wrapper under bf16 would hand over
    wrapped = {
        f"module.{k}": (v.bfloat16() if v.is_floating_point() else v) for k, v in model.state_dict().items()
    }
    out_dir = _save(tmp_path / "model", cfg, model, model_state_dict=wrapped)
    with safe_open(out_dir / export.WEIGHTS, "pt") as f:
        keys = set(f.keys())
        dtypes = {f.get_tensor(k).dtype for k in keys}
    assert keys == set(model.state_dict())
    assert dtypes == {torch.float32}
    reloaded = load_model_dir(out_dir).model
    w = model.state_dict()["state_head.0.weight"]
    torch.testing.assert_close(reloaded.state_dict()["state_head.0.weight"], w.bfloat16().float())


@pytest.mark.parametrize("name", REQUIRED_FILES)
def test_missing_file_error_names_dir_and_file(clip_copy, tmp_path, name):
    cfg, model = _trained_like(clip_copy)
    out_dir = _save(tmp_path / "model", cfg, model)
    (out_dir / name).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'model'}.*{name}"):
        load_model_dir(out_dir)


def test_missing_dir_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        load_model_dir(tmp_path / "nope")


def test_weights_not_matching_config_name_the_file(clip_copy, tmp_path):
    cfg, model = _trained_like(clip_copy)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("gps_head")}
    out_dir = _save(tmp_path / "model", cfg, model, model_state_dict=state)
    with pytest.raises(RuntimeError, match="model.safetensors"):
        load_model_dir(out_dir)


def test_save_replaces_existing_dir(clip_copy, tmp_path):
    cfg, model = _trained_like(clip_copy)
    out_dir = _save(tmp_path / "model", cfg, model, extra={"epoch": 1})
    (out_dir / "stale.txt").write_text("from an older export")
    _save(out_dir, cfg, model, extra={"epoch": 2})
    assert not (out_dir / "stale.txt").exists()
    assert load_model_dir(out_dir).meta["extra"] == {"epoch": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip", "model"]  # no temp/old dirs left


def test_crash_mid_write_keeps_previous_dir(clip_copy, tmp_path, monkeypatch):
    cfg, model = _trained_like(clip_copy)
    out_dir = _save(tmp_path / "model", cfg, model, extra={"epoch": 1})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_config", crash)  # the last file of the write fails
    with pytest.raises(OSError, match="disk full"):
        _save(out_dir, cfg, model, extra={"epoch": 2})
    assert load_model_dir(out_dir).meta["extra"] == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip", "model"]


def test_inconsistent_inputs_rejected(clip_copy, tmp_path):
    cfg, model = _trained_like(clip_copy)
    with pytest.raises(ValueError, match="centroids"):
        _save(tmp_path / "a", cfg, model, centroids=CENTROIDS[:3])
    with pytest.raises(ValueError, match="image_size"):
        _save(tmp_path / "a", cfg, model, preprocess={"mean": [0.5] * 3, "std": [0.2] * 3})
    assert not (tmp_path / "a").exists()


def test_geoloc_json_is_plain_json(clip_copy, tmp_path):
    cfg, model = _trained_like(clip_copy)
    prior = {"top_states": np.array([7, 3]), "mean_latlon": torch.tensor([33.0, -93.5])}
    out_dir = _save(tmp_path / "model", cfg, model, prior=prior)
    meta = json.loads((out_dir / export.META).read_text())
    assert meta["prior"] == {"top_states": [7, 3], "mean_latlon": [33.0, -93.5]}
    assert meta["label_encoder"]["state_indices"] == [3, 7, 12, 40]
