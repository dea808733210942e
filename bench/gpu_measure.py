"""Sections 0, 1, 2 and 5 of ``bench/gpu_check.py``: the matmul ceiling, the fine-tune step (eager and
compiled) with its memory per sample, and the frozen phase's embedding pass.

The model is the trainer's GeoModel on StreetCLIP's vision config with random weights
(``bench/train_step.py``: ``ARCHS``, the FLOP count, the steps), built directly on the device.
"""

from __future__ import annotations

import gc
import math
import statistics
import time

import torch
from gpu_common import guarded
from train_step import ARCHS, NUM_VIEWS, build, fake_batch, finetune_step, peak_tflops, train_flops_per_image

from geoloc.backbone import enable_gradient_checkpointing, set_backbone_trainable
from geoloc.model import head_parameters, param_groups
from geoloc.preprocess import Preprocessor

GB = 1e9
CARDS_GB = {"A100 40GB": 40.0, "H100 80GB": 80.0}
HEADROOM = 0.1  # share of a card kept free when predicting the batch that fits
# samples per step tried when searching the largest batch that fits (ascending; the largest is a cap)
SEARCH = {False: (4, 8, 16, 24, 32, 40, 48, 56, 64), True: (8, 16, 32, 64, 96, 128)}
DRY_SEARCH = {False: (1, 2, 4), True: (1, 2, 4)}
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


# ----------------------------------------------------------------------------- common


def device_for(section) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def arch_for(section) -> str:
    return "tiny" if section.dry else "vit-l-14-336"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, calls: int, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / calls


