"""Loader throughput on generated data: is the streaming loader near the JPEG-decode ceiling?

    OMP_NUM_THREADS=1 python bench/loader.py [--n-train 600] [--workers 2] [--repeats 3]   # repo root

One run generates a data set (geoloc.synth), shards it (geoloc.sharding) and prints samples/s
(1 sample = 4 views) of:

  (a) pure JPEG decode of the 4 views, in this process, bytes already in memory (the ceiling per core);
  (b) geoloc.data's train loader with ``--workers`` workers, yielding uint8 (B, 4, 3, 256, 256) as the
      GPU receives it (worker start-up included);
  (c) the seeds' straightforward way: a map-style Dataset that opens each JPEG with PIL, resizes it to
      336 and normalises it, in ``--workers`` DataLoader workers;
  (d) the on-device Preprocessor alone (resize 256 -> 336 + normalise), here on the CPU;

then the ratios b/a and b/c. Record the figures and the machine in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from geoloc import contract
from geoloc.data import decode_image, make_train_loader, read_manifest, resolve_shards
from geoloc.labels import LabelEncoder
from geoloc.preprocess import Preprocessor
from geoloc.tiny_clip import CLIP_MEAN, CLIP_STD

SEED_SIZE = 336  # StreetCLIP's input side, what the seeds resize to in the workers


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=600, help="generated training samples (4 JPEGs each)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for (b) and (c)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per batch for (b), (c), (d)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the train split for (b) and (c)")
    p.add_argument(
        "--repeats", type=int, default=3, help="rounds of all measurements; the best of each is kept"
    )
    p.add_argument("--work-dir", default="", help="where the data and shards go (default: a temp dir)")
    return p.parse_args(argv)


def prepare(work: Path, n_train: int) -> tuple[Path, Path]:
    """Generated data root and its shards (100 samples a shard, so every worker gets shards)."""
    from geoloc.sharding import shard_dataset
    from geoloc.synth import generate_dataset

    root, shards = work / "data", work / "shards"
    if not (root / contract.TRAIN_CSV).is_file():
        generate_dataset(root, n_train=n_train, n_test=8, seed=0)
    if read_manifest(str(shards)) is None:
        shard_dataset(root, shards, val_fraction=0.1, seed=0, samples_per_shard=100, workers=2)
    return root, shards


def view_paths(root: Path) -> list[list[Path]]:
    """The 4 view files of every training sample, in the contract's view order."""
    table = contract.read_train_table(root)
    images = root / contract.TRAIN_IMAGES
    return [[images / name for name in row] for row in table[list(contract.IMAGE_COLUMNS)].to_numpy()]


def rate(fn) -> float:
    """Samples per second of ``fn()``, which returns how many samples it processed."""
    start = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - start)


def best_rates(measures: dict, repeats: int) -> dict[str, float]:
    """Best samples/s of each measure over ``repeats`` rounds, the measures interleaved within a round.

    Interleaving exposes every measure to the same background load; the best round is the one least
    disturbed by other processes on a shared machine.
    """
    best = dict.fromkeys(measures, 0.0)
    for _ in range(repeats):
        for key, fn in measures.items():
            best[key] = max(best[key], rate(fn))
    return best


def decode_pass(blobs: list[list[bytes]]) -> int:
    for views in blobs:
        for data in views:
            decode_image(data)
    return len(blobs)


def loader_pass(shards: Path, args) -> int:
    manifest = read_manifest(str(shards))
    n = manifest["splits"]["train"]["count"] * args.epochs
    loader = make_train_loader(
        resolve_shards(str(shards), "train"), batch_size=args.batch_size, num_samples=n, epoch=0, seed=0,
        num_workers=args.workers, shuffle_buffer=256, encoder=LabelEncoder.from_dict(manifest["label_encoder"]),
    )  # fmt: skip
    return sum(len(batch["sample_id"]) for batch in loader)


class SeedStyleDataset(Dataset):
    """The seeds' way: PIL open, resize to 336, normalise, per view, in the workers."""

    def __init__(self, paths: list[list[Path]]):
        self.paths = paths
        self.mean = np.array(CLIP_MEAN, dtype=np.float32)
        self.std = np.array(CLIP_STD, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.paths)

    def view(self, path: Path) -> torch.Tensor:
        img = Image.open(path).convert("RGB").resize((SEED_SIZE, SEED_SIZE), Image.BICUBIC)
        x = (np.asarray(img, dtype=np.float32) / 255 - self.mean) / self.std  # (336, 336, 3)
        return torch.from_numpy(x).permute(2, 0, 1)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.stack([self.view(p) for p in self.paths[i]])  # (4, 3, 336, 336)


def seed_pass(paths: list[list[Path]], args) -> int:
    loader = DataLoader(
        SeedStyleDataset(paths), batch_size=args.batch_size, shuffle=True, num_workers=args.workers
    )
    return sum(len(batch) for _ in range(args.epochs) for batch in loader)


def preprocessor_pass(args, repeats: int = 10) -> int:
    images = torch.randint(0, 256, (args.batch_size, 4, 3, 256, 256), dtype=torch.uint8)
    pre = Preprocessor(SEED_SIZE, CLIP_MEAN, CLIP_STD).eval()
    with torch.inference_mode():
        for _ in range(repeats):
            pre(images)
    return repeats * args.batch_size


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        root, shards = prepare(work, args.n_train)
        paths = view_paths(root)
        blobs = [[p.read_bytes() for p in views] for views in paths]  # read before timing (a)
        view_bytes = sum(len(b) for views in blobs for b in views) / (4 * len(blobs))
        measures = {
            "a": lambda: decode_pass(blobs),
            "b": lambda: loader_pass(shards, args),
            "c": lambda: seed_pass(paths, args),
            "d": lambda: preprocessor_pass(args),
        }
        results = best_rates(measures, args.repeats)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), "
          f"torch {torch.__version__}, {torch.get_num_threads()} torch thread(s), {args.workers} workers")  # fmt: skip
    print(f"data: {len(paths)} generated samples, mean JPEG view {view_bytes / 1024:.1f} KiB")
    labels = {
        "a": "JPEG decode of 4 views, 1 process (ceiling)",
        "b": f"geoloc.data train loader, {args.workers} workers, uint8 256 px",
        "c": f"seeds: PIL open + resize 336 + normalise, {args.workers} workers",
        "d": "Preprocessor alone (256 -> 336 + normalise), CPU",
    }
    for key, label in labels.items():
        print(f"({key}) {label:<58} {results[key]:8.1f} samples/s  {4 * results[key]:8.1f} images/s")
    print(f"b/a = {results['b'] / results['a']:.2f}   b/c = {results['b'] / results['c']:.2f}")


if __name__ == "__main__":
    main()
