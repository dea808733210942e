"""A planned run -> ``manifest.json``, ``labels.csv`` beside it, and the console summary.

Every count and the label encoder are known from the plan before any shard is written; the manifest
lists every skipped sample and every missing test view, the console the first ``SHOW_AT_MOST``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd

from geoloc import contract
from geoloc.fileio import file_sha256
from geoloc.labels import LabelEncoder
from geoloc.sharding.duplicates import summary_lines
from geoloc.sharding.plan import SPLITS
from geoloc.sharding.write import LABELS, MANIFEST, write_atomic

LABEL_COLUMNS = ("split", "sample_id", "state_idx", "lat", "lon")
MANIFEST_VERSION = 1
SHOW_AT_MOST = 50  # skipped samples printed one per line on the console; the manifest lists them all


def build_manifest(
    root: Path, seed: int, val_fraction: float, states: dict[int, str], plan, skipped, missing, near=None
):
    """The manifest of a planned run: every count and the label encoder are known before writing.
    ``near`` is the ``--dedup`` section (``geoloc.sharding.duplicates``), under ``near_duplicates``."""
    splits = {s: {"count": 0, "shards": {}} for s in SPLITS}
    for split, (name, samples) in plan:
        splits[split]["count"] += len(samples)
        splits[split]["shards"][name] = len(samples)
    labels = [s.state_idx for split, (_, samples) in plan if split != "test" for s in samples]
    sources = {
        n: file_sha256(root / n)
        for n in (contract.TRAIN_CSV, contract.SAMPLE_SUBMISSION, contract.STATE_MAPPING)
    }
    return {
        "version": MANIFEST_VERSION,
        "data_root": str(root),
        "seed": seed,
        "val_fraction": val_fraction,
        "csv_sha256": sources[contract.TRAIN_CSV],  # kept for readers of earlier manifests
        "source_sha256": sources,
        "label_encoder": LabelEncoder.fit(labels, states).to_dict(),
        "splits": splits,
        "skipped": skipped,
        "missing_views": missing,
        "labels_file": LABELS,
        **({"near_duplicates": near} if near is not None else {}),
    }


def write_manifest(out: Path, manifest: dict) -> None:
    write_atomic(out / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2).encode()))


def labels_table(plan) -> pd.DataFrame:
    """``split, sample_id, state_idx, lat, lon`` of every labelled sample, in shard order."""
    rows = [
        (split, s.sample_id, s.state_idx, s.lat, s.lon)
        for split, (_, samples) in plan
        if split != "test"
        for s in samples
    ]
    return pd.DataFrame(rows, columns=list(LABEL_COLUMNS))


def write_labels(out: Path, plan) -> None:
    # repr-exact floats (float_format None) so the trainer's centroids equal those from the shards' JSON
    table = labels_table(plan)
    write_atomic(out / LABELS, lambda f: f.write(table.to_csv(index=False).encode()))


def entry_lines(entries: list[dict], out_dir: Path) -> list[str]:
    """One line per entry (sample id, split, reason), the first ``SHOW_AT_MOST``; the rest counted."""
    lines = [f"  {e['sample_id']} ({e['split']}): {e['reason']}" for e in entries[:SHOW_AT_MOST]]
    if len(entries) > SHOW_AT_MOST:
        lines.append(f"  ... and {len(entries) - SHOW_AT_MOST} more (all in {out_dir / MANIFEST})")
    return lines


def problem_lines(manifest: dict, out_dir: Path) -> list[str]:
    """Skipped samples and missing test views: a count per reason code, then the entries."""
    lines = []
    for key, what in (("skipped", "skipped"), ("missing_views", "test views missing (sample kept)")):
        entries = manifest[key]
        if entries:
            by_code = Counter(e["reason"].split(":")[0] for e in entries)
            codes = ", ".join(f"{c} {n}" for c, n in sorted(by_code.items()))
            lines += [f"{len(entries)} {what}: {codes}", *entry_lines(entries, out_dir)]
    return lines


def summarize(manifest: dict, out_dir: Path) -> list[str]:
    splits = manifest["splits"]
    counts = ", ".join(f"{s} {splits[s]['count']}" for s in SPLITS)
    shards = sum(len(splits[s]["shards"]) for s in SPLITS)
    return [
        f"wrote {counts} samples in {shards} shards to {out_dir}",
        *problem_lines(manifest, out_dir),
        *summary_lines(manifest.get("near_duplicates")),
    ]


def require_training_data(manifest: dict, root: Path, out: Path) -> None:
    """Stop before writing anything when no training sample is left, printing why."""
    if not manifest["label_encoder"]["state_indices"]:
        print("\n".join(problem_lines(manifest, out)))
        raise contract.DataContractError(
            f"{root / contract.TRAIN_CSV}: no usable training sample (see above)"
        )
