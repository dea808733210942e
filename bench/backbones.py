"""CLIP, DINOv2 and SigLIP backbones: what each costs per image, and what each gives on the realistic
generated set at the same size and budget.

    OMP_NUM_THREADS=2 python bench/backbones.py --work-dir /tmp/backbones [--seeds 0 1] [--n-train 3000] \
        [--epochs 6] [--finetune-epochs 1] [--variants clip-projection dinov2-cls ...] [--skip-train] \
        [--skip-cost] [--out backbones.json]

Cost (no training): forward FLOPs per image counted by ``torch.utils.flop_counter`` on the meta device
(eager attention, so the attention matmuls are counted), parameters, and the forward time per image on
this CPU as a ratio to CLIP at the same size, timed round-robin (every round runs every family once, so
load from other jobs hits all alike; the median round is kept). Two same-size settings (the tiny size of
the quality runs, and ViT-B/14 at 224 px) isolate what each family adds on the same transformer
(DINOv2: layer scale, position interpolation; SigLIP: the attention-pooling head, no CLS token). The
released sizes one would actually fine-tune (StreetCLIP's ViT-L/14-336 against DINOv2-L/14 at its 224 px
crop and SigLIP-L/16 and so400m/14 at 384 px) are counted, not timed.

Quality: for each (family, pooling), a tiny random-init backbone of the same size (hidden 64, 2 blocks,
56 px, patch 14: the demo's CLIP) through ``train.py`` (frozen phase on the embedding cache, then
fine-tuning, the same overrides for all) and ``infer.py --eval`` on val with the model's default decoder.
Random weights say little about the released checkpoints (which this machine cannot download): what a
real DINOv2 or SigLIP gives for geolocation is decided by their pretraining, not by what is measured
here. The rows show that each family trains end to end through the same code at the same budget.
A run whose report exists in ``--work-dir`` is reused (an interrupted bench continues where it stopped).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

TINY = {"image_size": 56, "hidden_size": 64, "num_layers": 2}  # the demo's CLIP size
# (family, pooling) quality variants: each family's natural pooled output, and patch-token means
VARIANTS = [("clip", "projection"), ("clip", "mean"), ("dinov2", "cls"), ("dinov2", "mean"),
            ("siglip", "projection"), ("siglip", "mean")]  # fmt: skip
KEYS = ("score", "cls_score", "top1_acc", "top5_acc", "mean_km", "median_km")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", type=Path, required=True, help="data, shards, runs (reused if present)")
    p.add_argument("--n-train", type=int, default=3000, help="generated labelled samples (80%% train)")
    p.add_argument("--n-test", type=int, default=100, help="generated test samples (unused by the table)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="data and training seeds")
    p.add_argument("--epochs", type=int, default=6, help="frozen-phase epochs of every run")
    p.add_argument("--finetune-epochs", type=int, default=1, help="fine-tune epochs of every run")
    p.add_argument("--rounds", type=int, default=7, help="timed round-robin rounds of the cost table")
    p.add_argument("--variants", nargs="*", help="only these quality runs, e.g. dinov2-cls siglip-mean")
    p.add_argument("--skip-train", action="store_true", help="only the cost table")
    p.add_argument("--skip-cost", action="store_true", help="only the quality table")
    p.add_argument("--out", type=Path, help="write both tables as JSON here")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- cost


def vision_configs(size: str) -> dict[str, tuple[str, dict, int]]:
    """``{name: (family, vision config, input px)}`` for ``size`` in ``tiny | base | released``."""
    from geoloc.tiny_backbones import DINOV2_LARGE, SIGLIP_LARGE_384, SIGLIP_SO400M_384
    from geoloc.tiny_clip import STREETCLIP_VISION

    if size == "released":
        return {
            "CLIP ViT-L/14-336 (StreetCLIP)": ("clip", STREETCLIP_VISION, 336),
            "DINOv2-L/14 at 224": ("dinov2", DINOV2_LARGE, 224),
            "SigLIP-L/16-384": ("siglip", SIGLIP_LARGE_384, 384),
            "SigLIP so400m/14-384": ("siglip", SIGLIP_SO400M_384, 384),
        }
    d, layers, px = (
        (TINY["hidden_size"], TINY["num_layers"], TINY["image_size"]) if size == "tiny" else (768, 12, 224)
    )
    heads, ratio = (2, 2) if size == "tiny" else (12, 4)  # tiny: exactly the quality runs' backbones
    common = {"hidden_size": d, "num_hidden_layers": layers, "num_attention_heads": heads, "patch_size": 14}
    vit = {**common, "intermediate_size": ratio * d, "image_size": px}
    return {
        "CLIP": ("clip", {**vit, "projection_dim": d // 2 if size == "tiny" else d}, px),
        "DINOv2": (
            "dinov2",
            {**common, "mlp_ratio": ratio, "image_size": round(px * 518 / 224 / 14) * 14},
            px,
        ),
        "SigLIP": ("siglip", vit, px),
    }


def build(family: str, vision: dict, attn: str, device: str = "cpu"):
    """A random-weight vision tower of ``family`` (its natural pooling) on ``device``."""
    import torch
    import transformers

    from geoloc.families import FAMILIES

    fam = {f.name.lower(): f for f in FAMILIES}[family]
    pooling = "cls" if family == "dinov2" else "projection"
    config = getattr(transformers, fam.config_class)(**vision)
    with torch.device(device):
        model = getattr(transformers, fam.model_class(pooling))._from_config(config, attn_implementation=attn)
    return model.eval()


def forward_flops(family: str, vision: dict, px: int) -> tuple[float, float]:
    """(forward GFLOPs, parameters in millions) for one ``px`` image, counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = build(family, vision, "eager", device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(pixel_values=torch.empty(1, 3, px, px, device="meta"))
    return counter.get_total_flops() / 1e9, sum(p.numel() for p in model.parameters()) / 1e6


def forward_times(configs: dict, rounds: int, batch: int) -> dict[str, float]:
    """Median seconds per image of each model, timed round-robin (sdpa attention, fp32, no grad)."""
    import torch

    models = {name: build(fam, vision, "sdpa") for name, (fam, vision, _) in configs.items()}
    inputs = {name: torch.randn(batch, 3, px, px) for name, (_, _, px) in configs.items()}
    times: dict[str, list[float]] = {name: [] for name in configs}
    with torch.no_grad():
        for r in range(rounds + 1):
            for name, model in models.items():
                t0 = time.perf_counter()
                model(pixel_values=inputs[name])
                if r:  # round 0 warms up
                    times[name].append((time.perf_counter() - t0) / batch)
    return {name: statistics.median(ts) for name, ts in times.items()}


def cost_rows(rounds: int) -> list[dict]:
    rows = []
    for size, batch in (("tiny", 64), ("base", 2), ("released", 0)):
        configs = vision_configs(size)
        times = forward_times(configs, rounds, batch) if batch else {}
        base_flops = base_time = None
        for name, (family, vision, px) in configs.items():
            gflops, params = forward_flops(family, vision, px)
            base_flops = base_flops or gflops  # CLIP comes first in every setting
            t = times.get(name)
            base_time = base_time or t
            rows.append({"size": size, "model": name, "px": px, "params_m": params, "gflops": gflops,
                         "flops_ratio": gflops / base_flops, "ms_per_image": t and t * 1e3,
                         "time_ratio": t and t / base_time})  # fmt: skip
    return rows


def print_cost(rows: list[dict]) -> None:
    print(
        "\n| setting | backbone | input px | params (M) | forward GFLOPs/image | x CLIP | CPU ms/image | x CLIP |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ms = f"{r['ms_per_image']:.2f} | {r['time_ratio']:.2f}" if r["ms_per_image"] else "- | -"
        print(f"| {r['size']} | {r['model']} | {r['px']} | {r['params_m']:.2f} | {r['gflops']:.3g} | "
              f"{r['flops_ratio']:.2f} | {ms} |")  # fmt: skip


# ----------------------------------------------------------------------------- quality


def prepare(work: Path, args, seed: int) -> tuple[Path, dict[str, Path]]:
    """The realistic data root, its shards and one tiny checkpoint per family (built once, reused)."""
    from geoloc.sharding import shard_dataset
    from geoloc.synth import generate_dataset
    from geoloc.tiny_backbones import build_tiny_backbone

    root, shards = work / "data", work / "shards"
    if not (root / "train_ground_truth.csv").is_file():
        generate_dataset(root, n_train=args.n_train, n_test=args.n_test, seed=seed, mode="realistic")
    if not (shards / "manifest.json").is_file():
        shard_dataset(
            root, shards, val_fraction=0.2, seed=seed, samples_per_shard=250, workers=2, progress=False
        )
    dirs = {}
    for family in ("clip", "dinov2", "siglip"):
        dirs[family] = work / family
        if not (dirs[family] / "config.json").is_file():
            extra = {"projection_dim": 32} if family == "clip" else {}  # the demo's CLIP
            build_tiny_backbone(family, dirs[family], seed=seed, **TINY, **extra)
    return shards, dirs


def quality_rows(args, seed: int) -> list[dict]:
    """One row per (family, pooling): train.py, then infer.py --eval; a finished run is reused."""
    from ablation import evaluate, train

    work = args.work_dir / f"seed{seed}"
    shards, dirs = prepare(work, args, seed)
    rows = []
    for family, pooling in VARIANTS:
        name = f"{family}-{pooling}"
        if args.variants and name not in args.variants:
            continue
        run = work / "runs" / name
        if not (run / "report" / "report.json").is_file():
            model = train(shards, dirs[family], run, work / "cache", [f"model.pooling={pooling}"], args, seed,
                          args.finetune_epochs)  # fmt: skip
            evaluate(model, shards, run / "report")
        report = json.loads((run / "report" / "report.json").read_text())
        rows.append({"family": family, "pooling": pooling, "seed": seed, "train_s": train_seconds(run),
                     **{k: report[k] for k in KEYS}})  # fmt: skip
    return rows


def train_seconds(run: Path) -> float:
    """train.py's wall time after start-up: from its config.yaml to its exported geoloc.json."""
    return (run / "model" / "geoloc.json").stat().st_mtime - (run / "config.yaml").stat().st_mtime


def print_quality(rows: list[dict]) -> None:
    print("\n| backbone (tiny, random init) | pooling | seeds | val score (spread) | cls score | top-1 | top-5 | "
          "mean km | median km | train.py s |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for family, pooling in VARIANTS:
        rs = [r for r in rows if (r["family"], r["pooling"]) == (family, pooling)]
        if not rs:
            continue
        m = {k: statistics.mean(r[k] for r in rs) for k in (*KEYS, "train_s")}
        spread = max(r["score"] for r in rs) - min(r["score"] for r in rs)
        print(f"| {family} | {pooling} | {len(rs)} | {m['score']:.4f} ({spread:.4f}) | {m['cls_score']:.4f} | "
              f"{m['top1_acc']:.3f} | {m['top5_acc']:.3f} | {m['mean_km']:.0f} | {m['median_km']:.0f} | "
              f"{m['train_s']:.0f} |")  # fmt: skip


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TQDM_DISABLE", "1")
    t0 = time.perf_counter()
    cost = [] if args.skip_cost else cost_rows(args.rounds)
    if cost:
        print_cost(cost)
    quality = [] if args.skip_train else [r for seed in args.seeds for r in quality_rows(args, seed)]
    if quality:
        print_quality(quality)
    print(
        f"\nbackbones: {time.perf_counter() - t0:.0f} s, torch threads {__import__('torch').get_num_threads()}"
    )
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "cost": cost, "quality": quality}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
