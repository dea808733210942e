"""What the hyper-parameter search costs and gains on the realistic generated set.

    python bench/tune.py --work-dir /tmp/tune-bench [--n-train 3000] [--epochs 6] [--trials 20] \
        [--seeds 1 2 3] [--out tune.json]

Stages: the realistic set, its shards and the demo's tiny CLIP (as ``bench/ablation.py`` makes them;
reused when present) -> ``python -m geoloc.tune`` with ``--trials`` frozen-phase trials on the embedding
cache (its first trial is the base config; the embedding pass runs in it, once for the study) -> the
base config and the study's ``best.yaml`` trained again with other seeds (``train.seed``), so the gain
is read beyond the seed the study chose on. The val split picks the best trial (as it picks the epoch):
the study's own best score is optimistic; the re-trained seeds are less so (the val set is the same).
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--work-dir", type=Path, required=True, help="data, shards, study, runs (reused if present)"
    )
    p.add_argument("--n-train", type=int, default=3000, help="generated labelled samples (80%% train)")
    p.add_argument("--seed", type=int, default=0, help="data set seed")
    p.add_argument("--epochs", type=int, default=6, help="frozen-phase epochs of every trial and run")
    p.add_argument("--trials", type=int, default=20, help="finished trials of the study")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="training seeds of the re-runs")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    return p.parse_args(argv)


def budget(args, clip: Path, cache: Path) -> list[str]:
    """The overrides every trial and re-run shares (the ablation's budget; the searched keys are free)."""
    return [f"model.backbone={clip}", f"train.cache_dir={cache}", f"train.epochs_frozen={args.epochs}",
            "train.patience=0", "train.frozen_batch_size=64"]  # fmt: skip


def prepare(args) -> tuple[Path, Path]:
    shards, clip = args.work_dir / "shards", args.work_dir / "clip"
    if (shards / "manifest.json").is_file() and (clip / "config.json").is_file():
        return shards, clip
    from ablation import prepare as make

    return make(args.work_dir, args.n_train, 100, args.seed)


def study(args, shards: Path, clip: Path, cache: Path) -> tuple[dict, float]:
    """The study (resumed if its database is there); its summary.json and this run's wall time."""
    from geoloc.tune.cli import main as tune_main

    start = time.perf_counter()
    argv = ["--shards", str(shards), "--output-dir", str(args.work_dir / "study"), "--preset", "smoke",
            "--n-trials", str(args.trials), *budget(args, clip, cache)]  # fmt: skip
    if tune_main(argv) != 0:
        raise SystemExit("bench/tune.py: the study failed")
    wall = time.perf_counter() - start
    return json.loads((args.work_dir / "study" / "geoloc" / "summary.json").read_text()), wall


def retrain(args, shards: Path, clip: Path, cache: Path, name: str, config: Path | None, seed: int) -> float:
    """One frozen-phase run of ``config`` (None: the base config) with ``seed``; its best val score."""
    from accelerate.state import AcceleratorState

    from geoloc.train.cli import main as train_main

    run = args.work_dir / "retrain" / f"{name}-seed{seed}"
    argv = ["--shards", str(shards), "--output-dir", str(run), "--phase", "frozen",
            *(["--config", str(config)] if config else ["--preset", "smoke"]), *budget(args, clip, cache),
            f"train.seed={seed}", "train.build_index=false"]  # fmt: skip
    try:
        if train_main(argv) != 0:
            raise SystemExit(f"bench/tune.py: train.py failed for {run}")
    finally:
        AcceleratorState._reset_state(True)
    meta = json.loads((run / "model" / "geoloc.json").read_text())
    return float(meta["extra"]["val"]["score"])


def report(summary: dict, wall: float, seeds: list[int], reruns: dict[str, list[float]]) -> dict:
    """Print the study's counts and times, and the base and best configs' val scores by seed."""
    trials = summary["trials"]
    walls = [t["wall_s"] for t in trials if "wall_s" in t]
    base, best = summary["baseline"], summary["best"]
    print(f"\nstudy: {summary['counts']} in {wall:.0f} s (first trial, with the embedding pass: "
          f"{walls[0]:.0f} s; the others {statistics.mean(walls[1:]):.1f} s on average)")  # fmt: skip
    print(f"baseline (trial {base['number']}): val score {base['value']:.4f}")
    print(f"best (trial {best['number']}): val score {best['value']:.4f} with {best['params']}")
    print(
        "\n| config | in the study (seed 0) | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " | mean of these |"
    )
    print("|---|---:|" + "---:|" * (len(seeds) + 1))
    for name, row in (("base", base), ("best", best)):
        scores = reruns[name]
        print(f"| {name} | {row['value']:.4f} | " + " | ".join(f"{s:.4f}" for s in scores)
              + f" | {statistics.mean(scores):.4f} |")  # fmt: skip
    return {"counts": summary["counts"], "wall_s": wall, "trial_wall_s": walls, "baseline": base["value"],
            "best": best["value"], "best_params": best["params"], "seeds": seeds, "reruns": reruns}  # fmt: skip


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    shards, clip = prepare(args)
    cache = args.work_dir / "cache"
    summary, wall = study(args, shards, clip, cache)
    best_yaml = args.work_dir / "study" / "geoloc" / "best.yaml"
    reruns = {name: [retrain(args, shards, clip, cache, name, config, s) for s in args.seeds]
              for name, config in (("base", None), ("best", best_yaml))}  # fmt: skip
    result = report(summary, wall, args.seeds, reruns)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
