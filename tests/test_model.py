"""GeoModel: shapes per pooling/fusion, view-mask semantics, GPS bounds, robust loading, trainer helpers."""

import json

import pytest
import torch

from geoloc.backbone import (
    backbone_blocks,
    backbone_from_config,
    enable_gradient_checkpointing,
    load_backbone,
    set_backbone_trainable,
)
from geoloc.config import FUSIONS, HEADS, ModelConfig
from geoloc.contract import US_BOX
from geoloc.heads import HEADS as HEAD_CLASSES
from geoloc.heads import HeadSizes, bound_latlon
from geoloc.model import FUSIONS as FUSION_CLASSES
from geoloc.model import GeoModel, param_groups
from geoloc.model import build_model as _build_model

B, V, C = 3, 4, 5
LAT_RANGE, LON_RANGE = US_BOX["lat"], US_BOX["lon"]


def build_model(cfg: ModelConfig, num_classes: int, num_cells: int = 0) -> GeoModel:
    return _build_model(cfg, HeadSizes(num_classes, num_cells))


def _cfg(tiny_clip_dir, **kw) -> ModelConfig:
    return ModelConfig(backbone=str(tiny_clip_dir), head_hidden=24, dropout=0.0, **kw)


def _inputs(image_size=56, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(B, V, 3, image_size, image_size, generator=g)  # (B, V, 3, H, W)
    mask = torch.tensor([[True, True, True, True], [True, False, True, False], [False, False, False, False]])
    return pixels, mask


@pytest.fixture(scope="module")
def tiny_config(tiny_clip_dir):
    return json.loads((tiny_clip_dir / "config.json").read_text())


@pytest.fixture(scope="module", params=["average", "concat", "attention", "weighted"])
def fused_model(request, tiny_clip_dir):
    torch.manual_seed(0)
    return build_model(_cfg(tiny_clip_dir, fusion=request.param), C).eval()


@pytest.mark.parametrize("pooling", ["projection", "cls", "mean"])
def test_embedding_dim_comes_from_checkpoint_config(tiny_clip_dir, tiny_config, pooling):
    backbone, dim = load_backbone(str(tiny_clip_dir), pooling)
    vision = tiny_config["vision_config"]
    expected = tiny_config["projection_dim"] if pooling == "projection" else vision["hidden_size"]
    assert dim == expected
    out = backbone(torch.randn(2, 3, vision["image_size"], vision["image_size"]))
    assert out.shape == (2, expected)


def test_projection_pooling_matches_clip_image_features(tiny_clip_dir):
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    backbone, _ = load_backbone(str(tiny_clip_dir), "projection")
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(backbone.eval()(x), clip.get_image_features(pixel_values=x).pooler_output)


def test_mean_pooling_is_mean_of_patch_tokens(tiny_clip_dir):
    backbone, _ = load_backbone(str(tiny_clip_dir), "mean")
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        tokens = backbone.model(pixel_values=x).last_hidden_state  # (N, 1 + patches, hidden)
        torch.testing.assert_close(backbone(x), tokens[:, 1:].mean(1))


def test_other_image_size_interpolates_position_embeddings(tiny_clip_dir):
    backbone, dim = load_backbone(str(tiny_clip_dir), "projection")
    assert backbone(torch.randn(1, 3, 70, 70)).shape == (1, dim)


def test_shapes_for_each_fusion(fused_model):
    pixels, mask = _inputs()
    with torch.no_grad():
        emb = fused_model.forward_features(pixels, mask)
        out = fused_model.forward_head(emb, mask)
    assert emb.shape == (B, V, fused_model.embed_dim)
    assert out["state"].shape == (B, C) and out["gps"].shape == (B, 2)
    assert out["embedding"].shape == (B, fused_model.fusion.out_dim)
    assert all(
        torch.isfinite(t).all() for t in (out["state"], out["gps"], out["embedding"])
    )  # incl. no-view row


def test_forward_equals_head_of_features(fused_model):
    pixels, mask = _inputs()
    with torch.no_grad():
        full = fused_model(pixels, mask)
        split = fused_model.forward_head(fused_model.forward_features(pixels, mask), mask)
    torch.testing.assert_close(full["state"], split["state"])
    torch.testing.assert_close(full["gps"], split["gps"])


def test_views_share_one_backbone_batch(tiny_clip_dir):
    model = build_model(_cfg(tiny_clip_dir), C).eval()
    seen = []
    model.backbone.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape))
    pixels, mask = _inputs()
    with torch.no_grad():
        model(pixels, mask)
    assert seen == [(B * V, 3, 56, 56)]


