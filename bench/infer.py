"""Inference throughput on generated data, and the cost of writing + validating a submission.

    OMP_NUM_THREADS=1 python bench/infer.py [--n-test 240] [--batch-size 32] [--workers 2] [--rows 100000]

One run generates a data set (geoloc.synth), shards it, exports an untrained GeoModel on a tiny CLIP
built locally (the ``--image-size`` input of the backbone; 56 px by default) and prints samples/s
(1 sample = 4 views) of:

  (a) pure JPEG decode of the 4 views in this process, bytes in memory (the data ceiling per core);
  (b) the model alone on batches already decoded in memory (the compute ceiling);
  (c) end to end: ``geoloc.predict.predict`` over the test shards with ``--workers`` loader workers,
      gather and de-duplication included (what ``infer.py`` does before writing);
  (d) the same from the raw test folder (``--data-root`` mode);

then the ratios c/a, c/b and d/c, and the seconds to build, write (temp file + validation + rename)
and validate again a submission of ``--rows`` rows. Record the figures and the machine in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator

from geoloc.config import Config, ModelConfig
from geoloc.contract import SAMPLE_SUBMISSION, read_submission_template
from geoloc.data import decode_image, make_eval_loader, resolve_shards
from geoloc.export import load_model_dir, save_model_dir, vision_config_dict
from geoloc.heads import HeadSizes
from geoloc.infer.ensemble import Ensemble, identity
from geoloc.infer.raw import make_raw_loader
from geoloc.infer.submission import build_submission, validate_submission, write_submission
from geoloc.labels import LabelEncoder
from geoloc.metrics import Prior
from geoloc.model import build_model
from geoloc.predict import Predictions, predict
from geoloc.preprocess import Preprocessor, preprocess_settings
from geoloc.tiny_clip import build_tiny_clip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-test", type=int, default=240, help="generated test samples (4 JPEGs each)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per batch")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for (c) and (d)")
    p.add_argument("--image-size", type=int, default=56, help="input side of the tiny CLIP backbone")
    p.add_argument("--rows", type=int, default=100_000, help="rows of the submission-writing benchmark")
    p.add_argument("--repeats", type=int, default=2, help="runs of each measurement; the best is kept")
    p.add_argument("--work-dir", default="", help="where data, shards and model go (default: a temp dir)")
    return p.parse_args(argv)


def prepare(work: Path, n_test: int, image_size: int) -> tuple[Path, Path, Path]:
    """Data root, its shards (60 samples a shard) and an exported untrained tiny model."""
    from geoloc.sharding import shard_dataset
    from geoloc.synth import generate_dataset

    root, shards, model_dir = work / "data", work / "shards", work / "model"
    generate_dataset(root, n_train=40, n_test=n_test, seed=0)
    shard_dataset(root, shards, val_fraction=0.25, seed=0, samples_per_shard=60, workers=1)
    clip = build_tiny_clip(work / "clip", image_size=image_size)
    encoder = LabelEncoder.fit(pd.read_csv(root / "train_ground_truth.csv")["state_idx"])
    cfg = Config(model=ModelConfig(backbone=str(clip), head_hidden=64))
    model = build_model(cfg.model, HeadSizes(encoder.num_classes))
    save_model_dir(
        model_dir, model_state_dict=model.state_dict(), cfg=cfg, vision_config=vision_config_dict(model),
        embed_dim=model.embed_dim, num_classes=model.num_classes, encoder=encoder,
        preprocess=preprocess_settings(str(clip)), centroids=np.zeros((encoder.num_classes, 2)),
        prior=Prior(tuple(encoder.state_indices[:5]), 39.0, -98.0).to_dict(),
    )  # fmt: skip
    return root, shards, model_dir


def best_rate(fn, n: int, repeats: int) -> float:
    """Samples/s of the fastest of ``repeats`` calls of ``fn`` (each handles ``n`` samples)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n / min(times)


