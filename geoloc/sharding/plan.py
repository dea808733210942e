"""Checked samples -> the seeded train/val split (stratified by state) and the shard plan.

A plan is a list of ``(split, (shard name, samples))`` in split order; it depends only on the kept
samples, the seed, the validation fraction and the shard size, never on the CSV's row order.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from geoloc.sharding.rows import Sample

SPLITS = ("train", "val", "test")


def split_counts(sizes: dict[int, int], val_fraction: float) -> dict[int, int]:
    """Validation samples per state: proportional, totalling round(N * fraction) (largest remainder);
    every state keeps at least one training sample, so a state with one sample stays in train."""
    quota = {s: n * val_fraction for s, n in sizes.items()}
    counts = {s: min(int(q), sizes[s] - 1) for s, q in quota.items()}
    target = int(sum(sizes.values()) * val_fraction + 0.5)
    for s in sorted(sizes, key=lambda s: (int(quota[s]) - quota[s], s)):  # largest remainder first
        if sum(counts.values()) >= target:
            break
        counts[s] += counts[s] < sizes[s] - 1
    return counts


def stratified_split(
    samples: list[Sample], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Seeded train/val split per state; independent of the CSV's row order."""
    by_state: dict[int, list[Sample]] = {}
    for s in sorted(samples, key=lambda s: s.sample_id):
        by_state.setdefault(s.state_idx, []).append(s)
    counts = split_counts({k: len(v) for k, v in by_state.items()}, val_fraction)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for state in sorted(by_state):
        group = by_state[state]
        is_val = np.zeros(len(group), dtype=bool)
        is_val[rng.permutation(len(group))[: counts[state]]] = True
        train += [s for s, v in zip(group, is_val) if not v]
        val += [replace(s, split="val") for s, v in zip(group, is_val) if v]
    return train, val


def plan_shards(samples: list[Sample], split: str, seed: int, per_shard: int) -> list[tuple[str, tuple]]:
    """Shuffle a split (seeded) and cut it into ``(shard name, samples)`` of ``per_shard`` samples."""
    order = np.random.default_rng([seed, SPLITS.index(split)]).permutation(len(samples))
    shuffled = [samples[i] for i in order]
    return [
        (f"{split}-{i // per_shard:06d}.tar", tuple(shuffled[i : i + per_shard]))
        for i in range(0, len(shuffled), per_shard)
    ]


def split_samples(kept: list[Sample], seed: int, val_fraction: float) -> dict[str, list[Sample]]:
    """``{split: samples}`` of the checked samples: the seeded stratified train/val split, and test."""
    train, val = stratified_split([s for s in kept if s.split == "train"], val_fraction, seed)
    return {"train": train, "val": val, "test": [s for s in kept if s.split == "test"]}


def plan_split_shards(splits: dict[str, list[Sample]], seed: int, per_shard: int) -> list[tuple[str, tuple]]:
    """``(split, (shard name, samples))`` for every shard of the splits, in split order."""
    return [(split, p) for split in SPLITS for p in plan_shards(splits[split], split, seed, per_shard)]


def plan_splits(
    kept: list[Sample], seed: int, val_fraction: float, per_shard: int
) -> list[tuple[str, tuple]]:
    """``(split, (shard name, samples))`` for every shard of the checked samples, in split order."""
    return plan_split_shards(split_samples(kept, seed, val_fraction), seed, per_shard)
