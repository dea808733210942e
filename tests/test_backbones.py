"""DINOv2 and SigLIP backbones (geoloc.families): pooling, refusals, input size and normalisation from the
saved processor config, what phase 2 unfreezes, layer decay, export + reload offline, the cache key."""

import json
import shutil

import numpy as np
import pytest
import torch

from geoloc.backbone import (
    backbone_blocks,
    backbone_depths,
    backbone_from_config,
    enable_gradient_checkpointing,
    load_backbone,
    set_backbone_trainable,
)
from geoloc.config import Config, ConfigError, ModelConfig
from geoloc.export import ModelDirError, load_model_dir, save_model_dir, vision_config_dict
from geoloc.families import IMAGENET_MEAN, IMAGENET_STD, processor_size
from geoloc.heads import HeadSizes
from geoloc.labels import LabelEncoder
from geoloc.model import build_model, param_groups
from geoloc.preprocess import preprocess_settings

B, V, C = 2, 4, 4
FAMILIES = ("dinov2", "siglip")
POOLINGS = {"dinov2": ("cls", "mean"), "siglip": ("projection", "mean")}
REFUSED = {"dinov2": "projection", "siglip": "cls"}
CASES = [(f, p) for f in FAMILIES for p in POOLINGS[f]]


@pytest.fixture
def dirs(tiny_dinov2_dir, tiny_siglip_dir, tiny_clip_dir):
    return {"dinov2": tiny_dinov2_dir, "siglip": tiny_siglip_dir, "clip": tiny_clip_dir}


def _model(path, pooling, **kw):
    cfg = ModelConfig(backbone=str(path), pooling=pooling, head_hidden=24, dropout=0.0, **kw)
    torch.manual_seed(0)
    return build_model(cfg, HeadSizes(C))


def _inputs(size=56):
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]])
    return torch.randn(B, V, 3, size, size, generator=g), mask


def _count(params) -> int:
    return sum(p.numel() for p in params)


# ----------------------------------------------------------------------------- pooling


@pytest.mark.parametrize(("family", "pooling"), CASES)
def test_embedding_dim_is_the_hidden_size_and_pooling_gives_one_vector_per_image(dirs, family, pooling):
    config = json.loads((dirs[family] / "config.json").read_text())
    hidden = config.get("vision_config", config)["hidden_size"]
    backbone, dim = load_backbone(str(dirs[family]), pooling)
    assert dim == hidden == 32
    for size in (56, 70):  # the processor's size, and another (TTA scales): position tables interpolate
        out = backbone.eval()(torch.randn(3, 3, size, size))
        assert out.shape == (3, dim) and torch.isfinite(out).all()