def autocast_bf16(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build_on(arch: str, device: torch.device):
    """GeoModel with random weights (seeded), moved to ``device``."""
    torch.manual_seed(0)
    return build(arch, "projection", 50, device)


# ----------------------------------------------------------------------------- 0: matmul ceiling


def matmul_tflops(
    n: int, device: torch.device, dtype=torch.bfloat16, warmup: int = 3, runs: int = 10
) -> float:
    """Median TFLOP/s of ``runs`` n x n x n products on random data (zeros run faster than real data)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(warmup):
        a @ b
    times = [seconds_per_call(lambda: a @ b, 5, device) for _ in range(runs)]  # 5 back to back per sample
    return 2 * n**3 / statistics.median(times) / 1e12


def section_matmul(section) -> None:
    device = device_for(section)
    n = 1024 if section.dry else 8192
    what = f"bf16 matmul {n}^3 on {device.type} (ceiling)"
    tflops = matmul_tflops(n, device)
    datasheet = peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    note = "median of 10 x 5 products after 3 warm-ups, random data"
    if datasheet:
        note += f"; {tflops / datasheet:.0%} of the datasheet's {datasheet:.0f} TFLOP/s dense bf16"
    section.row("0", what, float(f"{tflops:.4g}"), "TFLOP/s", note=note)
    section.provide(ceiling_tflops=tflops, ceiling_device=device.type, datasheet_tflops=datasheet)


# ----------------------------------------------------------------------------- 1: fine-tune step


def train_setup(arch: str, device: torch.device, checkpointing: bool):
    model = build_on(arch, device)
    set_backbone_trainable(model, 0)  # phase 2: the whole backbone
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    opt = torch.optim.AdamW(param_groups(model, 1e-3, 1e-5, 0.01))
    return model, opt


def compile_model(model, scope: str, backend: str) -> None:
    """``blocks``: each encoder block (one graph reused 24 times); ``backbone``: as model.compile=true."""
    if scope == "backbone":
        model.backbone.compile(backend=backend)
        return
    for layer in model.backbone.vision_model.encoder.layers:
        layer.compile(backend=backend)


def attention_op(model, arch: str, device: torch.device) -> str:
    """The aten attention op the model's SDPA calls dispatch to (one profiled forward of one sample)."""
    from torch.profiler import ProfilerActivity, profile

    batch = fake_batch(1, ARCHS[arch], 50, device)
    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad(), autocast_bf16(device):
        model(batch["pixels"], batch["view_mask"])
    names = {e.key for e in prof.key_averages()}
    hits = sorted(n for n in names if "attention" in n and n.startswith("aten::_"))
    return ", ".join(hits) or "no fused attention op (math path)"


def try_batch(model, opt, arch: str, n: int, device: torch.device) -> int | None:
    """Peak allocated bytes of two steps at ``n`` samples, or None when it does not fit."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batch = None
    try:
        batch = fake_batch(n, ARCHS[arch], 50, device)
        for _ in range(2):
            finetune_step(model, opt, batch, autocast_bf16(device))
        sync(device)
    except OOM:
        opt.zero_grad(set_to_none=True)
        del batch
        free(device)
        return None
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def search_batch(model, opt, arch, device, sizes, deadline: float) -> list[tuple[int, int]]:
    """``[(samples, peak bytes)]`` of every size tried that fit, ascending, until one does not fit."""
    fits = []
    for n in sizes:
        if time.monotonic() > deadline:
            break
        peak = try_batch(model, opt, arch, n, device)
        if peak is None:
            break
        fits.append((n, peak))
    return fits


def linear_fit(points: list[tuple[int, int]]) -> tuple[float, float] | None:
    """Least-squares (slope, intercept) of peak bytes over samples; None with fewer than 2 sizes."""
    if len(points) < 2:
        return None
    xs, ys = zip(*points)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def predicted_batches(slope: float, intercept: float) -> str:
    """What the measured line says fits each card with ``HEADROOM`` kept free."""
    fits = {card: int((gb * GB * (1 - HEADROOM) - intercept) // slope) for card, gb in CARDS_GB.items()}
    return ", ".join(f"{card}: {n} samples" for card, n in fits.items())


def time_steps(model, opt, arch, n, device, seconds: float) -> float:
    """Seconds per fine-tune step at ``n`` samples, over enough steps for about ``seconds``."""
    batch = fake_batch(n, ARCHS[arch], 50, device)
    step = seconds_per_call(lambda: finetune_step(model, opt, batch, autocast_bf16(device)), 1, device)
    calls = max(2, min(50, math.ceil(seconds / max(step, 1e-6))))
    return seconds_per_call(lambda: finetune_step(model, opt, batch, autocast_bf16(device)), calls, device)


def timed_largest(model, opt, arch, sizes: list[int], device, seconds: float) -> tuple[int, float]:
    """(samples, seconds per step) at the largest size that still fits when timed (after an OOM in the
    search, fragmentation can make the last size that fitted fail once more)."""
    for n in reversed(sizes):
        try:
            return n, time_steps(model, opt, arch, n, device, seconds)
        except OOM:
            opt.zero_grad(set_to_none=True)
            free(device)
    raise RuntimeError(f"no batch size of {sizes} fitted when timed")


def flops_per_image(model, arch: str) -> float:
    cfg = ARCHS[arch]
    per_image = (
        cfg["hidden_size"] * cfg["projection_dim"] + sum(p.numel() for p in head_parameters(model)) // 4
    )
    return train_flops_per_image(cfg, per_image)


def finetune_variant(section, rid: str, checkpointing: bool, compiled: str | None, sizes) -> None:
    """One row of images/s (+ MFU data) and one of memory per sample for a fine-tune configuration."""
    device, arch = device_for(section), arch_for(section)
    label = f"fine-tune step, {arch}, activation checkpointing {'on' if checkpointing else 'off'}"
    label += f", torch.compile ({compiled})" if compiled else ", eager"
    model, opt = train_setup(arch, device, checkpointing)
    attention = attention_op(model, arch, device)
    if compiled:
        compile_model(model, section.args["compile_scope"], "eager" if section.dry else "inductor")
    share = section.remaining() / (2 if not compiled else 1)
    fits = search_batch(model, opt, arch, device, sizes, time.monotonic() + 0.6 * share)
    if not fits:
        section.error(rid, label, f"no batch of {sizes[0]} samples fits (or the search ran out of time)")
        return
    n, step_s = timed_largest(model, opt, arch, [n for n, _ in fits], device, 0.5 if section.dry else 4)
    images_s = NUM_VIEWS * n / step_s
    tflops = flops_per_image(model, arch) * images_s / 1e12
    capped = " (the largest size tried)" if n == sizes[-1] else ""
    section.row(
        rid,
        label,
        round(images_s, 1),
        "images/s",
        kind="finetune",
        tflops=tflops,
        batch=n,
        checkpointing=checkpointing,
        compiled=bool(compiled),
        note=f"batch {n} x {NUM_VIEWS} views{capped}; {step_s * 1e3:.0f} ms/step; {attention}",
    )
    memory_row(section, rid + "m", label, fits, device, checkpointing)
    section.provide(**{f"batch_{'ckpt' if checkpointing else 'plain'}": n})
    del model, opt
    free(device)


def memory_row(section, rid: str, label: str, fits, device, checkpointing: bool) -> None:
    what = f"peak memory per sample, {label.split(', ', 1)[1]}"
    if device.type != "cuda":
        section.skip(
            rid, what, "no CUDA allocator on CPU (bench/activation_memory.py counts it)", "GB/sample"
        )
        return
    line = linear_fit(fits)
    if line is None:
        reason = f"one batch size fitted, no line: peak {fits[0][1] / GB:.1f} GB at {fits[0][0]} samples"
        section.skip(rid, what, reason, "GB/sample")
        return
    slope, intercept = line
    tried = ", ".join(f"{n}:{p / GB:.1f}" for n, p in fits)
    section.row(
        rid,
        what,
        round(slope / GB, 3),
        "GB/sample",
        per_image_gb=slope / GB / NUM_VIEWS,
        static_gb=intercept / GB,
        kind="memory",
        checkpointing=checkpointing,
        note=f"{slope / GB / NUM_VIEWS:.3f} GB/image, static {intercept / GB:.1f} GB; fits with "
        f"{HEADROOM:.0%} free: {predicted_batches(slope, intercept)}; peaks (samples:GB) {tried}; one "
        "process: DDP's gradient buckets (4 bytes a weight, 1.2 GB for ViT-L) come on top",
    )


def section_finetune(section) -> None:
    sizes = DRY_SEARCH if section.dry else SEARCH
    for rid, ckpt in (("1a", False), ("1b", True)):
        what = f"fine-tune step, activation checkpointing {'on' if ckpt else 'off'}, eager"
        guarded_variant(section, rid, what, ckpt, None, sizes[ckpt])


def guarded_variant(section, rid, what, ckpt, compiled, sizes) -> None:
    guarded(section, rid, what, finetune_variant, section, rid, ckpt, compiled, sizes)
    free(device_for(section))


# ----------------------------------------------------------------------------- 5: compiled


def section_compile(section) -> None:
    scope = section.args["compile_scope"]
    backend = "eager" if section.dry else "inductor"
    for rid, ckpt in (("5a", False), ("5b", True)):
        # the eager section's largest batch: recompiling for every size tried would cost minutes
        n = section.context.get(
            f"batch_{'ckpt' if ckpt else 'plain'}", DRY_SEARCH[ckpt][-1] if section.dry else 16
        )
        what = f"fine-tune step, activation checkpointing {'on' if ckpt else 'off'}, torch.compile"
        guarded_variant(section, rid, what, ckpt, f"{scope}, {backend}", (n,))


# ----------------------------------------------------------------------------- 2: embedding pass


def embed_rate(model, pre, n: int, device, seconds: float) -> float:
    """Images/s of the frozen phase's pass: uint8 views -> on-device preprocessing -> backbone (no_grad)."""
    images = torch.randint(0, 256, (n, NUM_VIEWS, 3, 256, 256), dtype=torch.uint8, device=device)
    mask = torch.ones(n, NUM_VIEWS, dtype=torch.bool, device=device)

    @torch.no_grad()
    def run():
        with autocast_bf16(device):
            model.forward_features(pre(images), mask)

    run()
    once = seconds_per_call(run, 1, device)
    calls = max(2, min(50, math.ceil(seconds / max(once, 1e-6))))
    return NUM_VIEWS * n / seconds_per_call(run, calls, device)


def section_embed(section) -> None:
    device, arch = device_for(section), arch_for(section)
    model = build_on(arch, device).eval()
    pre = Preprocessor(ARCHS[arch]["image_size"]).to(device).eval()
    fwd_flops = flops_per_image(model, arch) / 3  # forward only
    for rid, n in (("2a", 4 if section.dry else 64), ("2b", 8 if section.dry else 128)):
        what = f"embedding pass (no_grad, bf16), {arch}, batch {n} samples"
        rate = guarded(section, rid, what, embed_rate, model, pre, n, device, 0.3 if section.dry else 4)
        if rate is not None:
            section.row(
                rid,
                what,
                round(rate, 1),
                "images/s",
                kind="embed",
                tflops=fwd_flops * rate / 1e12,
                note="uint8 256 px views -> Preprocessor -> forward_features",
            )
    best = max((r["value"] for r in section.rows if r["data"].get("kind") == "embed"), default=None)
    section.provide(embed_images_per_s=best)
