"""The ``--dedup`` step of a sharding run: near-duplicate pairs across the planned splits, and (``drop``)
the train samples that copy a val or test sample.

Runs after the train/val split and before the shard plan. Only pairs with a train sample are looked
for: ``train_test`` (a test sample's views are in the training data), ``train_val`` (the validation
score is flattered) and ``train_train`` (counted only). ``drop`` removes the train side of every
``train_test`` / ``train_val`` pair (skip codes ``duplicate_of_test`` / ``duplicate_of_val``), never a val
or test sample, and never a state's last training sample (such a sample is kept and listed). The
manifest's ``near_duplicates`` section counts every pair and lists the first ``LIST_AT_MOST``.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from geoloc import contract
from geoloc.sharding.dedup import (
    COARSE_PER_VIEW,
    HASH_SIDE,
    MIN_SHARED_VIEWS,
    hash_matrix,
    near_pairs,
)
from geoloc.sharding.plan import SPLITS
from geoloc.sharding.rows import DUPLICATE_OF_TEST, DUPLICATE_OF_VAL, Sample, skip_entry

PAIR_KINDS = ("train_test", "train_val", "train_train")  # listing order: the worst leak first
LIST_AT_MOST = 1000  # pairs listed in the manifest (all are counted)
SHOW_AT_MOST = 10  # pairs printed on the console
HASH_NAME = f"imagehash.phash {HASH_SIDE}x{HASH_SIDE} per view ({HASH_SIDE * HASH_SIDE} bits)"


def hash_key(sample: Sample) -> tuple[str, str]:
    """Train (and val) ids and test ids are unique within their CSV, not across: key by both."""
    return ("test" if sample.split == "test" else "train", sample.sample_id)


def pair_entry(x: tuple[str, Sample], y: tuple[str, Sample], bits: int, views: int) -> dict:
    """A manifest entry, the train sample first (the lower id of two train samples)."""
    (_, a), (sy, b) = sorted([x, y], key=lambda p: (p[0] != "train", p[1].sample_id))
    return {
        "kind": f"train_{sy}",
        "train": a.sample_id,
        "other": b.sample_id,
        "bits_per_view": round(bits / views, 1),  # differing bits of 1024, averaged over the shared views
        "views": views,
    }


def find_pairs(splits: dict[str, list[Sample]], hashes: dict, threshold: int) -> list[dict]:
    """Every near-duplicate pair with a train sample, as manifest entries in listing order."""
    order = [(split, s) for split in SPLITS for s in splits[split]]
    codes, present = hash_matrix([hashes[hash_key(s)] for _, s in order])
    query = np.array([split == "train" for split, _ in order], dtype=bool)
    i, j, bits, views = near_pairs(codes, present, query, threshold)
    entries = [
        pair_entry(order[a], order[b], d, v) for a, b, d, v in zip(i, j, bits.tolist(), views.tolist())
    ]
    return sorted(entries, key=lambda e: (PAIR_KINDS.index(e["kind"]), e["train"], e["other"]))


def drop_reasons(pairs: list[dict]) -> dict[str, str]:
    """Train id -> skip reason, naming its first test (else val) twin."""
    reasons = {}
    for e in pairs:  # train_test pairs come first
        code = {"train_test": DUPLICATE_OF_TEST, "train_val": DUPLICATE_OF_VAL}.get(e["kind"])
        if code and e["train"] not in reasons:
            split = e["kind"].removeprefix("train_")
            reasons[e["train"]] = (
                f"{code}: near-duplicate of {split} sample {e['other']!r} ({e['bits_per_view']} of "
                f"{HASH_SIDE * HASH_SIDE} hash bits differ per view, over {e['views']} views)"
            )
    return reasons


def drop_duplicates(train: list[Sample], pairs: list[dict]) -> tuple[list[Sample], list[dict], list[str]]:
    """``(train left, skip entries, ids kept as their state's last training sample)``; order is kept."""
    reasons, left = drop_reasons(pairs), Counter(s.state_idx for s in train)
    kept, skipped, kept_last = [], [], []
    for s in train:
        if s.sample_id in reasons and left[s.state_idx] > 1:
            left[s.state_idx] -= 1
            skipped.append(skip_entry(s.sample_id, "train", reasons[s.sample_id]))
        else:
            kept_last += [s.sample_id] if s.sample_id in reasons else []
            kept.append(s)
    return kept, skipped, kept_last


def not_compared(splits: dict[str, list[Sample]]) -> int:
    """Samples with fewer readable views than a comparison needs (test samples only: train ones have 4)."""
    views = len(contract.VIEWS)
    return sum(views - len(s.missing_views) < MIN_SHARED_VIEWS for split in SPLITS for s in splits[split])


def dedup_splits(splits: dict[str, list[Sample]], hashes: dict | None, mode: str, threshold: int):
    """``(splits, skip entries, manifest section)`` of the ``--dedup`` step; ``off`` changes nothing."""
    if mode == "off":
        return splits, [], {"mode": "off"}
    pairs = find_pairs(splits, hashes, threshold)
    skipped, kept_last = [], []
    if mode == "drop":
        train, skipped, kept_last = drop_duplicates(splits["train"], pairs)
        splits = {**splits, "train": train}
    counts = Counter(e["kind"] for e in pairs)
    section = {
        "mode": mode,
        "hash": HASH_NAME,
        "threshold": threshold,
        "coarse_threshold": COARSE_PER_VIEW,
        "min_shared_views": MIN_SHARED_VIEWS,
        **{kind: counts[kind] for kind in PAIR_KINDS},
        "not_compared": not_compared(splits),
        "dropped": len(skipped),
        "kept_last_of_state": kept_last,
        "pairs": pairs[:LIST_AT_MOST],
    }
    return splits, skipped, section


def summary_lines(section: dict | None) -> list[str]:
    """The console's near-duplicate lines: counts, then the first ``SHOW_AT_MOST`` pairs."""
    if not section or section["mode"] == "off":
        return []
    counts = ", ".join(f"{k.replace('_', '-')} {section[k]}" for k in PAIR_KINDS)
    lines = [f"near-duplicates (--dedup {section['mode']}, threshold {section['threshold']}): {counts}"]
    total = sum(section[k] for k in PAIR_KINDS)
    for e in section["pairs"][:SHOW_AT_MOST]:
        split = e["kind"].removeprefix("train_")
        lines.append(
            f"  {e['train']} (train) ~ {e['other']} ({split}): {e['bits_per_view']} bits/view, {e['views']} views"
        )
    if total > SHOW_AT_MOST:
        lines.append(f"  ... and {total - SHOW_AT_MOST} more (the first {LIST_AT_MOST} in the manifest)")
    if section["kept_last_of_state"]:
        lines.append(f"  kept (last training sample of their state): {section['kept_last_of_state']}")
    return lines