def test_dinov2_cls_and_mean_are_its_layer_normed_tokens(tiny_dinov2_dir):
    from transformers import Dinov2Model

    ref = Dinov2Model.from_pretrained(tiny_dinov2_dir).eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        tokens = ref(pixel_values=x).last_hidden_state  # (N, 1 + 16, D) after the final layernorm
        assert tokens.shape[1] == 1 + (56 // 14) ** 2
        torch.testing.assert_close(load_backbone(str(tiny_dinov2_dir), "cls")[0].eval()(x), tokens[:, 0])
        torch.testing.assert_close(
            load_backbone(str(tiny_dinov2_dir), "mean")[0].eval()(x), tokens[:, 1:].mean(1)
        )


def test_siglip_projection_is_its_image_embedding_and_mean_averages_every_token(tiny_siglip_dir):
    from transformers import SiglipModel

    full = SiglipModel.from_pretrained(tiny_siglip_dir).eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        features = full.get_image_features(pixel_values=x)
        features = getattr(features, "pooler_output", features)  # an output object in transformers 5
        torch.testing.assert_close(load_backbone(str(tiny_siglip_dir), "projection")[0].eval()(x), features)
        tokens = full.vision_model(pixel_values=x).last_hidden_state  # (N, 16, D): no CLS token
        assert tokens.shape[1] == (56 // 14) ** 2
        torch.testing.assert_close(load_backbone(str(tiny_siglip_dir), "mean")[0].eval()(x), tokens.mean(1))


def test_siglip_mean_pooling_builds_no_attention_pooling_head(tiny_siglip_dir):
    with_head, _ = load_backbone(str(tiny_siglip_dir), "projection")
    without, _ = load_backbone(str(tiny_siglip_dir), "mean")
    assert any(".head." in n for n in with_head.state_dict())
    assert not any(".head." in n for n in without.state_dict())
    assert vision_config_dict_of(without)["vision_use_head"] is False  # the export rebuilds it headless


def vision_config_dict_of(backbone) -> dict:
    return backbone.config.to_dict()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_pooling_the_family_lacks_is_refused_naming_the_key_and_family(dirs, family):
    pooling = REFUSED[family]
    name = {"dinov2": "DINOv2", "siglip": "SigLIP"}[family]
    with pytest.raises(
        ConfigError, match=rf"model\.pooling={pooling}: {name} backbone .*use model\.pooling="
    ):
        load_backbone(str(dirs[family]), pooling)
    config = load_backbone(str(dirs[family]), POOLINGS[family][0])[0].config.to_dict()
    with pytest.raises(ConfigError, match=rf"model\.pooling={pooling}: {name}"):
        backbone_from_config(config, pooling)


def test_siglip_tower_without_a_head_refuses_projection_and_serves_mean(tiny_siglip_dir, tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    vision = SiglipVisionConfig.from_pretrained(tiny_siglip_dir)  # the vision part of the full config
    vision.vision_use_head = False  # like the towers inside PaliGemma
    SiglipVisionModel(vision).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"model\.pooling=projection: .*no attention-pooling head"):
        load_backbone(str(tmp_path), "projection")
    backbone, dim = load_backbone(str(tmp_path), "mean")
    assert backbone(torch.randn(1, 3, 56, 56)).shape == (1, dim)


def test_an_unsupported_model_type_names_the_backbone_and_the_families(tmp_path):
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    for call in (lambda: load_backbone(str(tmp_path), "cls"), lambda: preprocess_settings(str(tmp_path))):
        with pytest.raises(
            ConfigError, match=rf"model\.backbone={tmp_path}: model_type 'vit' .*DINOv2.*SigLIP"
        ):
            call()


# ----------------------------------------------------------------------------- preprocessing


def test_dinov2_settings_are_its_processors_crop_and_imagenet_normalisation(tiny_dinov2_dir, tmp_path):
    config = json.loads((tiny_dinov2_dir / "config.json").read_text())
    assert config["image_size"] == 126  # the position table's size, as 518 is for the real ones
    settings = preprocess_settings(str(tiny_dinov2_dir))
    assert settings == {
        "image_size": 56,
        "mean": pytest.approx(IMAGENET_MEAN),
        "std": pytest.approx(IMAGENET_STD),
    }
    edited = shutil.copytree(tiny_dinov2_dir, tmp_path / "edited")
    processor = json.loads((edited / "preprocessor_config.json").read_text())
    processor.update(crop_size={"height": 42, "width": 42}, image_mean=[0.1, 0.2, 0.3])
    (edited / "preprocessor_config.json").write_text(json.dumps(processor))
    settings = preprocess_settings(str(edited))
    assert settings["image_size"] == 42 and settings["mean"] == pytest.approx((0.1, 0.2, 0.3))
    (edited / "preprocessor_config.json").unlink()  # none: the released processors' defaults
    assert preprocess_settings(str(edited))["image_size"] == 224


def test_siglip_settings_are_its_processors_size_and_half_normalisation(tiny_siglip_dir, tmp_path):
    assert preprocess_settings(str(tiny_siglip_dir)) == {
        "image_size": 56, "mean": pytest.approx((0.5,) * 3), "std": pytest.approx((0.5,) * 3)
    }  # fmt: skip
    edited = shutil.copytree(tiny_siglip_dir, tmp_path / "edited")
    processor = json.loads((edited / "preprocessor_config.json").read_text())
    (edited / "preprocessor_config.json").write_text(
        json.dumps({**processor, "size": {"height": 70, "width": 70}})
    )
    assert preprocess_settings(str(edited))["image_size"] == 70
    (edited / "preprocessor_config.json").write_text(
        json.dumps({**processor, "size": {"height": 70, "width": 56}})
    )
    with pytest.raises(ValueError, match=r"edited/preprocessor_config\.json: key 'size' is not a square"):
        preprocess_settings(str(edited))
    (edited / "preprocessor_config.json").unlink()  # none: the config's size and SigLIP's 0.5
    assert preprocess_settings(str(edited)) == {"image_size": 56, "mean": (0.5,) * 3, "std": (0.5,) * 3}


@pytest.mark.parametrize(
    ("processor", "size"),
    [
        (
            {
                "size": {"shortest_edge": 256},
                "crop_size": {"height": 224, "width": 224},
                "do_center_crop": True,
            },
            224,
        ),
        ({"size": {"shortest_edge": 256}, "crop_size": 224}, 224),  # older files: bare ints
        ({"size": {"shortest_edge": 256}, "crop_size": 224, "do_center_crop": False}, 256),
        ({"size": {"height": 384, "width": 384}}, 384),
        ({"size": 300}, 300),
        ({}, 99),
    ],
)
def test_processor_size_reads_every_form_of_size_and_crop(processor, size):
    assert processor_size(processor, default=99) == size


# ----------------------------------------------------------------------------- phase 2


@pytest.mark.parametrize(("family", "pooling"), CASES)
def test_unfreezing_the_last_block_adds_what_sits_above_it(dirs, family, pooling):
    model = _model(dirs[family], pooling)
    hf = model.backbone.model
    blocks = backbone_blocks(model)
    assert (
        len(blocks) == 2 and blocks[-1] is (hf.encoder.layer if family == "dinov2" else hf.encoder.layers)[-1]
    )
    top = (
        [hf.layernorm]
        if family == "dinov2"
        else [hf.post_layernorm] + ([hf.head] if pooling == "projection" else [])
    )
    set_backbone_trainable(model, 1)
    trainable = [p for p in model.backbone.parameters() if p.requires_grad]
    assert _count(trainable) == _count(blocks[-1].parameters()) + _count(
        p for m in top for p in m.parameters()
    )
    set_backbone_trainable(model, 0)
    frozen = [n for n, p in model.backbone.named_parameters() if not p.requires_grad]
    assert frozen == (
        ["model.embeddings.mask_token"] if family == "dinov2" else []
    )  # read only in pre-training


@pytest.mark.parametrize("last_n", [0, 1])
@pytest.mark.parametrize(("family", "pooling"), CASES)
def test_every_trainable_backbone_parameter_gets_a_gradient(dirs, family, pooling, last_n):
    """DDP (find_unused_parameters=False) fails on a trainable parameter the pooling never uses."""
    model = _model(dirs[family], pooling).train()
    set_backbone_trainable(model, last_n)
    out = model(*_inputs())
    (out["state"].sum() + out["gps"].sum()).backward()
    assert any(n.startswith("backbone.") for n, p in model.named_parameters() if p.requires_grad)
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_decay_counts_blocks_from_the_top_and_tokens_get_no_weight_decay(dirs, family):
    model = _model(dirs[family], POOLINGS[family][0])
    set_backbone_trainable(model, 0)
    depths = backbone_depths(model)
    top = "model.layernorm.weight" if family == "dinov2" else "model.head.probe"
    block = "model.encoder.layer" if family == "dinov2" else "model.encoder.layers"
    patch = "model.embeddings.patch_embeddings.projection.weight" if family == "dinov2" else (
        "model.embeddings.patch_embedding.weight")  # fmt: skip
    assert (depths[top], depths[f"{block}.1.mlp.fc1.weight"], depths[f"{block}.0.mlp.fc1.weight"]) == (
        0,
        1,
        2,
    )
    assert depths[patch] == 3
    groups = param_groups(model, head_lr=1e-3, backbone_lr=1e-5, weight_decay=0.05, layer_decay=0.5)
    by_id = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.backbone.named_parameters())
    assert by_id[id(named[top])]["lr"] == pytest.approx(1e-5)
    assert by_id[id(named[f"{block}.0.mlp.fc1.weight"])]["lr"] == pytest.approx(1e-5 * 0.25)
    assert by_id[id(named[patch])]["lr"] == pytest.approx(1e-5 * 0.125)
    assert by_id[id(named[f"{block}.0.mlp.fc1.weight"])]["weight_decay"] == 0.05
    tokens = ["model.embeddings.cls_token", "model.embeddings.position_embeddings"] if family == "dinov2" else [
        "model.head.probe", "model.embeddings.position_embedding.weight"]  # fmt: skip
    assert [by_id[id(named[n])]["weight_decay"] for n in tokens] == [0, 0]


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_keeps_the_gradients(dirs, family):
    plain = _model(dirs[family], "mean")
    ckpt = _model(dirs[family], "mean")
    ckpt.load_state_dict(plain.state_dict())
    enable_gradient_checkpointing(ckpt)
    for m in (plain, ckpt):
        set_backbone_trainable(m, 0)
        out = m.train()(*_inputs())
        (out["state"].sum() + out["gps"].sum()).backward()
    for a, b in zip(backbone_blocks(plain)[0].parameters(), backbone_blocks(ckpt)[0].parameters()):
        torch.testing.assert_close(a.grad, b.grad)


# ----------------------------------------------------------------------------- export and cache


ENCODER = LabelEncoder.fit([3, 7, 12, 40], {3: "Alabama", 7: "Colorado", 12: "Florida", 40: "Texas"})


def _export(path, source, pooling):
    cfg = Config(model=ModelConfig(backbone=str(source), pooling=pooling, fusion="attention", head_hidden=16))
    torch.manual_seed(0)
    model = build_model(cfg.model, HeadSizes(C)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # differ from a fresh init: the round trip must carry them
    save_model_dir(
        path, model_state_dict=model.state_dict(), cfg=cfg, vision_config=vision_config_dict(model),
        embed_dim=model.embed_dim, num_classes=model.num_classes, encoder=ENCODER,
        preprocess=preprocess_settings(str(source)), centroids=np.zeros((C, 2)), prior={"top_states": [3]},
    )  # fmt: skip
    return model


@pytest.mark.parametrize(("family", "pooling"), CASES)
def test_export_reloads_offline_without_the_checkpoint_and_gives_identical_outputs(
    dirs, family, pooling, tmp_path, monkeypatch
):
    source = shutil.copytree(dirs[family], tmp_path / "source")
    model = _export(tmp_path / "model", source, pooling)
    saved = json.loads((tmp_path / "model" / "backbone_config.json").read_text())
    assert saved["model_type"] == {"dinov2": "dinov2", "siglip": "siglip_vision_model"}[family]
    shutil.rmtree(source)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model_dir(tmp_path / "model")
    assert loaded.preprocess["image_size"] == 56 and loaded.meta["pooling"] == pooling
    pixels, mask = _inputs()
    with torch.no_grad():
        a, b = model(pixels, mask), loaded.model(pixels, mask)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("family", "edit", "match"),
    [
        ("dinov2", lambda c: c.pop("mlp_ratio"), r"backbone_config\.json: missing key.*mlp_ratio"),
        (
            "dinov2",
            lambda c: c.update(model_type="vit"),
            r"backbone_config\.json: model_type 'vit' is not a supported",
        ),
        (
            "dinov2",
            lambda c: c.update(hidden_size="wide"),
            r"backbone_config\.json: not a usable vision config",
        ),
        (
            "clip",
            lambda c: c.update(hidden_size="wide"),
            r"backbone_config\.json: not a usable vision config",
        ),
        (
            "siglip",
            lambda c: c.pop("intermediate_size"),
            r"backbone_config\.json: missing key.*intermediate_size",
        ),
    ],
)
def test_a_malformed_backbone_config_names_the_file_and_key(dirs, tmp_path, family, edit, match):
    _export(tmp_path / "model", dirs[family], POOLINGS.get(family, ("cls",))[0])
    path = tmp_path / "model" / "backbone_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match=match):
        load_model_dir(tmp_path / "model")


def test_the_cache_key_differs_per_backbone_and_pooling_and_is_stable(dirs):
    from geoloc.train.cache import cache_key

    def key(family, pooling):
        cfg = Config(model=ModelConfig(backbone=str(dirs[family]), pooling=pooling))
        return cache_key(cfg, preprocess_settings(str(dirs[family])), {"splits": {}}, torch.float32)

    cases = [("clip", p) for p in ("projection", "cls", "mean")] + CASES
    keys = [key(f, p) for f, p in cases]
    assert len(set(keys)) == len(cases)
    assert key("dinov2", "cls") == keys[cases.index(("dinov2", "cls"))]