def decode_ceiling(root: Path, template: pd.DataFrame, repeats: int) -> float:
    """(a) the 4 views of every test sample decoded in this process, bytes read beforehand."""
    cols = ["image_north", "image_east", "image_south", "image_west"]
    blobs = [(root / "test_images" / name).read_bytes() for name in template[cols].to_numpy().ravel()]
    return best_rate(lambda: [decode_image(b) for b in blobs], len(blobs) // 4, repeats)


def compute_ceiling(ensemble, batches, repeats: int) -> float:
    """(b) the model on decoded uint8 batches in memory."""

    @torch.no_grad()
    def run():
        for b in batches:
            ensemble(b["images"], b["view_mask"])

    return best_rate(run, sum(len(b["sample_id"]) for b in batches), repeats)


def submission_costs(n: int, encoder: LabelEncoder, work: Path) -> dict[str, float]:
    """Seconds to build, write (with its validation) and re-validate an ``n``-row submission."""
    rng = np.random.default_rng(0)
    ids = [f"{i:07d}" for i in range(n)]
    template = pd.DataFrame({"sample_id": ids, **{f"image_{v}": [f"img_{i}_{v}.jpg" for i in ids] for v in
                             ("north", "east", "south", "west")}})  # fmt: skip
    probs = rng.random((n, encoder.num_classes)).astype(np.float32)
    gps = np.column_stack([rng.uniform(25, 48, n), rng.uniform(-124, -68, n)]).astype(np.float32)
    preds = Predictions(
        sample_id=np.asarray(sorted(ids), dtype=object), label=np.full(n, -1),
        latlon=np.full((n, 2), np.nan, np.float32), n_views=np.full(n, 4),
        values={"state_probs": probs / probs.sum(1, keepdims=True), "gps": gps},
    )  # fmt: skip
    prior = Prior(tuple(encoder.state_indices[:5]), 39.0, -98.0)
    t0 = time.perf_counter()
    sub = build_submission(template, preds, encoder, prior)
    t1 = time.perf_counter()
    write_submission(sub, work / "bench_submission.csv", template)
    t2 = time.perf_counter()
    problems = validate_submission(work / "bench_submission.csv", template)
    t3 = time.perf_counter()
    assert not problems, problems
    return {"build": t1 - t0, "write+validate": t2 - t1, "validate": t3 - t2}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        root, shards, model_dir = prepare(work, args.n_test, args.image_size)
        accelerator = Accelerator(cpu=True)
        loaded = load_model_dir(model_dir)
        p = loaded.preprocess
        pre = Preprocessor(p["image_size"], p["mean"], p["std"])
        ensemble = Ensemble([loaded.model], [pre], [loaded.decoder()]).eval()
        template = read_submission_template(root / SAMPLE_SUBMISSION)
        n = len(template)

        def shard_run():
            loader = make_eval_loader(resolve_shards(str(shards), "test"), batch_size=args.batch_size,
                                      num_workers=args.workers)  # fmt: skip
            predict(ensemble, loader, identity, accelerator, progress=False, batch_size=args.batch_size)

        def raw_run():
            loader = make_raw_loader(root, template, batch_size=args.batch_size, num_workers=args.workers)
            predict(ensemble, loader, identity, accelerator, progress=False, batch_size=args.batch_size)

        batches = list(make_eval_loader(resolve_shards(str(shards), "test"), batch_size=args.batch_size,
                                        num_workers=0))  # fmt: skip
        rates = {
            "a decode": decode_ceiling(root, template, args.repeats),
            "b model": compute_ceiling(ensemble, batches, args.repeats),
            "c e2e shards": best_rate(shard_run, n, args.repeats),
            "d e2e raw": best_rate(raw_run, n, args.repeats),
        }
        costs = submission_costs(args.rows, loaded.encoder, work)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpu(s), torch {torch.__version__}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")  # fmt: skip
    print(
        f"{n} test samples, batch {args.batch_size}, {args.workers} workers, tiny CLIP at {args.image_size} px"
    )
    for name, rate in rates.items():
        print(f"  ({name}): {rate:8.1f} samples/s")
    print(f"  c/a = {rates['c e2e shards'] / rates['a decode']:.2f}   c/b = {rates['c e2e shards'] / rates['b model']:.2f}"
          f"   d/c = {rates['d e2e raw'] / rates['c e2e shards']:.2f}")  # fmt: skip
    print(f"submission of {args.rows} rows: " + ", ".join(f"{k} {v:.2f} s" for k, v in costs.items()))


if __name__ == "__main__":
    main()
