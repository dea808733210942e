"""Data root -> WebDataset tar shards + ``manifest.json`` (the ``shard_dataset.py`` tool).

    python shard_dataset.py --data-root ROOT --out DIR [--val-fraction 0.1] [--seed 0] \\
        [--samples-per-shard 1000] [--workers N] [--strict]

Writes ``DIR/{train,val,test}-NNNNNN.tar``; per sample ``<key>.{north,east,south,west}.jpg`` (the
original bytes, never re-encoded) and ``<key>.json``. Every view is decoded first (in parallel with
``--workers``); the seeded train/val split stratified by state, the shard plan and the label encoder
then use only the kept samples, so no shard is empty and every class has a training sample. A bad
training sample (missing/undecodable view, bad coordinate, unknown state, duplicated id) is skipped,
listed in the manifest and printed (``--strict``: an error instead); a test sample is never skipped,
its unreadable views are recorded in ``missing_views``. All output bytes, the manifest's included,
depend only on the data and the flags, not on ``--workers``. Each shard is written to ``NAME.tmp`` and
renamed, the manifest last (a failed run removes its temporaries): a directory without
``manifest.json`` is an unfinished run, and rerunning finishes it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing as mp
import os
import re
import sys
import tarfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from geoloc import contract
from geoloc.labels import LabelEncoder

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
LABELS = "labels.csv"  # beside the manifest: labels of train+val, so a trainer need not stream every tar
LABEL_COLUMNS = ("split", "sample_id", "state_idx", "lat", "lon")
MANIFEST_VERSION = 1
SHARD_RE = re.compile(r"^(train|val|test)-\d{6}\.tar$")
TMP_SUFFIX = ".tmp"
SHOW_AT_MOST = 50  # skipped samples printed one per line on the console; the manifest lists them all
CHECK_CHUNK = 16  # samples per worker task while checking: fewer round trips, results still in order
OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")  # "<_io.BytesIO object at 0x7f..>"
# skip reasons start with one of these codes (counted in the console summary)
MISSING_VIEW, BAD_IMAGE, BAD_COORDINATE, UNKNOWN_STATE, DUPLICATE_ID = (
    "missing_view",
    "bad_image",
    "bad_coordinate",
    "unknown_state",
    "duplicate_id",
)


@dataclass(frozen=True)
class Sample:
    """One location as read from a CSV row; labels are None for test samples."""

    sample_id: str
    split: str
    paths: tuple[str | None, ...]  # per view (VIEWS order); None when the CSV names no file
    state_idx: int | None = None
    lat: float | None = None
    lon: float | None = None
    missing_views: tuple[str, ...] = ()  # a test sample's views found unreadable by the check


@dataclass(frozen=True)
class ShardTask:
    out_dir: str
    name: str  # e.g. "train-000003.tar"
    samples: tuple[Sample, ...]  # checked samples only, so never empty


# ---------------------------------------------------------------- reading the CSVs


def skip_entry(sample_id: str, split: str, reason: str) -> dict:
    return {"sample_id": str(sample_id), "split": split, "reason": reason}


def resolve_image(root: Path, folder: str, name) -> str | None:
    """The file a CSV image cell names: relative to the images folder, else to the data root."""
    if pd.isna(name) or not str(name).strip():
        return None
    path = root / folder / str(name)
    if not path.exists() and (root / str(name)).exists():
        path = root / str(name)
    return str(path)


def parse_labels(row: dict, states: dict[int, str]) -> tuple[tuple[int, float, float] | None, str | None]:
    """``((state_idx, lat, lon), None)`` for a usable training row, else ``(None, why not)``."""
    idx = pd.to_numeric(row["state_idx"], errors="coerce")
    if pd.isna(idx) or not float(idx).is_integer() or int(idx) not in states:
        return None, f"{UNKNOWN_STATE}: state_idx {row['state_idx']!r} is not in {contract.STATE_MAPPING}"
    coords = []
    for col, bound in (("latitude", 90.0), ("longitude", 180.0)):
        value = pd.to_numeric(row[col], errors="coerce")
        if pd.isna(value) or not -bound <= float(value) <= bound:
            return None, f"{BAD_COORDINATE}: {col} {row[col]!r} is not a number in [-{bound:g}, {bound:g}]"
        coords.append(float(value))
    return (int(idx), *coords), None


def duplicate_lines(ids: list[str]) -> dict[str, list[int]]:
    """Shard key -> CSV line numbers, for keys used by more than one row (the header is line 1)."""
    lines: dict[str, list[int]] = {}
    for i, sid in enumerate(ids):
        lines.setdefault(contract.sample_key(sid), []).append(i + 2)
    return {k: v for k, v in lines.items() if len(v) > 1}


def fail_or_skip(strict: bool, entry: dict, where: str = "") -> dict:
    """The skip entry, or (``--strict``) an error naming the sample, the file and the problem."""
    if strict:
        where = f"{where}: " if where else ""
        raise contract.DataContractError(f"{where}sample {entry['sample_id']!r}: {entry['reason']}")
    return entry


def read_train_samples(root: Path, states: dict[int, str], strict: bool) -> tuple[list[Sample], list[dict]]:
    """Valid-looking training rows as samples, plus skip entries for the rows that are not."""
    rows = contract.read_train_table(root).to_dict("records")
    dups = duplicate_lines([r["sample_id"] for r in rows])
    samples, skipped = [], []
    for line, row in enumerate(rows, start=2):
        sid = str(row["sample_id"])
        key = contract.sample_key(sid)
        labels, problem = parse_labels(row, states)
        if key in dups:  # which row is right is unknowable: skip all of them
            problem = f"{DUPLICATE_ID}: sample_id {sid!r} (key {key!r}) on CSV lines {dups[key]}"
        if problem:
            entry = skip_entry(sid, "train", problem)
            skipped.append(fail_or_skip(strict, entry, f"{root / contract.TRAIN_CSV}, line {line}"))
            continue
        paths = tuple(resolve_image(root, contract.TRAIN_IMAGES, row[c]) for c in contract.IMAGE_COLUMNS)
        samples.append(Sample(sid, "train", paths, *labels))
    return samples, skipped


def read_test_samples(root: Path, strict: bool) -> tuple[list[Sample], list[dict]]:
    """Every test sample is kept; a repeated id keeps its first row (the submission has one row per id).

    Two different ids with one shard key would lose a test sample: an error naming both."""
    path = root / contract.SAMPLE_SUBMISSION
    rows = contract.read_submission_template(path).to_dict("records")
    dups = duplicate_lines([r["sample_id"] for r in rows])
    samples, skipped, first_id = [], [], {}
    for line, row in enumerate(rows, start=2):
        sid, key = str(row["sample_id"]), contract.sample_key(row["sample_id"])
        if key in first_id and first_id[key] != sid:
            raise contract.DataContractError(
                f"{path}, lines {dups[key]}: test sample ids {first_id[key]!r} and {sid!r} both map to "
                f"shard key {key!r} (characters outside [A-Za-z0-9_-] become '_'); rename one"
            )
        if key in first_id:
            reason = (
                f"{DUPLICATE_ID}: sample_id {sid!r} (key {key!r}) on CSV lines {dups[key]}; first row kept"
            )
            skipped.append(fail_or_skip(strict, skip_entry(sid, "test", reason), f"{path}, line {line}"))
            continue
        first_id[key] = sid
        paths = tuple(resolve_image(root, contract.TEST_IMAGES, row[c]) for c in contract.IMAGE_COLUMNS)
        samples.append(Sample(sid, "test", paths))
    return samples, skipped


# ---------------------------------------------------------------- split and shard plan


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


# ---------------------------------------------------------------- checking samples (worker processes)


def view_problem(path: str | None, view: str) -> str | None:
    """None for an image PIL fully decodes (any mode or format), else why not, naming the file.

    The text is deterministic (no object addresses): it goes into ``manifest.json``."""
    if path is None:
        return f"{MISSING_VIEW}: {view} view: the CSV names no file"
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return f"{MISSING_VIEW}: {view} view: {path}: {err.strerror or err}"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decodes every pixel: a truncated JPEG fails here, not at open()
    except Exception as err:  # noqa: BLE001 -- PIL raises OSError, SyntaxError, ValueError, struct.error...
        # e.g. "cannot identify image file <_io.BytesIO object at 0x7f..>": the address changes per run
        message = OBJECT_REPR.sub("", str(err))
        return f"{BAD_IMAGE}: {view} view: {path}: {type(err).__name__}: {message}"
    return None


def check_sample(sample: Sample) -> tuple[str | None, tuple[tuple[str, str], ...]]:
    """``(skip reason, ())`` for a labelled sample with a bad view, else ``(None, ((view, problem), ..))``
    listing a test sample's unreadable views. Returns only text, so workers send back little."""
    bad = []
    for view, path in zip(contract.VIEWS, sample.paths):
        problem = view_problem(path, view)
        if problem and sample.split != "test":
            return problem, ()  # the reason names the view and its file
        if problem:
            bad.append((view, problem))
    return None, tuple(bad)


