"""Training-step throughput, model FLOPs utilisation, and the frozen phase with vs without the embedding cache.

    OMP_NUM_THREADS=2 python bench/train_step.py                                   # tiny CLIP, CPU, fp32
    python bench/train_step.py --arch vit-l-14-336 --batch-size 32 --epoch-samples 1024   # GPU, bf16

Random weights built from a CLIPVisionConfig (``geoloc.model.backbone_from_config``), random pixels already
on the device: this measures the model step only (the loader has its own bench, ``bench/loader.py``).
One run prints:

  (a) fine-tune step: forward + backward + AdamW over the whole backbone and the heads, 4 views a sample,
      in samples/s and images/s; on a GPU also the model FLOPs utilisation (MFU)
          FLOPs per image = 3 x (2 x N_tok x T  +  4 x L x T^2 x d  +  2 x N_img)
      3 = forward + backward (backward ~ 2x forward); T = (image/patch)^2 + 1 tokens; N_tok = weights
      applied to every token (L x (4d^2 + 2 d f) in the blocks, 3 p^2 d patch embedding on T - 1 tokens);
      4 L T^2 d = attention scores and weighted sum; N_img = weights applied once per image (projection,
      plus the heads' share). MFU = FLOPs/image x images/s / the GPU's peak dense bf16 FLOP/s
      (gradient-checkpointing recompute is not counted, as usual for MFU);
  (b) the frozen phase, per epoch of ``--epoch-samples`` samples, measured in the same run:
      without cache = backbone forward in no_grad + a head step, at ``--batch-size``;
      with cache = a head step on precomputed (N, 4, D) view embeddings, at ``--frozen-batch-size``;
      plus the one-off cost of building the cache (a no_grad backbone pass), and the ratio.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from geoloc.backbone import backbone_from_config, enable_gradient_checkpointing, set_backbone_trainable
from geoloc.config import ModelConfig
from geoloc.contract import VIEWS
from geoloc.geo import distance_matrix
from geoloc.heads import HeadSizes, Targets
from geoloc.losses import Criterion
from geoloc.model import GeoModel, head_parameters, param_groups
from geoloc.tiny_clip import STREETCLIP_VISION

# Vision configs (random weights). "tiny" is geoloc.tiny_clip.build_tiny_clip's default, the demo's backbone.
ARCHS = {
    "tiny": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 56,
        "patch_size": 14,
        "projection_dim": 16,
    },
    "vit-b-16": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 224,
        "patch_size": 16,
        "projection_dim": 512,
    },
    "vit-l-14-336": STREETCLIP_VISION,  # CLIP ViT-L/14 at 336 px: StreetCLIP's architecture
}

# Peak dense bf16 tensor FLOP/s (vendor datasheets, no sparsity); first substring match of the device name.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
)
NUM_VIEWS = len(VIEWS)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--arch", choices=sorted(ARCHS), default="tiny", help="backbone vision config (default tiny)"
    )
    p.add_argument("--pooling", default="projection", help="view embedding: projection | cls | mean")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default=None,
        help="autocast dtype (default: bf16 on cuda, fp32 on cpu); weights stay fp32, as with accelerate",
    )
    p.add_argument("--batch-size", type=int, default=32, help="samples per fine-tune step (x4 images)")
    p.add_argument("--steps", type=int, default=10, help="timed fine-tune steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, kernels, compile)")
    p.add_argument(
        "--repeats", type=int, default=3, help="timed rounds of each measurement; the best is kept"
    )
    p.add_argument("--epoch-samples", type=int, default=512, help="samples in one frozen-phase epoch")
    p.add_argument("--frozen-batch-size", type=int, default=256, help="batch size on cached embeddings")
    p.add_argument("--num-classes", type=int, default=50, help="state classes of the head")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute backbone activations")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak dense bf16 TFLOP/s for MFU (default: looked up from the GPU name)",
    )
    p.add_argument("--seed", type=int, default=0, help="weights and inputs")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- FLOPs


def per_token_weights(cfg: dict) -> int:
    """Weights a token meets in the ViT: L blocks of (q, k, v, out: 4 d^2) + (MLP: 2 d f)."""
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    return cfg["num_hidden_layers"] * (4 * d * d + 2 * d * f)


def train_flops_per_image(cfg: dict, per_image_weights: int) -> float:
    """Model FLOPs of forward + backward for one image (formula in the module docstring)."""
    d, p, layers = cfg["hidden_size"], cfg["patch_size"], cfg["num_hidden_layers"]
    tokens = (cfg["image_size"] // p) ** 2 + 1
    matmul = 2 * per_token_weights(cfg) * tokens + 2 * 3 * p * p * d * (tokens - 1)
    attention = 4 * layers * tokens**2 * d
    return 3.0 * (matmul + attention + 2 * per_image_weights)


def counted_block_weights(model: GeoModel) -> int:
    """The blocks' Linear weights, counted on the built model (checks the analytic count)."""
    layers = model.backbone.vision_model.encoder.layers
    return sum(m.weight.numel() for m in layers.modules() if isinstance(m, torch.nn.Linear))


