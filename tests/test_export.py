"""Exported model directory: round trip, offline reload without the source checkpoint, errors, atomicity,
the weights' checksum and every malformed file named with its key."""

import hashlib
import json
import logging
import shutil

import numpy as np
import pytest
import torch

from geoloc import export
from geoloc.config import Config, ModelConfig
from geoloc.export import (
    REQUIRED_FILES,
    ModelDirError,
    load_model_dir,
    load_weights,
    save_model_dir,
    vision_config_dict,
)
from geoloc.heads import HeadSizes
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
    model = build_model(cfg.model, HeadSizes(ENCODER.num_classes))
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
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
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
    w = model.state_dict()["heads.state.net.0.weight"]
    torch.testing.assert_close(reloaded.state_dict()["heads.state.net.0.weight"], w.bfloat16().float())


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
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("heads.gps")}
    out_dir = _save(tmp_path / "model", cfg, model, model_state_dict=state)
    with pytest.raises(ModelDirError, match="model.safetensors.*do not fit"):
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


# ---------------------------------------------------------------- bad input: weights and metadata files


@pytest.fixture
def exported(clip_copy, tmp_path):
    """``(model dir, the model)`` of a fresh export."""
    cfg, model = _trained_like(clip_copy)
    return _save(tmp_path / "model", cfg, model), model


def _edit_meta(out_dir, edit):
    meta = json.loads((out_dir / export.META).read_text())
    edit(meta)
    (out_dir / export.META).write_text(json.dumps(meta))


def test_export_records_the_weights_sha256_and_both_loaders_accept_it(exported):
    out_dir, model = exported
    meta = json.loads((out_dir / export.META).read_text())
    assert meta["weights_sha256"] == hashlib.sha256((out_dir / export.WEIGHTS).read_bytes()).hexdigest()
    weights = load_weights(out_dir)
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def _flip_a_weight_byte(path):
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # inside the last tensor: the header stays valid, safetensors alone would not notice
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:1000])


def _empty(path):
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", [_flip_a_weight_byte, _truncate, _empty])
@pytest.mark.parametrize("loader", [load_model_dir, load_weights])
def test_modified_or_corrupted_weights_are_refused_naming_the_file(exported, damage, loader):
    out_dir, _ = exported
    damage(out_dir / export.WEIGHTS)
    with pytest.raises(ModelDirError, match=r"model\.safetensors: modified or corrupted") as err:
        loader(out_dir)
    assert str(out_dir) in str(err.value)


@pytest.mark.parametrize("damage", [_truncate, _empty, lambda p: p.write_bytes(b"\xff" * 64)])
def test_unreadable_weights_of_an_old_export_name_the_file(exported, damage, caplog):
    """Without a checksum (exported before it existed) a broken file is still named, not a bare SafetensorError."""
    out_dir, _ = exported
    _edit_meta(out_dir, lambda m: m.pop("weights_sha256"))
    damage(out_dir / export.WEIGHTS)
    for loader in (load_model_dir, load_weights):
        with pytest.raises(ModelDirError, match=r"model\.safetensors: not a readable safetensors file"):
            loader(out_dir)


def test_a_model_exported_before_checksums_loads_with_a_warning(exported, caplog):
    out_dir, model = exported
    _edit_meta(out_dir, lambda m: m.pop("weights_sha256"))
    with caplog.at_level(logging.WARNING, logger="geoloc.export"):
        loaded = load_model_dir(out_dir)
    assert "exported before checksums" in caplog.text and str(out_dir) in caplog.text
    w = model.state_dict()["heads.state.net.0.weight"]
    assert torch.equal(loaded.model.state_dict()["heads.state.net.0.weight"], w)


def _set(key, value):
    return lambda m: m.__setitem__(key, value)


def _drop(key):
    return lambda m: m.pop(key)


@pytest.mark.parametrize(
    "name, text, match",
    [
        (export.META, "{not json", r"geoloc\.json: not valid JSON"),
        (export.META, "[1, 2]", r"geoloc\.json: expected a JSON object.*list"),
        (export.META, b"\xff\xfe{}", r"geoloc\.json: not valid JSON"),
        (export.BACKBONE_CONFIG, "{", r"backbone_config\.json: not valid JSON"),
        (export.BACKBONE_CONFIG, '"a string"', r"backbone_config\.json: expected a JSON object.*str"),
        (
            export.BACKBONE_CONFIG,
            '{"hidden_size": 32}',
            r"backbone_config\.json: missing key.*num_hidden_layers",
        ),
        (export.RUN_CONFIG, "- a list\n", r"config\.yaml: the top level must be a mapping"),
        (export.RUN_CONFIG, "model: {fusion: [\n", r"config\.yaml: not valid YAML"),
        (
            export.RUN_CONFIG,
            "model:\n  dropout: 7\n",
            r"config\.yaml: model\.dropout=7\.0: must be in \[0, 1\)",
        ),
        (export.RUN_CONFIG, "model:\n  nope: 1\n", r"config\.yaml: model\.nope"),
    ],
)
def test_malformed_files_name_the_file_and_key(exported, name, text, match):
    out_dir, _ = exported
    data = text if isinstance(text, bytes) else text.encode()
    (out_dir / name).write_bytes(data)
    with pytest.raises(ModelDirError, match=match):
        load_model_dir(out_dir)


