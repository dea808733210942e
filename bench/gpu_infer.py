"""Section 3 of ``bench/gpu_check.py``: inference end to end from shards, against its two ceilings.

Rows (images/s; 1 sample = 4 views):

  3a  CPU decode ceiling per core: ``geoloc.data.decode_sample`` on raw shard samples in this process
  3b  GPU compute ceiling: the per-batch path of ``geoloc.predict.predict`` (``forward_values`` of an
      ``Ensemble`` with its on-device preprocessing) on decoded batches already on the device
  3c  end to end: ``predict`` over ``make_eval_loader`` with N workers (every sample checked present),
      against 3b and against N x 3a
  3d  batched JPEG decoding on the GPU (torchvision ``decode_jpeg(list, device="cuda")``): its ceiling
  3e  a prototype loader whose workers only read the tars and ship JPEG bytes, decoded on the GPU in
      the main process, then the same ``predict``: does GPU decoding lift the end-to-end rate when
      few CPU cores feed the GPU? (Prototype: every view must be a readable 256 px JPEG.)

The shards hold generated views (colour areas plus texture), ~36 KiB a 256 px JPEG as street photos are
(typically 30-60 KiB; the demo's smooth views are 17 KiB and decode faster), in the contract's shard format.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from gpu_common import guarded
from gpu_measure import arch_for, autocast_bf16, build_on, device_for, sync
from PIL import Image
from train_step import ARCHS

from geoloc.contract import VIEWS

GPU_SIZES = {"samples": 2048, "per_shard": 64, "batch": 64, "workers": (2, 4, 8, 15), "gpu_workers": (2, 8)}
DRY_SIZES = {"samples": 24, "per_shard": 4, "batch": 4, "workers": (1, 2), "gpu_workers": (1,)}
POOL = 32  # distinct samples; the shards repeat them under new ids (decode cost is per byte, not per id)


# ----------------------------------------------------------------------------- data


def street_like_view(rng: np.random.Generator, size: int = 256) -> bytes:
    """A 256 px JPEG with large colour areas plus texture, about the size of a street photo's."""
    coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float32)
    texture = rng.normal(0.0, 24.0, (size, size, 3)).astype(np.float32)
    pixels = np.clip(base + texture, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_test_shards(folder: Path, n: int, per_shard: int, seed: int = 0) -> list[str]:
    """``folder/test-NNNNNN.tar`` in the shard contract (4 JPEG members + JSON per sample)."""
    rng = np.random.default_rng(seed)
    pool = [[street_like_view(rng) for _ in VIEWS] for _ in range(POOL)]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, n, per_shard):
        path = folder / f"test-{start // per_shard:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(start, min(start + per_shard, n)):
                key = f"s{i:07d}"
                meta = {"sample_id": key, "state_idx": None, "lat": None, "lon": None, "missing_views": []}
                members = [(f"{key}.{v}.jpg", data) for v, data in zip(VIEWS, pool[i % POOL])]
                for name, data in [*members, (f"{key}.json", json.dumps(meta).encode())]:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def mean_view_kib(urls: list[str]) -> float:
    with tarfile.open(urls[0]) as tar:
        sizes = [m.size for m in tar.getmembers() if m.name.endswith(".jpg")]
    return sum(sizes) / len(sizes) / 1024


# ----------------------------------------------------------------------------- ceilings


def raw_samples(urls: list[str]) -> list[dict]:
    import webdataset as wds

    return list(wds.tarfile_samples({"url": u} for u in urls))


def decode_rate(samples: list[dict], seconds: float) -> float:
    """Images/s of ``decode_sample`` in this one process (one core)."""
    from geoloc.data import decode_sample

    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for s in samples:
            decode_sample(s)
        done += len(samples)
    return len(VIEWS) * done / (time.perf_counter() - t0)


def make_ensemble(section, device):
    from geoloc.config import DecodeConfig
    from geoloc.decoders import Decoder
    from geoloc.infer.ensemble import Ensemble
    from geoloc.labels import LabelEncoder
    from geoloc.preprocess import Preprocessor

    arch = arch_for(section)
    model = build_on(arch, device).eval()
    encoder = LabelEncoder(tuple(range(model.num_classes)), tuple(map(str, range(model.num_classes))))
    decoder = Decoder(DecodeConfig(), ["state", "gps"], encoder, device=device)
    return Ensemble([model], [Preprocessor(ARCHS[arch]["image_size"]).to(device)], [decoder]).eval()