def test_masked_view_pixels_do_not_change_output(fused_model):
    pixels, mask = _inputs()
    changed = pixels.clone()
    changed[~mask] = torch.randn_like(changed[~mask]) * 10
    changed[2] = float("nan")  # even garbage in a sample with no view at all
    with torch.no_grad():
        a, b = fused_model(pixels, mask), fused_model(changed, mask)
    torch.testing.assert_close(a["state"], b["state"])
    torch.testing.assert_close(a["gps"], b["gps"])
    torch.testing.assert_close(a["embedding"], b["embedding"])


def test_present_view_pixels_do_change_output(fused_model):
    pixels, mask = _inputs()
    changed = pixels.clone()
    changed[1, 0] = torch.randn_like(changed[1, 0]) * 3  # view 0 of sample 1 is present
    with torch.no_grad():
        a, b = fused_model(pixels, mask), fused_model(changed, mask)
    assert not torch.allclose(a["embedding"][1], b["embedding"][1])


def test_average_fusion_is_mean_over_present_views(tiny_clip_dir):
    model = build_model(_cfg(tiny_clip_dir, fusion="average"), C).eval()
    pixels, mask = _inputs()
    with torch.no_grad():
        emb = model.forward_features(pixels, mask)
        out = model.forward_head(emb, mask)
        single = model.backbone(pixels[1, [0, 2]])  # sample 1 has views 0 and 2 only
    torch.testing.assert_close(out["embedding"][0], emb[0].mean(0))
    torch.testing.assert_close(out["embedding"][1], single.mean(0))
    assert torch.all(out["embedding"][2] == 0)  # no view: zero vector, finite heads


@pytest.mark.parametrize("fusion", ["attention", "weighted"])
def test_learned_fusions_start_as_average_and_can_move(tiny_clip_dir, fusion):
    torch.manual_seed(0)
    model = build_model(_cfg(tiny_clip_dir, fusion=fusion), C).eval()
    emb = torch.randn(B, V, model.embed_dim)
    _, mask = _inputs()
    m = mask.unsqueeze(-1).float()
    average = (emb * m).sum(1) / m.sum(1).clamp_min(1)
    torch.testing.assert_close(model.forward_head(emb, mask)["embedding"], average)
    with torch.no_grad():  # non-uniform weights must still ignore missing views
        for p in model.fusion.parameters():
            p.normal_()
        moved = model.forward_head(emb, mask)["embedding"]
        emb2 = emb.clone()
        emb2[~mask] = 100.0
        torch.testing.assert_close(model.forward_head(emb2, mask)["embedding"], moved)
    assert not torch.allclose(moved[0], average[0])


def test_concat_fusion_zeroes_missing_views_and_appends_mask(tiny_clip_dir):
    model = build_model(_cfg(tiny_clip_dir, fusion="concat"), C).eval()
    emb = torch.randn(B, V, model.embed_dim)
    _, mask = _inputs()
    fused = model.forward_head(emb, mask)["embedding"]  # (B, V*D + V)
    d = model.embed_dim
    expected = torch.cat([(emb * mask.unsqueeze(-1)).flatten(1), mask.float()], dim=1)
    assert fused.shape == (B, V * d + V)
    torch.testing.assert_close(fused, expected)


def test_gps_within_bounds_for_extreme_inputs(tiny_clip_dir):
    model = build_model(_cfg(tiny_clip_dir), C).eval()
    with torch.no_grad():
        for p in model.heads["gps"].net.parameters():
            p.mul_(1e4)  # saturate the tanh both ways
        emb = torch.randn(64, V, model.embed_dim) * 1e3
        gps = model.forward_head(emb, torch.ones(64, V, dtype=torch.bool))["gps"]
    lat, lon = gps[:, 0], gps[:, 1]
    assert torch.isfinite(gps).all()
    assert (lat >= LAT_RANGE[0]).all() and (lat <= LAT_RANGE[1]).all()
    assert (lon >= LON_RANGE[0]).all() and (lon <= LON_RANGE[1]).all()
    assert lat.max() - lat.min() > 10 and lon.max() - lon.min() > 10  # really saturating, not constant


