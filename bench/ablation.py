"""Ablation of the PIGEON parts on the realistic generated set: heads, smoothing, geocells, GPS decoders,
retrieval refinement; one table, fixed seed and budget.

    python bench/ablation.py --work-dir /tmp/ablation [--seeds 0 1 2] [--n-train 3000] [--epochs 6] \
        [--finetune-epochs 1] [--finetune-batch 4] [--variants NAME ...] [--out ablation.json]

Stages: generate the realistic set (``geoloc.synth``, mode realistic) -> shard (20% val) -> a tiny CLIP
(the demo's) -> for each training variant, ``train.py`` with the frozen backbone on the shared embedding
cache (the same budget for every variant) -> the post-training step scores every decoder the variant can
serve on val (``geoloc.train.index``) -> one row per (variant, decoder). Then the best variant and the
baseline (PIGEON's plain state head + GPS regression) are trained again with ``--finetune-epochs`` of
fine-tuning (and so are the auxiliary-head variants of ``ALWAYS_FULL``, whose point is the fine-tuned
embedding), and ``infer.py --eval`` scores each on val with its best decoder, so the last rows hold
the end-to-end numbers. Every row: val score, cls score, top-1/top-5, mean/median km.

Each seed draws its own data set, cells and initialisation; the table gives the mean over the seeds
(and the spread, max - min). The val split picks each variant's decoder, as it picks the epoch; read the
differences between variants, not the absolute level (the data are generated; see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name -> train.py overrides (phase 1 only, cached embeddings: the same budget for every variant)
VARIANTS = {
    "state+gps (baseline)": ["model.heads=[state,gps]"],
    "state+gps, tau 25": ["model.heads=[state,gps]", "loss.tau_km=25"],
    "state+gps, tau 200": ["model.heads=[state,gps]", "loss.tau_km=200"],
    "cell+gps, cells 30-60": ["model.heads=[cell,gps]"],
    "cell+gps, cells 10-19": ["model.heads=[cell,gps]", "model.cell_min_size=10", "model.cell_max_size=19"],
    "cell+gps, cells 10-19, tau 25": [
        "model.heads=[cell,gps]",
        "model.cell_min_size=10",
        "model.cell_max_size=19",
        "loss.tau_km=25",
    ],
    "state+cell+gps, cells 10-19": [
        "model.heads=[state,cell,gps]",
        "model.cell_min_size=10",
        "model.cell_max_size=19",
    ],
    # metric learning on location (geoloc.metric): the bandit over the three bands, one band alone, the
    # triplet loss; and the VAE term (a multi-task reconstruction of 16x16 thumbnails)
    "state+gps+metric (infonce, bandit)": ["model.heads=[state,gps,metric]"],
    "state+gps+metric (infonce, hard only)": ["model.heads=[state,gps,metric]", "loss.metric_bands=[hard]"],
    "state+gps+metric (infonce, easy only)": ["model.heads=[state,gps,metric]", "loss.metric_bands=[easy]"],
    "state+gps+metric (triplet, bandit)": ["model.heads=[state,gps,metric]", "loss.metric_loss=triplet"],
    "state+gps+vae": ["model.heads=[state,gps,vae]"],
}
# variants that are also trained through both phases whatever their phase-1 score: the auxiliary heads
# train the shared embedding, which only the fine-tuned backbone can turn into better predictions
ALWAYS_FULL = ("state+gps (baseline)", *(name for name in VARIANTS if "metric" in name or "vae" in name))
KEYS = ("score", "cls_score", "top1_acc", "top5_acc", "mean_km", "median_km")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", type=Path, required=True, help="data, shards, runs (reused if present)")
    p.add_argument("--n-train", type=int, default=3000, help="generated labelled samples (80%% train)")
    p.add_argument("--n-test", type=int, default=100, help="generated test samples (unused by the table)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="data and training seeds (one run each)")
    p.add_argument("--epochs", type=int, default=6, help="frozen-phase epochs of every variant")
    p.add_argument("--finetune-epochs", type=int, default=1, help="fine-tune epochs of the full runs")
    p.add_argument("--finetune-batch", type=int, default=4, help="phase-2 batch of every run (per rank)")
    p.add_argument("--variants", nargs="*", help="only these variants (names of VARIANTS)")
    p.add_argument("--out", type=Path, help="write the table as JSON here")
    return p.parse_args(argv)


def prepare(work: Path, n_train: int, n_test: int, seed: int) -> tuple[Path, Path]:
    """The realistic data root, its shards and the demo's tiny CLIP (built once, reused)."""
    from geoloc.sharding import shard_dataset
    from geoloc.synth import generate_dataset
    from geoloc.tiny_clip import build_tiny_clip

    root, shards, clip = work / "data", work / "shards", work / "clip"
    if not (root / "train_ground_truth.csv").is_file():
        generate_dataset(root, n_train=n_train, n_test=n_test, seed=seed, mode="realistic")
    if not (shards / "manifest.json").is_file():
        shard_dataset(
            root, shards, val_fraction=0.2, seed=seed, samples_per_shard=250, workers=2, progress=False
        )
    if not (clip / "config.json").is_file():
        build_tiny_clip(clip, image_size=56, hidden_size=64, num_layers=2, projection_dim=32)
    return shards, clip