def compute_rate(ensemble, batches: list[dict], device, seconds: float) -> float:
    """Images/s of predict's per-batch work on decoded uint8 batches already on the device."""
    from geoloc.infer.ensemble import identity
    from geoloc.predict import forward_values

    on_device = [(b["images"].to(device), b["view_mask"].to(device)) for b in batches]

    @torch.no_grad()
    def once():
        with autocast_bf16(device):
            for images, mask in on_device:
                forward_values(ensemble, identity, images, mask, (1.0,))

    once()
    sync(device)
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or calls == 0:
        once()
        sync(device)
        calls += 1
    n = sum(b["images"].shape[0] for b in batches)
    return len(VIEWS) * n * calls / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------- end to end


def e2e_rate(ensemble, batches, accelerator, batch_size: int, expected: int) -> float:
    """Images/s of ``predict`` over ``batches`` (any iterable of batch dicts); checks every sample came."""
    from geoloc.infer.ensemble import identity
    from geoloc.predict import predict

    t0 = time.perf_counter()
    preds = predict(ensemble, batches, identity, accelerator, progress=False, batch_size=batch_size)
    seconds = time.perf_counter() - t0
    if len(preds) != expected:
        raise RuntimeError(f"end to end: {len(preds)} samples predicted, {expected} in the shards")
    return len(VIEWS) * expected / seconds


def shard_batches(urls, batch_size: int, workers: int):
    from geoloc.data import make_eval_loader

    return make_eval_loader(urls, batch_size=batch_size, num_workers=workers)


def raw_batch(src, batch_size: int):
    """Stage: raw samples -> ``{"jpegs": [4B bytes], "sample_id": [B]}`` (views in contract order)."""
    batch = []
    for sample in src:
        batch.append(sample)
        if len(batch) == batch_size:
            yield _raw(batch)
            batch = []
    if batch:
        yield _raw(batch)


def _raw(samples: list[dict]) -> dict:
    jpegs = [s[f"{v}.jpg"] for s in samples for v in VIEWS]  # KeyError: the prototype needs every view
    return {"jpegs": jpegs, "sample_id": [json.loads(s["json"])["sample_id"] for s in samples]}


def gpu_decoded_batches(urls, batch_size: int, workers: int, device):
    """The prototype: workers read tars only; JPEGs are decoded on ``device`` in one batched call."""
    import webdataset as wds
    from torch.utils.data import DataLoader
    from torchvision.io import decode_jpeg

    from geoloc.data import LoadStats, read_tars, shard_list, split_by_worker

    stages = [
        partial(shard_list, urls),
        split_by_worker,
        partial(read_tars, stats=LoadStats()),
        partial(raw_batch, batch_size=batch_size),
    ]
    loader = DataLoader(wds.DataPipeline(stages), batch_size=None, num_workers=min(workers, len(urls)))
    for raw in loader:
        data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in raw["jpegs"]]
        views = torch.stack(decode_jpeg(data, device=device))  # (4B, 3, 256, 256) uint8
        b = len(raw["sample_id"])
        yield {
            "images": views.view(b, len(VIEWS), *views.shape[1:]),
            "view_mask": torch.ones(b, len(VIEWS), dtype=torch.bool, device=device),
            "label": torch.full((b,), -1),
            "latlon": torch.full((b, 2), float("nan")),
            "sample_id": raw["sample_id"],
        }