def test_state_head_last_layer_starts_small(tiny_clip_dir):
    model = build_model(_cfg(tiny_clip_dir), C).eval()
    pixels, mask = _inputs()
    with torch.no_grad():
        logits = model(pixels, mask)["state"]
    assert logits.abs().max() < 0.1  # near-uniform class probabilities at initialisation


def _save_clip_with_top_level_projection_only(path):
    """A CLIPModel dir whose vision_config lacks projection_dim (saved with the 512 default)."""
    from transformers import CLIPConfig, CLIPModel

    common = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}
    text = {**common, "num_hidden_layers": 1, "vocab_size": 64}
    vision = {**common, "num_hidden_layers": 2, "image_size": 28, "patch_size": 14}  # no projection_dim
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=12)
    CLIPModel(config).save_pretrained(path)
    return CLIPModel.from_pretrained(path).eval()


def test_loads_clip_dir_whose_vision_config_lacks_projection_dim(tmp_path):
    clip = _save_clip_with_top_level_projection_only(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["vision_config"]
    assert saved.get("projection_dim", 512) != 12  # the trap is really there
    backbone, dim = load_backbone(str(tmp_path), "projection")
    assert dim == 12
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(backbone.eval()(x), clip.get_image_features(pixel_values=x).pooler_output)


@pytest.mark.parametrize("pooling", ["projection", "cls"])
def test_loads_vision_with_projection_dir(tiny_clip_dir, tmp_path, pooling):
    from transformers import CLIPVisionModelWithProjection

    src = CLIPVisionModelWithProjection.from_pretrained(tiny_clip_dir).eval()
    src.save_pretrained(tmp_path)
    backbone, _ = load_backbone(str(tmp_path), pooling)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        out = src(pixel_values=x)
        expected = (
            out.image_embeds if pooling == "projection" else src.vision_model(pixel_values=x).pooler_output
        )
        torch.testing.assert_close(backbone.eval()(x), expected)


def test_projection_pooling_without_projection_weights_is_an_error(tiny_clip_dir, tmp_path):
    from transformers import CLIPVisionModel

    CLIPVisionModel.from_pretrained(tiny_clip_dir).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="missing"):
        load_backbone(str(tmp_path), "projection")


def test_backbone_from_config_rebuilds_same_architecture(tiny_clip_dir):
    loaded, dim = load_backbone(str(tiny_clip_dir), "projection")
    rebuilt, dim2 = backbone_from_config(loaded.config.to_dict(), "projection")
    assert dim2 == dim
    rebuilt.load_state_dict(loaded.state_dict())  # strict: same keys and shapes
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), loaded.eval()(x))


def _count(model):
    return sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)


def test_set_backbone_trainable_counts(tiny_clip_dir):
    model = build_model(_cfg(tiny_clip_dir), C)
    total = sum(p.numel() for p in model.backbone.parameters())
    heads = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    blocks = backbone_blocks(model)
    assert len(blocks) == 2
    top = model.backbone.vision_model.post_layernorm, model.backbone.model.visual_projection
    top_count = sum(p.numel() for m in top for p in m.parameters())
    block_count = sum(p.numel() for p in blocks[-1].parameters())

    set_backbone_trainable(model, None)
    assert _count(model) == 0
    set_backbone_trainable(model, 0)
    assert _count(model) == total
    set_backbone_trainable(model, False)
    assert _count(model) == 0
    set_backbone_trainable(model, 1)
    assert _count(model) == block_count + top_count
    assert all(p.requires_grad for p in blocks[-1].parameters())
    assert not any(p.requires_grad for p in blocks[0].parameters())
    assert all(p.requires_grad for p in heads)  # heads are never frozen


