"""The README's one-command pipeline on a built-in default: generated data and a tiny CLIP, on CPU.

    python -m geoloc.demo --out demo_out          # (what `make demo` runs)

Stages: generate a data set in the competition layout -> shard it -> build a tiny CLIP checkpoint
locally -> train both phases -> predict the test split -> write and validate ``submission.csv`` -> score
it against the generated answers, beside the prior baseline (5 most frequent states, mean GPS point).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="working directory for data, shards, run, submission")
    p.add_argument("--n-train", type=int, default=600, help="generated training samples (4 views each)")
    p.add_argument("--n-test", type=int, default=150, help="generated test samples")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated data and of training")
    return p.parse_args(argv)


def stage(title: str):
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def make_data(out: Path, n_train: int, n_test: int, seed: int) -> tuple[Path, Path]:
    from geoloc.sharding import shard_dataset
    from geoloc.synth import generate_dataset

    t = stage(f"generate {n_train} train + {n_test} test samples")
    root = generate_dataset(out / "data", n_train=n_train, n_test=n_test, seed=seed)
    print(f"   data root {root} ({time.perf_counter() - t:.1f} s)")
    t = stage("shard")
    shards = out / "shards"
    manifest = shard_dataset(root, shards, val_fraction=0.2, seed=seed, samples_per_shard=100, workers=2)
    counts = {split: info["count"] for split, info in manifest["splits"].items()}
    print(f"   {shards}: {counts}, {len(manifest['skipped'])} skipped ({time.perf_counter() - t:.1f} s)")
    return root, shards


def loader_pass(shards: Path) -> int:
    """One pass of the streaming loader over the val split; returns the number of samples seen."""
    from geoloc.data import make_eval_loader, read_manifest, resolve_shards
    from geoloc.labels import LabelEncoder

    t = stage("stream the val split through the loader")
    encoder = LabelEncoder.from_dict(read_manifest(str(shards))["label_encoder"])
    urls = resolve_shards(str(shards), "val")
    seen = 0
    for batch in make_eval_loader(urls, batch_size=32, num_workers=1, encoder=encoder):
        seen += len(batch["sample_id"])
        shape = tuple(batch["images"].shape)
    print(f"   {seen} samples, last batch images {shape} uint8 ({time.perf_counter() - t:.1f} s)")
    return seen


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root, shards = make_data(out, args.n_train, args.n_test, args.seed)
    loader_pass(shards)


if __name__ == "__main__":
    main()
