"""The README's one-command pipeline on a built-in default: generated data and a tiny CLIP, on CPU.

    python -m geoloc.demo --out demo_out          # (what `make demo` runs; a few minutes on a laptop)

Stages: generate a data set in the competition layout -> shard it -> build a tiny CLIP checkpoint
locally -> train both phases (``train.py``) -> evaluate on val (``infer.py --eval``) -> predict the
test split and write a validated ``submission.csv`` (``infer.py``) -> score it against the generated
answers. Every score is printed beside the prior baseline (the 5 most frequent training states and the
mean training GPS point), which the trained model must beat clearly.
"""

from __future__ import annotations

import argparse
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from geoloc.contract import PRED_STATE_COLUMNS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="working directory for data, shards, run, submission")
    p.add_argument("--n-train", type=int, default=600, help="generated training samples (4 views each)")
    p.add_argument("--n-test", type=int, default=150, help="generated test samples")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated data and of training")
    p.add_argument("--epochs-frozen", type=int, default=4, help="phase 1 epochs (heads on cached embeddings)")
    p.add_argument("--epochs-finetune", type=int, default=2, help="phase 2 epochs (whole tiny backbone)")
    return p.parse_args(argv)


def stage(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def make_data(out: Path, n_train: int, n_test: int, seed: int) -> tuple[Path, Path]:
    from geoloc.sharding import shard_dataset
    from geoloc.synth import generate_dataset

    t = stage(f"generate {n_train} train + {n_test} test samples")
    root = generate_dataset(out / "data", n_train=n_train, n_test=n_test, seed=seed)
    print(f"   data root {root} ({time.perf_counter() - t:.1f} s)")
    t = stage(f"python shard_dataset.py --data-root {root} --out {out / 'shards'} --val-fraction 0.2")
    shards = out / "shards"
    manifest = shard_dataset(root, shards, val_fraction=0.2, seed=seed, samples_per_shard=100, workers=2)
    counts = {split: info["count"] for split, info in manifest["splits"].items()}
    print(f"   {counts}, {len(manifest['skipped'])} skipped ({time.perf_counter() - t:.1f} s)")
    return root, shards


def split_labels(shards: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Original state indices ``(N,)`` and points ``(N, 2)`` of a labelled split, read from the JSONs."""
    states, points = [], []
    for path in sorted(shards.glob(f"{split}-*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.load(tar.extractfile(member))
                    states.append(meta["state_idx"])
                    points.append((meta["lat"], meta["lon"]))
    return np.asarray(states), np.asarray(points, dtype=np.float64)


def prior_metrics(model_dir: Path, states: np.ndarray, points: np.ndarray) -> dict:
    """The prior baseline (as fitted on train by the trainer) scored on the given labels."""
    from geoloc.metrics import Prior, competition_metrics

    prior = Prior.from_dict(json.loads((model_dir / "geoloc.json").read_text())["prior"])
    top5, latlon = prior.predict(len(states))
    return competition_metrics(top5, states, latlon, points)


def score_submission(submission: Path, answers: Path) -> dict:
    """Competition metrics of a submission file against an answers file (joined on sample_id)."""
    from geoloc.metrics import competition_metrics

    sub = pd.read_csv(submission, dtype={"sample_id": str})
    ans = pd.read_csv(answers, dtype={"sample_id": str}).set_index("sample_id").loc[sub["sample_id"]]
    return competition_metrics(
        sub[list(PRED_STATE_COLUMNS)].to_numpy(),
        ans["state_idx"].to_numpy(),
        sub[["predicted_latitude", "predicted_longitude"]].to_numpy(),
        ans[["latitude", "longitude"]].to_numpy(),
    )


def train(out: Path, shards: Path, args) -> Path:
    from geoloc.tiny_clip import build_tiny_clip
    from geoloc.train.cli import main as train_main

    clip = build_tiny_clip(out / "tiny_clip", image_size=56, hidden_size=64, num_layers=2, projection_dim=32)
    run = out / "run"
    argv = [
        "--shards", str(shards), "--output-dir", str(run), "--preset", "smoke",
        f"model.backbone={clip}", f"train.seed={args.seed}",
        f"train.epochs_frozen={args.epochs_frozen}", f"train.epochs_finetune={args.epochs_finetune}",
        "train.head_lr=3e-3", "train.backbone_lr=3e-4", "train.patience=0",
    ]  # fmt: skip
    t = stage("train.py " + " ".join(argv))
    if train_main(argv) != 0:
        raise SystemExit("demo: training failed (see above)")
    print(f"   trained in {time.perf_counter() - t:.1f} s; best model in {run / 'model'}")
    return run / "model"


def infer(out: Path, shards: Path, root: Path, model: Path) -> tuple[dict, Path]:
    from geoloc.infer.cli import main as infer_main

    argv = ["--eval", "--model", str(model), "--shards", str(shards), "--out-dir", str(out / "report")]
    stage("infer.py " + " ".join(argv))
    if infer_main(argv) != 0:
        raise SystemExit("demo: evaluation failed (see above)")
    report = json.loads((out / "report" / "report.json").read_text())
    submission = out / "submission.csv"
    argv = ["--model", str(model), "--shards", str(shards), "--out", str(submission)]
    stage("infer.py " + " ".join(argv))
    if infer_main(argv) != 0:
        raise SystemExit("demo: prediction failed (see above)")
    return report, submission


def print_scores(rows: dict[str, dict]) -> None:
    keys = ("score", "cls_score", "gps_score", "top1_acc", "top5_acc", "median_km")
    print("\n   " + "".join(f"{k:>12}" for k in ("",) + keys))
    for name, m in rows.items():
        print("   " + f"{name:>12}" + "".join(f"{m[k]:>12.3f}" for k in keys))


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    root, shards = make_data(out, args.n_train, args.n_test, args.seed)
    model = train(out, shards, args)
    report, submission = infer(out, shards, root, model)
    metrics = report.get("metrics", report)
    stage("scores (val: infer.py --eval; test: submission.csv against the generated answers)")
    rows = {
        "val model": metrics,
        "val prior": prior_metrics(model, *split_labels(shards, "val")),
        "test model": score_submission(submission, root / "test_answers.csv"),
    }
    answers = pd.read_csv(root / "test_answers.csv")
    rows["test prior"] = prior_metrics(
        model, answers["state_idx"].to_numpy(), answers[["latitude", "longitude"]].to_numpy()
    )
    print_scores(rows)
    print(f"\n   submission: {submission} ({time.perf_counter() - t0:.0f} s in all)")
    return rows


if __name__ == "__main__":
    main()