@pytest.mark.parametrize("last_n", [3, 99, -1])
def test_unfreeze_last_n_beyond_the_blocks_names_the_key_value_and_block_count(tiny_clip_dir, last_n):
    """The tiny backbone has 2 blocks: 3 or 99 would otherwise quietly unfreeze the whole backbone."""
    model = build_model(_cfg(tiny_clip_dir), C)
    with pytest.raises(ValueError, match=rf"train\.unfreeze_last_n={last_n}: the backbone has 2 blocks"):
        set_backbone_trainable(model, last_n)
    set_backbone_trainable(model, 2)  # exactly the block count is fine
    assert all(p.requires_grad for b in backbone_blocks(model) for p in b.parameters())


def test_param_groups_layer_decay_and_weight_decay(tiny_clip_dir):
    model = build_model(_cfg(tiny_clip_dir, fusion="attention"), C)
    set_backbone_trainable(model, 0)
    groups = param_groups(model, head_lr=1e-3, backbone_lr=1e-5, weight_decay=0.05, layer_decay=0.5)
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert len(by_param) == sum(len(g["params"]) for g in groups)  # no param twice
    assert set(by_param) == {id(p) for p in model.parameters()}
    assert all("name" in g and g["initial_lr"] == g["lr"] for g in groups)

    blocks = backbone_blocks(model)
    vm = model.backbone.vision_model
    lr = lambda p: by_param[id(p)]["lr"]
    wd = lambda p: by_param[id(p)]["weight_decay"]
    assert lr(model.heads["state"].net[0].weight) == 1e-3 and lr(model.fusion.query) == 1e-3
    assert lr(vm.post_layernorm.weight) == pytest.approx(1e-5)
    assert lr(blocks[-1].mlp.fc1.weight) == pytest.approx(1e-5 * 0.5)
    assert lr(blocks[0].mlp.fc1.weight) == pytest.approx(1e-5 * 0.25)
    assert lr(vm.embeddings.patch_embedding.weight) == pytest.approx(1e-5 * 0.125)
    assert wd(blocks[0].mlp.fc1.weight) == 0.05 and wd(model.heads["state"].net[0].weight) == 0.05
    assert wd(blocks[0].mlp.fc1.bias) == 0 and wd(blocks[0].layer_norm1.weight) == 0
    assert wd(model.heads["state"].net[0].bias) == 0 and wd(model.norm.weight) == 0


def test_param_groups_only_trainable(tiny_clip_dir):
    model = build_model(_cfg(tiny_clip_dir), C)
    set_backbone_trainable(model, None)
    groups = param_groups(model, head_lr=1e-3, backbone_lr=1e-5, weight_decay=0.0, layer_decay=1.0)
    assert all(g["name"].startswith("head") for g in groups)
    n_head = sum(1 for n, _ in model.named_parameters() if not n.startswith("backbone."))
    assert sum(len(g["params"]) for g in groups) == n_head


def test_gradient_checkpointing_keeps_gradients(tiny_clip_dir):
    torch.manual_seed(0)
    plain = build_model(_cfg(tiny_clip_dir), C)
    ckpt = build_model(_cfg(tiny_clip_dir), C)
    ckpt.load_state_dict(plain.state_dict())
    enable_gradient_checkpointing(ckpt)
    hf = ckpt.backbone.model
    assert getattr(hf, "is_activation_checkpointing", None) or hf.is_gradient_checkpointing
    pixels, mask = _inputs()
    for m in (plain, ckpt):
        m.train()
        out = m(pixels, mask)
        (out["state"].sum() + out["gps"].sum()).backward()
    g1 = backbone_blocks(plain)[0].mlp.fc1.weight.grad
    g2 = backbone_blocks(ckpt)[0].mlp.fc1.weight.grad
    torch.testing.assert_close(g1, g2)


