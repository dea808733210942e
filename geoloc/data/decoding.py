"""Decoding: image bytes -> uint8 views, raw WebDataset samples -> sample dicts -> batch dicts.

A missing or undecodable view never drops its sample: it becomes zeros with ``view_mask`` False, and is
logged and counted in :class:`~geoloc.data.stats.LoadStats`. Batches are collated in shared memory when
built in a DataLoader worker, so sending them to the main process costs no copy.

(Named ``decoding`` rather than ``decode`` so that the package's ``decode`` stage is not shadowed.)
"""

from __future__ import annotations

import io
import json
import logging
import math

import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info

from geoloc.contract import VIEWS
from geoloc.data.stats import LoadStats
from geoloc.labels import LabelEncoder

log = logging.getLogger(__package__)  # one logger name for the whole loader: "geoloc.data"

IMAGE_SIZE = 256  # side of the uint8 views in a batch; the Preprocessor resizes on the device


class ImageDecodeError(ValueError):
    """Image bytes that PIL cannot decode."""


# ----------------------------------------------------------------------------- images


def _decode_rgb(data: bytes, size: int, what: str = "image") -> np.ndarray:
    """Image bytes -> read-only uint8 ``(size, size, 3)`` RGB array (the channels-last layout PIL gives).

    Any failure becomes :class:`ImageDecodeError` naming ``what``: on bad bytes PIL's plugins raise
    OSError, ValueError, SyntaxError, but also struct.error, IndexError, EOFError, NotImplementedError...
    and one escaping here would kill a DataLoader worker.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img if img.mode == "RGB" else img.convert("RGB")  # L, CMYK, P, RGBA, ...
            if img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            return np.asarray(img)
    except Exception as err:  # noqa: BLE001 (see above; KeyboardInterrupt and SystemExit still pass)
        raise ImageDecodeError(
            f"cannot decode {what} ({len(data)} bytes): {_error_name(err)}: {err}"
        ) from None


def _error_name(err: Exception) -> str:
    """``ValueError``, ``struct.error``, ``PIL.UnidentifiedImageError``: the module unless a builtin."""
    kind = type(err)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"


def decode_image(data: bytes, size: int = IMAGE_SIZE, what: str = "image") -> torch.Tensor:
    """JPEG/PNG bytes (any mode: RGB, L, CMYK, ...) -> uint8 ``(3, size, size)``, resized if needed."""
    return torch.from_numpy(_decode_rgb(data, size, what).copy()).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


# ----------------------------------------------------------------------------- samples


def _label(meta: dict, encoder: LabelEncoder | None, name: str) -> int:
    if meta.get("state_idx") is None:
        return -1
    if encoder is None:
        raise ValueError(f"{name}: labelled sample but no label encoder given (use the manifest's)")
    try:
        return int(encoder.encode([meta["state_idx"]])[0])
    except KeyError as err:
        raise KeyError(f"{name}: {err.args[0]}") from None


def _latlon(meta: dict) -> torch.Tensor:
    lat, lon = meta.get("lat"), meta.get("lon")
    if lat is None or lon is None:
        return torch.full((2,), float("nan"))
    return torch.tensor([lat, lon], dtype=torch.float32)


def _decode_view(data: bytes | None, name: str, view: str, stats: LoadStats | None) -> np.ndarray | None:
    if data is None:
        log.info("%s: view %s missing", name, view)
        if stats is not None:
            stats.add("missing_views")
        return None
    try:
        return _decode_rgb(data, IMAGE_SIZE, f"{name} view {view}")
    except ImageDecodeError as err:
        log.warning("view masked out: %s", err)
        if stats is not None:
            stats.add("bad_views")
        return None


def decode_sample(sample: dict, encoder: LabelEncoder | None = None, stats: LoadStats | None = None) -> dict:
    """A raw WebDataset sample -> images ``(4, 3, 256, 256)`` uint8, view_mask ``(4,)``, label, ...

    A missing or undecodable view becomes zeros with ``view_mask`` False (logged, counted); the sample
    is always kept. ``label`` is the contiguous class of ``state_idx`` (-1 when null). ``images`` is a
    channels-last view (decoded pixels are copied once, in PIL's layout; the device makes it planar).
    """
    name = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    if "json" not in sample:
        raise ValueError(f"{name}: sample has no .json member")
    meta = json.loads(sample["json"])
    pixels = np.zeros((len(VIEWS), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)  # (4, H, W, 3)
    mask = [False] * len(VIEWS)
    for k, view in enumerate(VIEWS):
        rgb = _decode_view(sample.get(f"{view}.jpg"), name, view, stats)
        if rgb is not None:
            pixels[k], mask[k] = rgb, True
    if stats is not None:
        stats.add("samples")
    return {
        "images": torch.from_numpy(pixels).permute(0, 3, 1, 2),  # (4, 3, 256, 256), channels-last strides
        "view_mask": torch.tensor(mask),  # (4,)
        "label": _label(meta, encoder, name),
        "latlon": _latlon(meta),  # (2,) NaN when unlabelled
        "sample_id": str(meta.get("sample_id", sample.get("__key__"))),
    }


# ----------------------------------------------------------------------------- batches


def _batch_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Empty tensor; in a DataLoader worker it lives in shared memory, as torch's default_collate does.

    Sending a batch to the main process otherwise copies it into fresh shared memory: measured 3x
    slower per batch than decoding it on a 2-core VM (BENCHMARKS.md).
    """
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


def collate(samples: list[dict]) -> dict:
    """Per-sample dicts from :func:`decode_sample` -> a batch dict (ARCHITECTURE.md)."""
    # stacked channels-last: one plain copy per sample; a (B, 4, 3, H, W) view of (B, 4, H, W, 3) memory
    hwc = [s["images"].permute(0, 2, 3, 1) for s in samples]  # (4, H, W, 3) each
    images = torch.stack(hwc, out=_batch_buffer((len(hwc), *hwc[0].shape), torch.uint8))
    images = images.permute(0, 1, 4, 2, 3)
    return {
        "images": images,  # (B, 4, 3, 256, 256) uint8
        "view_mask": torch.stack([s["view_mask"] for s in samples]),  # (B, 4)
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),  # (B,)
        "latlon": torch.stack([s["latlon"] for s in samples]),  # (B, 2)
        "sample_id": [s["sample_id"] for s in samples],
    }