@pytest.mark.parametrize(
    "edit, match",
    [
        (_drop("num_classes"), r"missing key.*'num_classes'"),
        (_drop("prior"), r"missing key.*'prior'"),
        (_set("format_version", 99), "format_version 99"),
        (_set("preprocess", {"image_size": 56}), r"key 'preprocess' lacks \['mean', 'std'\]"),
        (_set("label_encoder", {"state_indices": [1]}), "key 'label_encoder' is unusable"),
        (
            _set("label_encoder", {"state_indices": [1], "state_names": ["x"]}),
            "key 'label_encoder' has 1 classes",
        ),
        (_set("centroids", [[1.0, 2.0]]), "key 'centroids' is not 4"),
        (_set("centroids", "here"), "key 'centroids' is not 4"),
        (_set("embed_dim", 5), "key 'embed_dim' says 5"),
    ],
)
def test_bad_geoloc_json_values_name_the_key(exported, edit, match):
    out_dir, _ = exported
    _edit_meta(out_dir, edit)
    with pytest.raises(ModelDirError, match=match) as err:
        load_model_dir(out_dir)
    assert "geoloc.json" in str(err.value)


def test_init_from_loads_verified_weights_or_stops_naming_the_file(exported, tmp_path):
    """``train.py --init-from`` goes through the same verified loader (geoloc.train.phases.initial_weights)."""
    from geoloc.train.context import RunOptions, TrainingError
    from geoloc.train.phases import initial_weights

    out_dir, model = exported

    def opts(path):
        return RunOptions(shards="s", output_dir=tmp_path / "run", init_from=path)

    assert initial_weights(opts(None)) is None
    assert torch.equal(
        initial_weights(opts(out_dir))["heads.gps.net.0.weight"], model.state_dict()["heads.gps.net.0.weight"]
    )
    _flip_a_weight_byte(out_dir / export.WEIGHTS)
    with pytest.raises(TrainingError, match=r"--init-from .*model\.safetensors: modified or corrupted"):
        initial_weights(opts(out_dir))
    with pytest.raises(TrainingError, match=r"--init-from .*missing .*model\.safetensors"):
        initial_weights(opts(tmp_path))


def test_a_model_of_format_1_is_refused_with_the_fix(clip_copy, tmp_path):
    cfg, model = _trained_like(clip_copy)
    out_dir = _save(tmp_path / "model", cfg, model)
    meta = json.loads((out_dir / "geoloc.json").read_text())
    (out_dir / "geoloc.json").write_text(json.dumps({**meta, "format_version": 1}))
    with pytest.raises(ModelDirError, match=r"format_version 1, expected 2 \(written before heads by name"):
        load_model_dir(out_dir)


def _with_index(out_dir):
    from geoloc.retrieval import EmbeddingIndex
    from geoloc.train.index import save_index

    index = EmbeddingIndex.build(torch.randn(6, 4), torch.arange(6) % 4, torch.rand(6, 2) * 10 + 30)
    decoder = {
        "state": "head",
        "gps": "knn",
        "bayes_top_k": 10,
        "knn_k": 3,
        "knn_temperature": 0.05,
        "knn_alpha": 0.5,
    }
    save_index(out_dir, index, decoder, [{"decoder": decoder, "score": 0.5}])
    return index


def test_the_retrieval_index_travels_with_the_model_and_is_verified(clip_copy, tmp_path):
    cfg, model = _trained_like(clip_copy)
    out_dir = _save(tmp_path / "model", cfg, model)
    index = _with_index(out_dir)
    loaded = load_model_dir(out_dir)
    assert torch.equal(loaded.index.embeddings, index.embeddings) and loaded.decode_config().gps == "knn"
    assert loaded.decoder().gps == "knn"  # the recorded default decoding, served by the index
    data = bytearray((out_dir / "index" / "index.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (out_dir / "index" / "index.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelDirError, match=r"index.safetensors: modified or corrupted"):
        load_model_dir(out_dir)


def test_geocells_in_geoloc_json_are_checked(clip_copy, tmp_path):
    cfg, model = _trained_like(clip_copy)
    out_dir = _save(tmp_path / "model", cfg, model)
    meta = json.loads((out_dir / "geoloc.json").read_text())
    (out_dir / "geoloc.json").write_text(json.dumps({**meta, "cells": {"version": 1, "state": [3]}}))
    with pytest.raises(ModelDirError, match=r"geoloc.json: key 'cells'"):
        load_model_dir(out_dir)