def test_gradient_checkpointing_with_the_last_block_unfrozen_gives_it_the_plain_gradients(tiny_clip_dir):
    """Non-reentrant checkpointing, whatever transformers' default: a reentrant checkpoint whose inputs
    come from frozen blocks returns outputs without grad, and the unfrozen blocks would learn nothing."""
    torch.manual_seed(0)
    plain = build_model(_cfg(tiny_clip_dir), C)
    ckpt = build_model(_cfg(tiny_clip_dir), C)
    ckpt.load_state_dict(plain.state_dict())
    enable_gradient_checkpointing(ckpt)
    for layer in backbone_blocks(ckpt):
        assert layer._gradient_checkpointing_func.keywords["use_reentrant"] is False
    pixels, mask = _inputs()
    for m in (plain, ckpt):
        set_backbone_trainable(m, 1)
        m.train()
        out = m(pixels, mask)
        (out["state"].sum() + out["gps"].sum()).backward()
    g1 = backbone_blocks(plain)[-1].mlp.fc1.weight.grad
    g2 = backbone_blocks(ckpt)[-1].mlp.fc1.weight.grad
    assert g2 is not None
    torch.testing.assert_close(g1, g2)


def test_gradient_flows_to_heads_when_backbone_frozen(tiny_clip_dir):
    model = build_model(_cfg(tiny_clip_dir), C).train()
    set_backbone_trainable(model, None)
    pixels, mask = _inputs()
    out = model(pixels, mask)
    out["state"].logsumexp(1).sum().backward()
    assert model.heads["state"].net[0].weight.grad is not None
    assert all(p.grad is None for p in model.backbone.parameters())


def test_geomodel_from_random_backbone(tiny_config):
    backbone, dim = backbone_from_config(tiny_config["vision_config"] | {"projection_dim": 16}, "cls")
    model = GeoModel(backbone, dim, ModelConfig(head_hidden=8), HeadSizes(C)).eval()
    pixels, mask = _inputs()
    assert model(pixels, mask)["state"].shape == (B, C)


def test_compile_option_compiles_backbone_in_place(tiny_clip_dir):
    model = build_model(_cfg(tiny_clip_dir, compile=True), C)
    assert model.backbone._compiled_call_impl is not None  # run lazily on first call (not here: slow on CPU)
    assert all(k.startswith("backbone.model.") for k in model.state_dict() if k.startswith("backbone"))


def test_model_outputs_convert_like_a_dict():
    from accelerate.utils import convert_to_fp32

    out = {"state": torch.zeros(2, C, dtype=torch.bfloat16), "gps": torch.zeros(2, 2, dtype=torch.bfloat16)}
    converted = convert_to_fp32(out)  # what accelerate applies to forward outputs under bf16
    assert converted.keys() == out.keys() and all(t.dtype == torch.float32 for t in converted.values())


def test_the_registries_implement_the_config_choices():
    assert set(HEAD_CLASSES) == set(HEADS) and set(FUSION_CLASSES) == set(FUSIONS)


def test_heads_by_name_and_their_outputs(tiny_clip_dir):
    model = build_model(_cfg(tiny_clip_dir, heads=["cell", "gps", "state"]), C, num_cells=7).eval()
    pixels, mask = _inputs()
    with torch.no_grad():
        out = model(pixels, mask)
    assert list(model.heads) == ["cell", "gps", "state"]
    assert out["cell"].shape == (B, 7) and out["state"].shape == (B, C) and out["gps"].shape == (B, 2)
    assert all(k.startswith(("backbone.", "fusion.", "norm.", "heads.")) for k in model.state_dict())
    with pytest.raises(ValueError, match="no geocells"):
        build_model(_cfg(tiny_clip_dir, heads=["cell"]), C)