# ---------------------------------------------------------------- writing one shard (worker processes)


def sample_json(sample: Sample) -> bytes:
    meta = {
        "sample_id": sample.sample_id,
        "state_idx": sample.state_idx,
        "lat": sample.lat,
        "lon": sample.lon,
        "missing_views": list(sample.missing_views),
    }
    return json.dumps(meta).encode()


def view_bytes(path: str) -> bytes:
    """A checked view's bytes, read again; an error if the file went away since it was checked."""
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise contract.DataContractError(
            f"{path}: unreadable ({err.strerror or err}) though it was readable when checked: "
            "the data root changed during the run; rerun"
        ) from err


def sample_members(sample: Sample) -> list[tuple[str, bytes]]:
    """Tar members of one checked sample: its readable views (original bytes) and its json."""
    key = contract.sample_key(sample.sample_id)
    members = [
        (f"{key}.{view}.jpg", view_bytes(path))
        for view, path in zip(contract.VIEWS, sample.paths)
        if view not in sample.missing_views
    ]
    return members + [(f"{key}.json", sample_json(sample))]


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Fixed header fields (mtime, owner, mode): the shard's bytes depend only on its content."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_atomic(path: Path, write) -> None:
    """``write(file)`` into ``path.tmp``, flush to disk, then rename: ``path`` is never half-written.

    A failed write removes its temporary; one left by a killed worker is removed by ``shard_dataset``."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_shard(task: ShardTask) -> str:
    """Write one planned shard of checked samples; returns its name."""

    def write(f):
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for sample in task.samples:
                for name, data in sample_members(sample):
                    add_member(tar, name, data)

    write_atomic(Path(task.out_dir) / task.name, write)
    return task.name


# ---------------------------------------------------------------- the run


def default_workers() -> int:
    """The ``--workers`` default: one process per CPU, at most 8."""
    return min(8, os.cpu_count() or 1)


@contextmanager
def ordered_map(workers: int):
    """An ``imap(fn, items, chunksize)`` giving results in item order whatever ``workers`` is, so the
    output never depends on it; the pool is terminated on exit (an error stops the other workers)."""
    if workers <= 1:
        yield lambda fn, items, chunksize=1: map(fn, items)
        return
    pool = mp.get_context("spawn").Pool(workers)  # spawn: no fork of a parent holding torch/OpenMP threads
    try:
        yield pool.imap
    finally:
        pool.terminate()  # also joins the workers: no one writes after this


def check_samples(samples: list[Sample], imap, strict: bool, progress: bool):
    """``(kept samples, skip entries, missing-view records)``; kept test samples carry their missing
    views. ``strict`` raises at the first bad labelled sample (in sample order, whatever the workers)."""
    kept, skipped, missing = [], [], []
    checks = imap(check_sample, samples, CHECK_CHUNK)
    bar = tqdm(checks, total=len(samples), unit="sample", desc="checking", disable=not progress)
    for sample, (problem, bad_views) in zip(samples, bar):
        if problem:
            skipped.append(fail_or_skip(strict, skip_entry(sample.sample_id, sample.split, problem)))
            continue
        missing += [
            {"sample_id": sample.sample_id, "split": sample.split, "view": view, "reason": why}
            for view, why in bad_views
        ]
        kept.append(replace(sample, missing_views=tuple(view for view, _ in bad_views)))
    return kept, skipped, missing


def write_shards(out: Path, plan: list[tuple[str, tuple]], imap, progress: bool) -> None:
    """Replace an earlier run's files in ``out`` by the planned shards (the manifest comes later)."""
    out.mkdir(parents=True, exist_ok=True)
    remove_stale(out, {name for _, (name, _) in plan})
    tasks = [ShardTask(str(out), name, samples) for _, (name, samples) in plan]
    with tqdm(
        total=sum(len(t.samples) for t in tasks), unit="sample", desc="writing", disable=not progress
    ) as bar:
        for task, _ in zip(tasks, imap(write_shard, tasks, 1)):
            bar.update(len(task.samples))