def peak_tflops(device_name: str) -> float | None:
    return next((tf for key, tf in PEAK_BF16_TFLOPS if key in device_name), None)


# ----------------------------------------------------------------------------- model and steps


def build(arch: str, pooling: str, num_classes: int, device: torch.device) -> GeoModel:
    backbone, dim = backbone_from_config(ARCHS[arch], pooling)
    return GeoModel(backbone, dim, ModelConfig(pooling=pooling), HeadSizes(num_classes)).to(device)


def criterion(num_classes: int, device: torch.device) -> Criterion:
    """The default heads' loss terms with random state centroids over the US."""
    g = torch.Generator().manual_seed(0)
    centroids = torch.stack(
        [torch.rand(num_classes, generator=g) * 24 + 25, -torch.rand(num_classes, generator=g) * 57 - 67], 1
    )
    targets = Targets(
        centroids.to(device), distance_matrix(centroids).to(device), None, "sample", 75.0, "haversine"
    )
    return Criterion(["state", "gps"], {"state": 0.8, "gps": 0.2}, targets)


def fake_batch(n: int, cfg: dict, num_classes: int, device: torch.device) -> dict:
    """Preprocessed pixels (n, 4, 3, S, S), full view mask, labels and points inside the US box."""
    size = cfg["image_size"]
    return {
        "pixels": torch.randn(n, NUM_VIEWS, 3, size, size, device=device),
        "view_mask": torch.ones(n, NUM_VIEWS, dtype=torch.bool, device=device),
        "label": torch.randint(0, num_classes, (n,), device=device),
        "latlon": torch.stack([torch.empty(n).uniform_(25, 49), torch.empty(n).uniform_(-124, -67)], 1).to(
            device
        ),
    }


