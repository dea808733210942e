"""Data root -> WebDataset tar shards + ``manifest.json`` (the ``shard_dataset.py`` tool).

    python shard_dataset.py --data-root ROOT --out DIR [--val-fraction 0.1] [--seed 0] \\
        [--samples-per-shard 1000] [--workers N] [--strict] [--allow-outside-root]

Writes ``DIR/{train,val,test}-NNNNNN.tar``; per sample ``<key>.{north,east,south,west}.jpg`` (the
original bytes, never re-encoded) and ``<key>.json``. Every view is decoded first (in parallel with
``--workers``); the seeded train/val split stratified by state, the shard plan and the label encoder
then use only the kept samples, so no shard is empty and every class has a training sample. A bad
training sample (missing/undecodable view, bad coordinate, unknown state, state name disagreeing with
the mapping, image cell outside the data root, duplicated id) is skipped, listed in the manifest and
printed (``--strict``: an error instead); a test sample is never skipped, its unreadable or refused
views are recorded in ``missing_views``. ``--out`` is checked before any work (writable, and not the
data root or one of its image folders). All output bytes, the manifest's included,
depend only on the data and the flags, not on ``--workers``. Each shard is written to ``NAME.tmp`` and
renamed, the manifest last (a failed run removes its temporaries): a directory without
``manifest.json`` is an unfinished run, and rerunning finishes it.

This module is the run and its CLI; the stages live in, in run order: ``rows`` (CSVs -> samples),
``check`` (decode every view), ``plan`` (train/val split, shard plan), ``write`` (the tar shards),
``manifest`` (manifest.json, labels.csv, console summary), with ``workers`` (the ordered process pool).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from geoloc import contract
from geoloc.sharding.check import check_samples, view_problem
from geoloc.sharding.manifest import (
    LABEL_COLUMNS,
    MANIFEST_VERSION,
    build_manifest,
    require_training_data,
    summarize,
    write_labels,
    write_manifest,
)
from geoloc.sharding.plan import SPLITS, plan_splits, split_counts, stratified_split
from geoloc.sharding.rows import Sample, read_test_samples, read_train_samples
from geoloc.sharding.workers import default_workers, ordered_map
from geoloc.sharding.write import (
    LABELS,
    MANIFEST,
    SHARD_RE,
    TMP_SUFFIX,
    check_out_dir,
    remove_temporaries,
    write_atomic,
    write_shards,
)
from geoloc.writable import OutputPathError

__all__ = [
    "LABELS",
    "LABEL_COLUMNS",
    "MANIFEST",
    "MANIFEST_VERSION",
    "SHARD_RE",
    "SPLITS",
    "TMP_SUFFIX",
    "Sample",
    "check_samples",
    "main",
    "parse_args",
    "shard_dataset",
    "split_counts",
    "stratified_split",
    "view_problem",
    "write_atomic",
]


def check_args(val_fraction: float, samples_per_shard: int, workers: int) -> None:
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction}: must be in [0, 1)")
    if samples_per_shard < 1 or workers < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard}, workers={workers}: both must be >= 1")


def shard_dataset(
    data_root: str | Path,
    out_dir: str | Path,
    val_fraction: float = 0.1,
    seed: int = 0,
    samples_per_shard: int = 1000,
    workers: int = 1,
    strict: bool = False,
    progress: bool = True,
    allow_outside_root: bool = False,
) -> dict:
    """Write the shards and ``manifest.json`` of a data root; returns the manifest.

    Every sample is checked first; the split, the shard plan and the label encoder use only the kept
    ones, so no shard is empty and every class has a training sample. A failed run removes its
    temporaries and leaves no manifest. ``allow_outside_root`` lets image cells be absolute paths or
    hold ``..`` (else such a training row is skipped and such a test view recorded missing)."""
    check_args(val_fraction, samples_per_shard, workers)
    root, out = Path(data_root).resolve(), Path(out_dir)
    check_out_dir(root, out)  # before any work: an unwritable --out must not cost the decode phase
    states = contract.read_state_mapping(root)
    train, skipped = read_train_samples(root, states, strict, allow_outside_root)
    test = read_test_samples(root, allow_outside_root)
    try:
        with ordered_map(min(workers, len(train) + len(test))) as imap:
            kept, image_skipped, missing = check_samples(train + test, imap, strict, progress)
            plan = plan_splits(kept, seed, val_fraction, samples_per_shard)
            skipped += image_skipped
            manifest = build_manifest(root, seed, val_fraction, states, plan, skipped, missing)
            require_training_data(manifest, root, out)
            write_shards(out, plan, imap, progress)
    except BaseException:
        if out.is_dir():
            remove_temporaries(out)
        raise
    write_labels(out, plan)
    write_manifest(out, manifest)  # last: a directory without it is an unfinished run
    print("\n".join(summarize(manifest, out)))
    return manifest


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="shard_dataset.py",
        description="Write WebDataset tar shards ({train,val,test}-NNNNNN.tar) and manifest.json from a "
        "competition data root. Bad training samples are skipped and listed; test samples are never skipped.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--data-root",
        required=True,
        type=Path,
        help="data root with train_images/, test_images/, train_ground_truth.csv, sample_submission.csv, "
        "state_mapping.csv",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        help="output directory (not the data root or one of its image folders); shards, temporaries and the "
        "manifest of an earlier run there are replaced, other files are left alone",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share of each state's training samples held out as 'val' (a state's last sample stays in train)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the train/val split and of the sample order"
    )
    parser.add_argument(
        "--samples-per-shard", type=int, default=1000, help="samples per tar shard (last is smaller)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="processes that check images and write shards in parallel (default: min(8, CPU count), "
        "%(default)s here); the output is byte-identical for any number",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="stop with an error naming the sample and file at the first bad sample instead of skipping it",
    )
    parser.add_argument(
        "--allow-outside-root",
        action="store_true",
        help="accept image cells that are absolute paths or contain '..' (files outside the data root); "
        "by default such a training row is skipped (bad_path) and such a test view recorded as missing",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    try:
        check_args(args.val_fraction, args.samples_per_shard, args.workers)
    except ValueError as err:
        parser.error(str(err))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        shard_dataset(
            args.data_root,
            args.out,
            args.val_fraction,
            args.seed,
            args.samples_per_shard,
            args.workers,
            args.strict,
            progress=not args.no_progress,
            allow_outside_root=args.allow_outside_root,
        )
    except (contract.DataContractError, OutputPathError) as err:
        sys.exit(f"error: {err}")