def is_temporary(name: str) -> bool:
    stem = name.removesuffix(TMP_SUFFIX)
    return name != stem and bool(SHARD_RE.match(stem) or stem == MANIFEST)


def remove_temporaries(out_dir: Path) -> None:
    """Temporaries of a failed run: a worker terminated mid-write cannot remove its own."""
    for path in out_dir.glob(f"*{TMP_SUFFIX}"):
        if is_temporary(path.name):
            path.unlink(missing_ok=True)


def remove_stale(out_dir: Path, keep: set[str]) -> None:
    """Drop the manifest, temporaries and shards not in this run's plan; other files are left alone."""
    for path in out_dir.iterdir():
        stale_shard = SHARD_RE.match(path.name) and path.name not in keep
        if path.name in (MANIFEST, LABELS) or stale_shard or is_temporary(path.name):
            path.unlink()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
    return [f"wrote {counts} samples in {shards} shards to {out_dir}", *problem_lines(manifest, out_dir)]


def build_manifest(
    root: Path, seed: int, val_fraction: float, states: dict[int, str], plan, skipped, missing
):
    """The manifest of a planned run: every count and the label encoder are known before writing."""
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
    }


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


def require_training_data(manifest: dict, root: Path, out: Path) -> None:
    """Stop before writing anything when no training sample is left, printing why."""
    if not manifest["label_encoder"]["state_indices"]:
        print("\n".join(problem_lines(manifest, out)))
        raise contract.DataContractError(
            f"{root / contract.TRAIN_CSV}: no usable training sample (see above)"
        )


