"""What the auxiliary heads (``metric``, ``vae``) cost per training step, against the default heads.

    OMP_NUM_THREADS=2 python bench/aux_heads.py [--batch 256] [--dim 768] [--steps 30]

A phase-1 step on cached view embeddings: ``forward_head`` of random (B, 4, D) embeddings (D = 768,
StreetCLIP's projection) + the criterion + backward + AdamW, for heads [state, gps] (the baseline, measured
in the same run), + metric, + vae, + both. The metric term's in-batch mining is a (B, G) similarity and
distance matrix (G = B here: one process), the bandit's progress signal a (G, G) one. In phase 2 the same
absolute cost adds to a backbone forward/backward that is hundreds of times larger. Prints the median step
time and the ratio to the baseline (> 1: slower).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from geoloc.config import LossConfig, ModelConfig
from geoloc.geo import distance_matrix
from geoloc.heads import HeadSizes, Targets
from geoloc.losses import Criterion
from geoloc.metric import build_miner, location_tables
from geoloc.model import GeoModel, head_parameters

VARIANTS = {"state+gps": ["state", "gps"], "+metric": ["state", "gps", "metric"],
            "+vae": ["state", "gps", "vae"], "+metric+vae": ["state", "gps", "metric", "vae"]}  # fmt: skip
NUM_CLASSES = 50


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256, help="samples a step (train.frozen_batch_size)")
    p.add_argument("--dim", type=int, default=768, help="view embedding width")
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant (after 3 warm-up)")
    return p.parse_args(argv)


def fake_labels(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Points in the US box and a class per 'state' (a grid of 10 x 5 rectangles)."""
    lat, lon = rng.uniform(25, 49, n), rng.uniform(-124, -67, n)
    classes = (np.digitize(lon, np.linspace(-124, -67, 11)[1:-1]) * 5
               + np.digitize(lat, np.linspace(25, 49, 6)[1:-1]))  # fmt: skip
    return np.stack([lat, lon], 1), classes


def criterion(heads: list[str], latlon: np.ndarray, classes: np.ndarray) -> Criterion:
    from types import SimpleNamespace

    centroids = torch.tensor(
        np.stack([latlon[classes == c].mean(0) for c in range(NUM_CLASSES)]), dtype=torch.float32
    )
    loss = LossConfig()
    metric = None
    if "metric" in heads:
        tables = location_tables(latlon, classes, NUM_CLASSES, loss.metric_neighbour_km, loss.metric_d_pos_km)
        metric = build_miner(SimpleNamespace(loss=loss), tables, "cpu")
    targets = Targets(
        centroids, distance_matrix(centroids), None, "sample", loss.tau_km, "haversine", metric=metric
    )
    return Criterion(heads, loss.weights, targets)


def make_step(heads: list[str], args, latlon, classes):
    """One variant's training step on a batch: forward_head + criterion + backward + AdamW."""
    torch.manual_seed(0)
    model = GeoModel(torch.nn.Identity(), args.dim, ModelConfig(heads=heads), HeadSizes(NUM_CLASSES))
    opt = torch.optim.AdamW(head_parameters(model), lr=1e-3)
    crit = criterion(heads, latlon, classes)

    def step(batch: dict) -> None:
        out = model.forward_head(batch["emb"], batch["view_mask"])  # heads' outputs of (B, V, D) embeddings
        crit(out, crit.loss_batch(batch, "cpu"))["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def time_variants(args, batches: list[dict], latlon, classes) -> dict[str, float]:
    """Median step time per variant, the variants interleaved batch by batch (round robin) so that a
    change in the machine's load hits every variant alike; the first 3 batches warm up."""
    steps = {name: make_step(heads, args, latlon, classes) for name, heads in VARIANTS.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i, batch in enumerate(batches):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step(batch)
            if i >= 3:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def make_batches(args, latlon, classes) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(args.steps + 3):
        rows = torch.randint(0, len(latlon), (args.batch,), generator=g)
        out.append({
            "emb": torch.randn(args.batch, 4, args.dim, generator=g),
            "view_mask": torch.ones(args.batch, 4, dtype=torch.bool),
            "thumb": torch.randint(0, 256, (args.batch, 4, 3, 16, 16), generator=g, dtype=torch.uint8),
            "label": torch.as_tensor(classes[rows]), "latlon": torch.as_tensor(latlon[rows], dtype=torch.float32),
        })  # fmt: skip
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    latlon, classes = fake_labels(20_000, np.random.default_rng(0))
    batches = make_batches(args, latlon, classes)
    t0 = time.perf_counter()
    location_tables(latlon, classes, NUM_CLASSES, 100.0, 250.0)
    setup = time.perf_counter() - t0
    times = time_variants(args, batches, latlon, classes)
    base = times["state+gps"]
    print(
        f"\nphase-1 step on cached embeddings, batch {args.batch}, D {args.dim}, {torch.get_num_threads()} threads"
    )
    print("| heads | step (ms) | ratio to state+gps |")
    print("|---|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {1000 * t:.1f} | {t / base:.2f} |")
    print(f"\nonce per run: neighbouring states + positive rate of 20,000 train points: {setup:.2f} s")
    return {"times": times, "setup_s": setup}


if __name__ == "__main__":
    main()