def test_loading_a_full_clip_dir_does_not_print_the_text_tower_report(tiny_clip_dir, capsys, caplog):
    """StreetCLIP is a full CLIPModel dir: its ~200 text weights are expected leftovers, not a warning."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    load_backbone(str(tiny_clip_dir), "projection")
    out = capsys.readouterr()
    assert "UNEXPECTED" not in out.out + out.err + caplog.text
    assert hf_logging.get_verbosity() == before  # restored for the caller


def _spread_gps_head(model):
    """Trained-like GPS head: predictions spread over the box instead of sitting at its centre."""
    torch.manual_seed(1)
    with torch.no_grad():
        model.heads["gps"].net[-1].weight.normal_(std=0.5)
        model.heads["state"].net[-1].weight.normal_(std=0.5)
    return model


def _linear64(layer, x):
    return torch.nn.functional.linear(x.double(), layer.weight.double(), layer.bias.double())


def _last_layer_inputs(model, emb, mask):
    """forward_head under CPU bf16 autocast (CUDA autocast's dtypes) + the inputs of both last Linears."""
    seen = {}

    def keep(name):
        def hook(module, args, out):  # returns None: the output is left as it is
            seen[name] = args[0]

        return hook

    hooks = [model.heads["gps"].net[-1].register_forward_hook(keep("gps"))]
    hooks.append(model.heads["state"].net[-1].register_forward_hook(keep("state")))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.forward_head(emb, mask)
    for h in hooks:
        h.remove()
    return out, seen


def test_heads_output_fp32_under_bf16_autocast(tiny_clip_dir):
    """bf16 lat/lon moves in 0.25-1 degree steps (tens of km): the last Linears and the box run in fp32."""
    model = _spread_gps_head(build_model(_cfg(tiny_clip_dir), C).eval())
    emb, mask = torch.randn(64, V, model.embed_dim), torch.ones(64, V, dtype=torch.bool)
    out, seen = _last_layer_inputs(model, emb, mask)
    assert out["gps"].dtype == torch.float32 and out["state"].dtype == torch.float32
    # fp64 reference of the last stage from the (bf16-autocast) hidden activations the head really saw
    with torch.no_grad():
        want_gps = bound_latlon(_linear64(model.heads["gps"].net[-1], seen["gps"]))
        want_logits = _linear64(model.heads["state"].net[-1], seen["state"])
    assert want_gps[:, 1].max() - want_gps[:, 1].min() > 20  # really spread: bf16 steps there are 0.5 deg
    torch.testing.assert_close(out["gps"].double(), want_gps, rtol=0, atol=1e-4)
    torch.testing.assert_close(out["state"].double(), want_logits, rtol=0, atol=1e-5)


def test_gps_under_bf16_autocast_follows_the_fp32_forward(tiny_clip_dir):
    """Same fp32 view embeddings: the autocast head differs only by its bf16 hidden layers, not by rounding."""
    model = build_model(_cfg(tiny_clip_dir), C).eval()  # fresh head: predictions near the box centre
    emb, mask = torch.randn(64, V, model.embed_dim), torch.ones(64, V, dtype=torch.bool)
    with torch.no_grad():
        want = model.forward_head(emb, mask)["gps"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model.forward_head(emb, mask)["gps"]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3)


def test_heads_output_fp32_from_a_bf16_model(tiny_clip_dir):
    """DeepSpeed bf16 casts the weights themselves (no autocast): lat/lon and logits still come out fp32."""
    model = _spread_gps_head(build_model(_cfg(tiny_clip_dir), C).eval())
    emb, mask = torch.randn(64, V, model.embed_dim), torch.ones(64, V, dtype=torch.bool)
    with torch.no_grad():
        want = model.bfloat16().float().forward_head(emb, mask)  # bf16-rounded weights, fp32 throughout
        got = model.bfloat16().forward_head(emb.bfloat16(), mask)
    assert got["gps"].dtype == torch.float32 and got["state"].dtype == torch.float32
    off_grid = got["gps"] != got["gps"].bfloat16().float()  # bf16 lat/lon would all sit on the bf16 grid
    assert off_grid.float().mean() > 0.9
    torch.testing.assert_close(got["gps"], want["gps"], rtol=0, atol=0.5)  # bf16 hidden layers: ~0.15 deg


@pytest.mark.parametrize("last_n", [0, 1])
@pytest.mark.parametrize("pooling", ["projection", "cls", "mean"])
def test_every_trainable_backbone_parameter_gets_a_gradient(tiny_clip_dir, pooling, last_n):
    """DDP (find_unused_parameters=False) fails on a trainable parameter the pooling never uses."""
    model = build_model(_cfg(tiny_clip_dir, pooling=pooling), C).train()
    set_backbone_trainable(model, last_n)
    pixels, mask = _inputs()
    out = model(pixels, mask)
    (out["state"].sum() + out["gps"].sum()).backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("backbone.") for n in trainable)
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