def train(shards, clip, run: Path, cache: Path, overrides: list[str], args, seed: int, finetune: int) -> Path:
    """One train.py run in this process; returns the exported model directory."""
    from accelerate.state import AcceleratorState

    from geoloc.train.cli import main as train_main

    argv = [
        "--shards", str(shards), "--output-dir", str(run), "--preset", "smoke", f"model.backbone={clip}",
        f"train.cache_dir={cache}", f"train.seed={seed}", f"train.epochs_frozen={args.epochs}",
        f"train.epochs_finetune={finetune}", "train.head_lr=3e-3", "train.backbone_lr=3e-4", "train.patience=0",
        "train.frozen_batch_size=64", f"train.finetune_batch_size={args.finetune_batch}", *overrides,
    ]  # fmt: skip
    if train_main(argv) != 0:
        raise SystemExit(f"ablation: train.py failed for {run}")
    AcceleratorState._reset_state(True)  # the next run builds its own accelerator
    return run / "model"


def rows_of(name: str, model_dir: Path) -> list[dict]:
    """One row per decoder the post-training step scored on val (geoloc.json's ``decoders_val``)."""
    meta = json.loads((model_dir / "geoloc.json").read_text())
    return [
        {"variant": name, "decoder": _label(r["decoder"]), "default": r["decoder"] == meta["decoder"],
         "score": r["score"], "top1_acc": r["top1_acc"], "mean_km": r["mean_km"]}
        for r in meta["decoders_val"]
    ]  # fmt: skip


def _label(d: dict) -> str:
    knn = f" + knn vote {d['knn_alpha']:g}" if d["knn_alpha"] else ""
    return f"{d['state']} / {d['gps']}{knn}"


def evaluate(model_dir: Path, shards: Path, out: Path) -> dict:
    """infer.py --eval on val with the model's default decoder: the full metric set."""
    from accelerate.state import AcceleratorState

    from geoloc.infer.cli import main as infer_main

    code = infer_main(["--eval", "--model", str(model_dir), "--shards", str(shards), "--out-dir", str(out),
                       "--no-progress"])  # fmt: skip
    AcceleratorState._reset_state(True)
    if code != 0:
        raise SystemExit(f"ablation: infer.py --eval failed for {model_dir}")
    return json.loads((out / "report.json").read_text())


def mean_rows(rows: list[dict]) -> list[dict]:
    """Rows of several seeds -> one row per (variant, decoder): means, and the score's max - min."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["decoder"]), []).append(r)
    out = []
    for (variant, decoder), rs in groups.items():
        scores = [r["score"] for r in rs]
        out.append({"variant": variant, "decoder": decoder, "seeds": len(rs),
                    "default": sum(r["default"] for r in rs), "spread": max(scores) - min(scores),
                    **{k: sum(r[k] for r in rs) / len(rs) for k in ("score", "top1_acc", "mean_km")}})  # fmt: skip
    return sorted(out, key=lambda r: -r["score"])


def print_table(rows: list[dict], full: dict[str, list[dict]]) -> None:
    print("\n| variant | decoder (default in n seeds) | val score (spread) | top-1 | mean km |")
    print("|---|---|---:|---:|---:|")
    for r in mean_rows(rows):
        mark = f" ({r['default']})" if r["default"] else ""
        print(f"| {r['variant']} | {r['decoder']}{mark} | {r['score']:.4f} ({r['spread']:.4f}) | "
              f"{r['top1_acc']:.3f} | {r['mean_km']:.0f} |")  # fmt: skip
    print("\n| both phases, infer.py --eval with the default decoder | " + " | ".join(KEYS) + " |")
    print("|---|" + "---:|" * len(KEYS))
    for name, reports in full.items():
        m = {k: sum(r[k] for r in reports) / len(reports) for k in KEYS}
        print(f"| {name} | " + " | ".join(f"{m[k]:.4f}" if k.endswith(("score", "acc")) else f"{m[k]:.0f}"
                                         for k in KEYS) + " |")  # fmt: skip


def run_seed(args, seed: int, rows: list[dict], full: dict[str, list[dict]]) -> None:
    """Every variant (frozen phase) and the two full runs of one seed; rows and reports appended."""
    work = args.work_dir / f"seed{seed}"
    shards, clip = prepare(work, args.n_train, args.n_test, seed)
    cache, best = work / "cache", {}
    for name, overrides in VARIANTS.items():
        if args.variants and name not in args.variants:
            continue
        model = train(shards, clip, work / "runs" / name.replace(" ", "_"), cache, overrides, args, seed, 0)
        mine = rows_of(name, model)
        rows += mine
        best[name] = max(r["score"] for r in mine)
    for name in dict.fromkeys([*ALWAYS_FULL, max(best, key=best.get)]):
        if name in best:
            run = work / "full" / name.replace(" ", "_")
            model = train(shards, clip, run, cache, VARIANTS[name], args, seed, args.finetune_epochs)
            rows += rows_of(f"{name}, both phases", model)
            full.setdefault(name, []).append(evaluate(model, shards, run / "report"))


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TQDM_DISABLE", "1")  # one table, not thousands of progress lines
    t0, rows, full = time.perf_counter(), [], {}
    for seed in args.seeds:
        run_seed(args, seed, rows, full)
    print_table(rows, full)
    print(f"\nablation: {len(rows)} rows over seeds {args.seeds}, {time.perf_counter() - t0:.0f} s")
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "table": mean_rows(rows),
              "full": {k: [{m: r[m] for m in KEYS} for r in v] for k, v in full.items()}}  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
