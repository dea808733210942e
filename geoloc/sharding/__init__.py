"""Data root -> WebDataset tar shards + ``manifest.json`` (the ``shard_dataset.py`` tool).

    python shard_dataset.py --data-root ROOT --out DIR [--val-fraction 0.1] [--seed 0] \\
        [--samples-per-shard 1000] [--workers N] [--strict] [--allow-outside-root] \\
        [--dedup {report,drop,off}] [--dedup-threshold 128]

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

Near-duplicates (``--dedup``, default ``report``): the decode pass also hashes every view (a perceptual
hash, ``dedup``); after the split, train samples whose views near-duplicate a val, test or other train
sample are counted and listed (manifest ``near_duplicates``, console); ``drop`` removes the train side
of train/val and train/test pairs before the shard plan (``duplicates``); ``off`` hashes nothing.

This module is the run and its CLI; the stages live in, in run order: ``rows`` (CSVs -> samples),
``check`` (decode every view), ``plan`` (train/val split, shard plan), ``write`` (the tar shards),
``duplicates`` (``--dedup``, on ``dedup``'s hashes), ``manifest`` (manifest.json, labels.csv, console
summary), with ``workers`` (the ordered process pool).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from geoloc import contract
from geoloc.sharding.check import check_samples, view_problem
from geoloc.sharding.dedup import DEFAULT_THRESHOLD, MODES
from geoloc.sharding.duplicates import dedup_splits, hash_key
from geoloc.sharding.manifest import (
    LABEL_COLUMNS,
    MANIFEST_VERSION,
    build_manifest,
    require_training_data,
    summarize,
    write_labels,
    write_manifest,
)
from geoloc.sharding.plan import SPLITS, plan_split_shards, split_counts, split_samples, stratified_split
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
    "dedup_splits",
    "main",
    "parse_args",
    "shard_dataset",
    "split_counts",
    "stratified_split",
    "view_problem",
    "write_atomic",
]


def check_args(
    val_fraction: float,
    samples_per_shard: int,
    workers: int,
    dedup: str = "report",
    threshold: int = DEFAULT_THRESHOLD,
) -> None:
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction}: must be in [0, 1)")
    if samples_per_shard < 1 or workers < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard}, workers={workers}: both must be >= 1")
    if dedup not in MODES:
        raise ValueError(f"dedup={dedup!r}: must be one of {list(MODES)}")
    if not 0 <= threshold <= 1024:
        raise ValueError(f"dedup_threshold={threshold}: must be in [0, 1024] (differing bits per view)")


def check_and_split(samples, imap, seed, val_fraction, strict, progress, dedup, threshold):
    """Decode (and hash) every view, split train/val, then the ``--dedup`` step: ``(splits, skip entries,
    missing-view records, near_duplicates section)``."""
    hashing = dedup != "off"
    kept, skipped, missing, hashes = check_samples(samples, imap, strict, progress, hashing)
    splits = split_samples(kept, seed, val_fraction)
    by_key = {hash_key(s): h for s, h in zip(kept, hashes)} if hashing else None
    splits, dropped, near = dedup_splits(splits, by_key, dedup, threshold)
    return splits, skipped + dropped, missing, near


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
    dedup: str = "report",
    dedup_threshold: int = DEFAULT_THRESHOLD,
) -> dict:
    """Write the shards and ``manifest.json`` of a data root; returns the manifest.

    Every sample is checked first; the split, the shard plan and the label encoder use only the kept
    ones, so no shard is empty and every class has a training sample. A failed run removes its
    temporaries and leaves no manifest. ``allow_outside_root`` lets image cells be absolute paths or
    hold ``..`` (else such a training row is skipped and such a test view recorded missing). ``dedup``:
    ``report`` near-duplicates, ``drop`` the train side of train/val and train/test ones, or ``off``."""
    check_args(val_fraction, samples_per_shard, workers, dedup, dedup_threshold)
    root, out = Path(data_root).resolve(), Path(out_dir)
    check_out_dir(root, out)  # before any work: an unwritable --out must not cost the decode phase
    states = contract.read_state_mapping(root)
    train, skipped = read_train_samples(root, states, strict, allow_outside_root)
    test = read_test_samples(root, allow_outside_root)
    try:
        with ordered_map(min(workers, len(train) + len(test))) as imap:
            splits, checked_skips, missing, near = check_and_split(
                train + test, imap, seed, val_fraction, strict, progress, dedup, dedup_threshold
            )
            plan = plan_split_shards(splits, seed, samples_per_shard)
            skipped += checked_skips
            manifest = build_manifest(root, seed, val_fraction, states, plan, skipped, missing, near)
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
    parser.add_argument(
        "--dedup",
        choices=MODES,
        default="report",
        help="near-duplicate samples (a perceptual hash per view, computed while decoding): 'report' counts "
        "train/val, train/test and train/train pairs in the manifest and on the console; 'drop' also removes "
        "the train sample of each train/val and train/test pair (never a val or test sample, never a state's "
        "last training sample); 'off' hashes nothing",
    )
    parser.add_argument(
        "--dedup-threshold",
        type=int,
        default=DEFAULT_THRESHOLD,
        help="most hash bits (of 1024) that may differ per view, averaged over the views both samples have, "
        "for a near-duplicate; on generated data, copies re-encoded at JPEG quality >= 70 or resized "
        "256->240/272 px measured <= 127, distinct samples >= 147",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    try:
        check_args(args.val_fraction, args.samples_per_shard, args.workers, args.dedup, args.dedup_threshold)
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
            dedup=args.dedup,
            dedup_threshold=args.dedup_threshold,
        )
    except (contract.DataContractError, OutputPathError) as err:
        sys.exit(f"error: {err}")
