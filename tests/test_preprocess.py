"""Tests for geoloc.preprocess: settings from backbone configs, resize, normalisation, augmentation."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from geoloc.config import ConfigError, DataConfig, load_config
from geoloc.preprocess import Preprocessor, crop_boxes, preprocess_settings
from geoloc.tiny_clip import CLIP_MEAN, CLIP_STD

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)


def ramp(b=2, v=4, size=64) -> torch.Tensor:
    """uint8 (B, V, 3, size, size) with structure (so resizing and cropping change values)."""
    x = torch.arange(b * v * 3 * size * size) % 251
    return x.view(b, v, 3, size, size).to(torch.uint8)


def test_shape_and_dtype():
    pre = Preprocessor(56, MEAN, STD)
    out = pre(ramp())
    assert out.shape == (2, 4, 3, 56, 56) and out.dtype == torch.float32
    out = Preprocessor(56, dtype=torch.bfloat16)(ramp())
    assert out.dtype == torch.bfloat16 and out.shape == (2, 4, 3, 56, 56)


def test_normalisation_of_a_constant_image():
    images = torch.full((1, 2, 3, 32, 32), 51, dtype=torch.uint8)  # 51 / 255 = 0.2
    out = Preprocessor(16, MEAN, STD)(images)
    expected = torch.tensor([(0.2 - m) / s for m, s in zip(MEAN, STD)])
    assert torch.allclose(out[0, 1, :, 5, 7], expected, atol=1e-5)
    assert torch.allclose(out.amax((3, 4)), out.amin((3, 4)))  # constant stays constant


def test_resize_equals_interpolate():
    images = ramp(size=64)
    out = Preprocessor(24, MEAN, STD)(images)
    ref = F.interpolate(images.flatten(0, 1).float() / 255, size=(24, 24), mode="bilinear", antialias=True)
    ref = (ref - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(out.flatten(0, 1), ref, atol=1e-5)


@pytest.mark.parametrize("size", [24, 64])
def test_channels_last_input_gives_the_same_contiguous_output(size):
    """Loader batches are (B, V, 3, H, W) views of (B, V, H, W, 3) memory."""
    images = ramp(size=64)
    channels_last = images.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    pre = Preprocessor(size, MEAN, STD)
    out = pre(channels_last)
    assert out.is_contiguous() and torch.allclose(out, pre(images), atol=1e-5)


def test_same_size_is_not_resampled():
    images = ramp(size=20)
    out = Preprocessor(20, (0, 0, 0), (1, 1, 1))(images)
    assert torch.allclose(out * 255, images.float(), atol=1e-3)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="expected uint8"):
        Preprocessor(16)(torch.zeros(2, 4, 3, 8, 8))


def test_augmentation_only_in_train_mode_when_enabled():
    images = ramp(size=64)
    plain = Preprocessor(32, MEAN, STD)(images)
    aug = Preprocessor(32, MEAN, STD, augment=True, min_scale=0.3, jitter=0.2)
    torch.manual_seed(0)
    first = aug.train()(images)
    second = aug(images)
    assert first.shape == plain.shape
    assert not torch.allclose(first, plain) and not torch.allclose(first, second)
    assert torch.allclose(aug.eval()(images), plain)  # eval: no augmentation
    off = Preprocessor(32, MEAN, STD, augment=False).train()
    assert torch.allclose(off(images), plain)  # train mode, augmentation off


def test_crop_keeps_orientation_no_flip():
    """A left-dark/right-bright image stays so after augmentation (a flip would mirror the road side)."""
    images = torch.zeros(1, 1, 3, 64, 64, dtype=torch.uint8)
    images[..., 32:] = 255
    aug = Preprocessor(32, (0, 0, 0), (1, 1, 1), augment=True, min_scale=0.5).train()
    for _ in range(10):
        out = aug(images)[0, 0, 0]
        assert out[:, :4].mean() <= out[:, -4:].mean()


def test_crop_boxes_within_bounds_and_scale():
    boxes = crop_boxes(500, 256, 256, min_scale=0.5, generator=torch.Generator().manual_seed(0))
    top, left, side = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + side <= 256).all() and (left + side <= 256).all()
    area = side.float() ** 2 / 256**2
    assert area.min() >= 0.49 and area.max() <= 1.0 and area.min() < 0.6 and area.max() > 0.9


def test_min_scale_validated():
    with pytest.raises(ValueError, match="min_scale"):
        Preprocessor(16, min_scale=0.0)


def test_settings_from_tiny_clip(tiny_clip_dir):
    settings = preprocess_settings(str(tiny_clip_dir))
    assert settings["image_size"] == 56
    assert settings["mean"] == pytest.approx(CLIP_MEAN) and settings["std"] == pytest.approx(CLIP_STD)


def test_settings_custom_mean_and_vision_only_dir_without_processor(tiny_clip_dir, tmp_path):
    full = tmp_path / "full"
    shutil.copytree(tiny_clip_dir, full)
    (full / "preprocessor_config.json").write_text(json.dumps({"image_mean": MEAN, "image_std": STD}))
    assert preprocess_settings(str(full))["mean"] == pytest.approx(MEAN)
    from transformers import CLIPVisionModel

    vision_dir = tmp_path / "vision"
    CLIPVisionModel.from_pretrained(tiny_clip_dir).save_pretrained(vision_dir)  # no preprocessor config
    settings = preprocess_settings(str(vision_dir))
    assert settings == {"image_size": 56, "mean": pytest.approx(CLIP_MEAN), "std": pytest.approx(CLIP_STD)}


def test_from_backbone_takes_augmentation_from_data_config(tiny_clip_dir):
    pre = Preprocessor.from_backbone(str(tiny_clip_dir), DataConfig(augment=True, aug_min_scale=0.6))
    assert (pre.image_size, pre.augment, pre.min_scale) == (56, True, 0.6)
    assert pre(ramp(size=32)).shape == (2, 4, 3, 56, 56)


def test_jitter_from_config_reaches_the_module(tiny_clip_dir):
    """``data.aug_jitter`` from a dotted override changes the train-mode output (min_scale=1: no crop)."""
    images = ramp(size=56)
    for jitter, changed in ((0.25, True), (0.0, False)):
        cfg = load_config(
            overrides=["data.augment=true", "data.aug_min_scale=1.0", f"data.aug_jitter={jitter}"]
        )
        pre = Preprocessor.from_backbone(str(tiny_clip_dir), cfg.data)
        assert pre.jitter == jitter
        assert (not torch.allclose(pre.train()(images), pre.eval()(images))) is changed


@pytest.mark.parametrize("override", ["data.aug_jitter=1.0", "data.aug_jitter=-0.1", "data.aug_min_scale=0"])
def test_augmentation_settings_validated_in_config(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(overrides=[override])
    with pytest.raises(ValueError, match="jitter"):
        Preprocessor(16, jitter=1.0)