def head_step(model, opt, view_emb, mask, label, latlon, autocast) -> None:
    """One optimiser step of the heads on view embeddings (B, 4, D)."""
    with autocast:
        out = model.forward_head(view_emb, mask)
        loss = criterion(model.num_classes, view_emb.device)(out, {"label": label, "latlon": latlon})["loss"]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def finetune_step(model, opt, batch, autocast) -> None:
    """Forward + backward + AdamW through backbone and heads."""
    with autocast:
        out = model(batch["pixels"], batch["view_mask"])
        loss = criterion(model.num_classes, batch["pixels"].device)(out, batch)["loss"]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def timed(fn, repeats: int, device: torch.device) -> float:
    """Seconds for ``repeats`` calls of ``fn`` (device synchronised before and after)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return time.perf_counter() - start


def batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


# ----------------------------------------------------------------------------- the two measurements


def bench_finetune(model, args, device, autocast) -> dict:
    set_backbone_trainable(model, 0)
    model.train()
    opt = torch.optim.AdamW(param_groups(model, 1e-3, 1e-5, 0.01))
    batch = fake_batch(args.batch_size, ARCHS[args.arch], args.num_classes, device)
    timed(lambda: finetune_step(model, opt, batch, autocast), args.warmup, device)
    # best of --repeats rounds: robust to other load on a shared machine
    seconds = min(
        timed(lambda: finetune_step(model, opt, batch, autocast), args.steps, device)
        for _ in range(args.repeats)
    )
    samples_per_s = args.batch_size * args.steps / seconds
    return {
        "step_s": seconds / args.steps,
        "samples_per_s": samples_per_s,
        "images_per_s": NUM_VIEWS * samples_per_s,
    }


def bench_frozen(model, args, device, autocast) -> dict:
    """One frozen epoch without and with the cache, and the cache build, on the same model."""
    set_backbone_trainable(model, None)
    model.train()
    opt = torch.optim.AdamW(head_parameters(model), lr=1e-3)
    n, cfg = args.epoch_samples, ARCHS[args.arch]
    images = fake_batch(args.batch_size, cfg, args.num_classes, device)  # reused: pixels are not the point
    target = fake_batch(n, {**cfg, "image_size": 1}, args.num_classes, device)  # labels/points/mask of n
    cache = []

    def features(sl: slice) -> torch.Tensor:  # (b, 4, D), as the trainer's no_grad backbone pass
        b = sl.stop - sl.start
        with torch.no_grad(), autocast:
            return model.forward_features(images["pixels"][:b], images["view_mask"][:b]).float()

    def head_on(emb: torch.Tensor, sl: slice) -> None:
        head_step(
            model, opt, emb, target["view_mask"][sl], target["label"][sl], target["latlon"][sl], autocast
        )

    def uncached_epoch():
        for sl in batches(n, args.batch_size):
            head_on(features(sl), sl)

    def build_cache():
        cache[:] = [torch.cat([features(sl) for sl in batches(n, args.batch_size)])]  # (n, 4, D)

    def cached_epoch():
        for sl in batches(n, args.frozen_batch_size):
            head_on(cache[0][sl], sl)

    build_cache()  # warm-up of every path
    cached_epoch()
    head_on(features(slice(0, args.batch_size)), slice(0, args.batch_size))
    times = {"uncached_epoch_s": [], "cache_build_s": [], "cached_epoch_s": []}
    for _ in range(args.repeats):  # interleaved, best of: robust to other load on a shared machine
        for key, fn in zip(times, (uncached_epoch, build_cache, cached_epoch), strict=True):
            times[key].append(timed(fn, 1, device))
    return {**{k: min(v) for k, v in times.items()}, "cache_shape": tuple(cache[0].shape)}


# ----------------------------------------------------------------------------- report


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo on Linux, else what platform knows."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine(device: torch.device) -> str:
    cpu = f"{cpu_name()} ({os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads)"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    return f"{gpu}; {cpu}; torch {torch.__version__}; python {platform.python_version()}"


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    torch.manual_seed(args.seed)
    model = build(args.arch, args.pooling, args.num_classes, device)
    cfg = ARCHS[args.arch]
    if counted_block_weights(model) != per_token_weights(cfg):
        raise RuntimeError("analytic ViT weight count differs from the built model: fix per_token_weights")
    if args.grad_checkpointing:
        enable_gradient_checkpointing(model)
    if args.compile:
        model.backbone.compile()

    backbone_params = sum(p.numel() for p in model.backbone.parameters())
    head_params = sum(p.numel() for p in head_parameters(model))
    per_image = (
        cfg["hidden_size"] * cfg["projection_dim"] + head_params // NUM_VIEWS
    )  # heads run once a sample
    flops = train_flops_per_image(cfg, per_image)
    print(f"machine: {machine(device)}")
    print(
        f"arch {args.arch}: backbone {backbone_params / 1e6:.3g} M params, heads {head_params / 1e6:.2f} M, "
        f"{(cfg['image_size'] // cfg['patch_size']) ** 2 + 1} tokens/image, {flops / 1e9:.3g} GFLOP/image (train), "
        f"{precision}, batch {args.batch_size} x {NUM_VIEWS} views"
    )

    step = bench_finetune(model, args, device, autocast)
    print(
        f"(a) fine-tune step: {step['step_s'] * 1e3:.1f} ms  {step['samples_per_s']:.1f} samples/s  "
        f"{step['images_per_s']:.1f} images/s  {flops * step['images_per_s'] / 1e12:.3g} TFLOP/s achieved"
    )
    peak = args.peak_tflops or (
        peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    )
    if peak:
        print(
            f"    MFU {100 * flops * step['images_per_s'] / (peak * 1e12):.1f}% of {peak:.0f} TFLOP/s bf16 peak"
        )
    elif device.type == "cuda":
        print("    MFU: unknown GPU, pass --peak-tflops")

    frozen = bench_frozen(model, args, device, autocast)
    ratio = frozen["uncached_epoch_s"] / frozen["cached_epoch_s"]
    breakeven = frozen["cache_build_s"] / max(frozen["uncached_epoch_s"] - frozen["cached_epoch_s"], 1e-9)
    print(
        f"(b) frozen epoch of {args.epoch_samples} samples: without cache {frozen['uncached_epoch_s']:.3f} s "
        f"(batch {args.batch_size}), with cache {frozen['cached_epoch_s']:.4f} s (batch {args.frozen_batch_size}, "
        f"cache {frozen['cache_shape']}), ratio {ratio:.1f}x"
    )
    print(
        f"    building the cache: {frozen['cache_build_s']:.3f} s once; pays off after {math.ceil(breakeven)} "
        f"frozen epoch(s)"
    )


if __name__ == "__main__":
    main()