def check_args(val_fraction: float, samples_per_shard: int, workers: int) -> None:
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction}: must be in [0, 1)")
    if samples_per_shard < 1 or workers < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard}, workers={workers}: both must be >= 1")


def plan_splits(
    kept: list[Sample], seed: int, val_fraction: float, per_shard: int
) -> list[tuple[str, tuple]]:
    """``(split, (shard name, samples))`` for every shard of the checked samples, in split order."""
    train, val = stratified_split([s for s in kept if s.split == "train"], val_fraction, seed)
    test = [s for s in kept if s.split == "test"]
    return [
        (split, p)
        for split, samples in zip(SPLITS, (train, val, test))
        for p in plan_shards(samples, split, seed, per_shard)
    ]


def shard_dataset(
    data_root: str | Path,
    out_dir: str | Path,
    val_fraction: float = 0.1,
    seed: int = 0,
    samples_per_shard: int = 1000,
    workers: int = 1,
    strict: bool = False,
    progress: bool = True,
) -> dict:
    """Write the shards and ``manifest.json`` of a data root; returns the manifest.

    Every sample is checked first; the split, the shard plan and the label encoder use only the kept
    ones, so no shard is empty and every class has a training sample. A failed run removes its
    temporaries and leaves no manifest."""
    check_args(val_fraction, samples_per_shard, workers)
    root, out = Path(data_root).resolve(), Path(out_dir)
    states = contract.read_state_mapping(root)
    train, train_skipped = read_train_samples(root, states, strict)
    test, test_skipped = read_test_samples(root, strict)
    try:
        with ordered_map(min(workers, len(train) + len(test))) as imap:
            kept, image_skipped, missing = check_samples(train + test, imap, strict, progress)
            plan = plan_splits(kept, seed, val_fraction, samples_per_shard)
            skipped = train_skipped + image_skipped + test_skipped
            manifest = build_manifest(root, seed, val_fraction, states, plan, skipped, missing)
            require_training_data(manifest, root, out)
            write_shards(out, plan, imap, progress)
    except BaseException:
        if out.is_dir():
            remove_temporaries(out)
        raise
    write_labels(out, plan)
    write_atomic(out / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2).encode()))  # last
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
        help="output directory; shards, temporaries and the manifest of an earlier run there are replaced",
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
        )
    except contract.DataContractError as err:
        sys.exit(f"error: {err}")