def gpu_decode_rate(samples: list[dict], n_images: int, device, seconds: float) -> float:
    """Images/s of torchvision's batched ``decode_jpeg`` on ``device`` (bytes already in memory)."""
    from torchvision.io import decode_jpeg

    jpegs = [torch.frombuffer(bytearray(s[f"{v}.jpg"]), dtype=torch.uint8) for s in samples for v in VIEWS]
    jpegs = (jpegs * (n_images // len(jpegs) + 1))[:n_images]
    decode_jpeg(jpegs, device=device)
    sync(device)
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or calls == 0:
        decode_jpeg(jpegs, device=device)
        sync(device)
        calls += 1
    return n_images * calls / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------- the section


def gpu_decode_missing(device) -> str | None:
    """Why the GPU-decoding rows cannot run here, or None."""
    if device.type != "cuda":
        return "no CUDA device (decode_jpeg on the GPU)"
    try:
        import torchvision.io  # noqa: F401
    except ImportError:
        return "torchvision not installed"
    return None


def section_infer(section) -> None:
    from accelerate import Accelerator

    device = device_for(section)
    sizes = DRY_SIZES if section.dry else GPU_SIZES
    urls = write_test_shards(section.work_dir / "infer_shards", sizes["samples"], sizes["per_shard"])
    batch = sizes["batch"]
    kib = mean_view_kib(urls)
    samples = raw_samples(urls[:2])
    short = 0.3 if section.dry else 2.0
    decode = guarded(section, "3a", "CPU decode ceiling, 1 core", decode_rate, samples, short)
    if decode:
        section.row(
            "3a",
            "CPU decode ceiling (decode_sample, 1 core)",
            round(decode, 1),
            "images/s",
            note=f"{kib:.0f} KiB per 256 px JPEG view; {decode / 4:.0f} samples/s",
        )
    ensemble = make_ensemble(section, device)
    accelerator = Accelerator(cpu=device.type != "cuda")
    decoded = list(shard_batches(urls[:2], batch, 0))
    compute = guarded(section, "3b", "GPU compute ceiling", compute_rate, ensemble, decoded, device, short)
    if compute:
        section.row(
            "3b",
            f"compute ceiling: predict's per-batch path, {arch_for(section)}, batch {batch}",
            round(compute, 1),
            "images/s",
            note="decoded uint8 batches already on the device",
        )
    ceilings = {"decode": decode, "compute": compute}
    e2e_rows(section, ensemble, accelerator, urls, sizes, ceilings)
    gpu_rows(section, ensemble, accelerator, urls, sizes, samples, ceilings, device)


def _versus(rate: float, workers: int, ceilings: dict) -> str:
    parts = []
    if ceilings.get("compute"):
        parts.append(f"{rate / ceilings['compute']:.2f} of compute (3b)")
    if ceilings.get("decode"):
        parts.append(f"{rate / (workers * ceilings['decode']):.2f} of {workers} x decode (3a)")
    return "; ".join(parts)


def e2e_rows(section, ensemble, accelerator, urls, sizes, ceilings) -> None:
    n, batch = sizes["samples"], sizes["batch"]
    guarded(
        section,
        "3c",
        "warm-up",
        e2e_rate,
        ensemble,
        shard_batches(urls[:1], batch, 1),
        accelerator,
        batch,
        sizes["per_shard"],
    )
    for workers in sizes["workers"]:
        rid, what = f"3c-{workers}", f"end to end from shards, {workers} loader workers"
        if section.remaining() < (5 if section.dry else 20):
            section.skip(rid, what, "section budget spent", "images/s")
            continue
        rate = guarded(
            section, rid, what, e2e_rate, ensemble, shard_batches(urls, batch, workers), accelerator, batch, n
        )
        if rate:
            section.row(
                rid,
                what,
                round(rate, 1),
                "images/s",
                kind="e2e",
                workers=workers,
                versus=_versus(rate, workers, ceilings),
                note=f"{n} samples, batch {batch}",
            )


def gpu_rows(section, ensemble, accelerator, urls, sizes, samples, ceilings, device) -> None:
    missing = gpu_decode_missing(device)
    if missing:
        section.skip("3d", "GPU JPEG decode ceiling (torchvision decode_jpeg, batched)", missing, "images/s")
        for workers in sizes["gpu_workers"]:
            section.skip(f"3e-{workers}", f"end to end, GPU decoding, {workers} workers", missing, "images/s")
        return
    what = f"GPU JPEG decode ceiling (decode_jpeg, {4 * sizes['batch']} images a call)"
    rate = guarded(section, "3d", what, gpu_decode_rate, samples, 4 * sizes["batch"], device, 2.0)
    if rate:
        section.row("3d", what, round(rate, 1), "images/s", note="bytes in memory, output on the GPU")
    n, batch = sizes["samples"], sizes["batch"]
    for workers in sizes["gpu_workers"]:
        rid, what = f"3e-{workers}", f"end to end, JPEG bytes decoded on the GPU, {workers} workers"
        if section.remaining() < 20:
            section.skip(rid, what, "section budget spent", "images/s")
            continue
        rate = guarded(
            section,
            rid,
            what,
            e2e_rate,
            ensemble,
            gpu_decoded_batches(urls, batch, workers, device),
            accelerator,
            batch,
            n,
        )
        if rate:
            section.row(
                rid,
                what,
                round(rate, 1),
                "images/s",
                kind="e2e",
                workers=workers,
                versus=_versus(rate, workers, {"compute": ceilings["compute"]}),
                note="prototype loader (bench/gpu_infer.py), not yet a geoloc.data option",
            )
