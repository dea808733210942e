"""On-device preprocessing: uint8 views -> resized, normalised floats (+ optional augmentation).

The loader ships 256 px uint8 views; resizing to the backbone's input size (336 for StreetCLIP) and
normalising on the training device is ~7x cheaper in CPU per sample than doing it in the DataLoader
workers (see BENCHMARKS.md). Input size and mean/std come from the backbone's own config and
``preprocessor_config.json`` (per family, ``geoloc.families``), so any CLIP, DINOv2 or SigLIP checkpoint
gets the size and normalisation it was trained with. The whole square view is resized to that size: a
processor's centre crop (DINOv2's 224 of 256) would discard the border of every street view.

Augmentation (train mode only, when enabled): a square random resized crop per image, covering
``[min_scale, 1]`` of the area, plus optional brightness/contrast jitter. No horizontal flip: a mirror
image flips the driving side, which is a strong geolocation cue.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from geoloc.config import DataConfig
from geoloc.families import CLIP_MEAN, CLIP_STD


def _preprocessor_json(backbone: str) -> dict:
    """The backbone's ``preprocessor_config.json`` (local dir or hub cache), or {} when it has none."""
    local = Path(backbone)
    if local.is_dir():
        path = local / "preprocessor_config.json"
        return json.loads(path.read_text()) if path.is_file() else {}
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(backbone, "preprocessor_config.json")).read_text())
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return {}


def preprocess_settings(backbone: str) -> dict:
    """``{"image_size", "mean", "std"}`` of a checkpoint (path or hub id) of any family.

    CLIP: the config's ``image_size``; DINOv2 and SigLIP: the image processor's output size (DINOv2's
    config ``image_size`` of 518 only sizes its position table). Mean/std from ``preprocessor_config.json``,
    else the family's own.
    """
    from geoloc.backbone import checkpoint_family  # lazy: importing transformers costs seconds

    family, config = checkpoint_family(backbone)
    vision = getattr(config, "vision_config", config)  # full CLIPModel/SiglipModel vs. vision tower only
    processor = _preprocessor_json(str(backbone))
    try:
        size = family.image_size(vision, processor)
    except ValueError as err:
        raise ValueError(f"{backbone}/{err}") from None
    return {
        "image_size": int(size),
        "mean": tuple(float(m) for m in processor.get("image_mean", family.mean)),
        "std": tuple(float(s) for s in processor.get("image_std", family.std)),
    }


def crop_boxes(n: int, height: int, width: int, min_scale: float, generator=None) -> torch.Tensor:
    """``n`` random square boxes ``(top, left, side)`` covering ``[min_scale, 1]`` of the shorter side^2."""
    scale = min_scale + (1 - min_scale) * torch.rand(n, generator=generator)  # area fraction
    side = (scale.sqrt() * min(height, width)).round().clamp(min=1).long()
    top = (torch.rand(n, generator=generator) * (height - side + 1)).long()
    left = (torch.rand(n, generator=generator) * (width - side + 1)).long()
    return torch.stack([top, left, side], dim=1)  # (n, 3)


class Preprocessor(nn.Module):
    """``forward(images uint8 (B, V, 3, H, W)) -> (B, V, 3, S, S)`` normalised, in ``dtype``."""

    def __init__(
        self,
        image_size: int,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        augment: bool = False,
        min_scale: float = 0.8,
        jitter: float = 0.0,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if not 0 < min_scale <= 1:
            raise ValueError(f"min_scale={min_scale}: must be in (0, 1]")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter={jitter}: must be in [0, 1)")
        self.image_size = image_size
        self.augment, self.min_scale, self.jitter, self.dtype = augment, min_scale, jitter, dtype
        # (x / 255 - mean) / std folded into one multiply-add; (1, 3, 1, 1) to broadcast over (N, 3, S, S)
        std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("scale", 1 / (255 * std), persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)

    @classmethod
    def from_backbone(cls, backbone: str, data: DataConfig | None = None, **kw) -> Preprocessor:
        """Settings from the backbone's configs; augmentation from ``data`` (``augment``, ``aug_*``)."""
        if data is not None:
            kw = {"augment": data.augment, "min_scale": data.aug_min_scale, "jitter": data.aug_jitter, **kw}
        return cls(**preprocess_settings(backbone), **kw)

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) float -> (N, 3, S, S), bilinear with antialiasing (matters when shrinking)."""
        if x.shape[-2:] == (self.image_size, self.image_size):
            return x
        size = (self.image_size, self.image_size)
        return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)

    def random_resized_crop(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, 3, S, S): one random square crop per image, then resize."""
        boxes = crop_boxes(x.shape[0], x.shape[2], x.shape[3], self.min_scale).tolist()
        crops = [self.resize(img[None, :, t : t + s, l : l + s]) for img, (t, l, s) in zip(x, boxes)]
        return torch.cat(crops)

    def color_jitter(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image brightness and contrast factors in ``[1 - jitter, 1 + jitter]``, on 0..255 floats."""
        n = x.shape[0]
        contrast = 1 + self.jitter * (2 * torch.rand(n, 1, 1, 1, device=x.device) - 1)
        brightness = 1 + self.jitter * (2 * torch.rand(n, 1, 1, 1, device=x.device) - 1)
        grey = x.mean(dim=(1, 2, 3), keepdim=True)  # (N, 1, 1, 1)
        return ((x - grey) * contrast + grey).mul(brightness).clamp(0, 255)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"expected uint8 (B, V, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        b, v = images.shape[:2]
        x = images.flatten(0, 1).float()  # (B*V, 3, H, W), 0..255, any strides
        augment = self.training and self.augment
        x = self.random_resized_crop(x) if augment and self.min_scale < 1 else self.resize(x)
        if augment and self.jitter > 0:
            x = self.color_jitter(x)
        x = x * self.scale + self.shift  # (B*V, 3, S, S) normalised
        # loader batches are channels-last views; hand the model plain contiguous (B, V, 3, S, S)
        return x.to(self.dtype).contiguous().view(b, v, 3, self.image_size, self.image_size)


def crop_views(images: torch.Tensor, scale: float) -> torch.Tensor:
    """Centre crop keeping ``scale`` of each side: ``(B, V, 3, H, W) -> (B, V, 3, h, w)``, same dtype.

    ``scale == 1`` returns the input itself; the preprocessor then resizes any size to the backbone's.
    """
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"TTA scale {scale}: must be in (0, 1]")
    if scale == 1.0:
        return images
    h, w = images.shape[-2:]
    ch, cw = max(1, round(h * scale)), max(1, round(w * scale))
    top, left = (h - ch) // 2, (w - cw) // 2
    return images[..., top : top + ch, left : left + cw]
