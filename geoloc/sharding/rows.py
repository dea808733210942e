"""The data root's CSVs -> ``Sample`` records, and skip entries for the rows that cannot be used.

A training row is skipped for an unknown state, a bad coordinate or an id whose shard key another row
also uses; a test row is never skipped (a repeated id keeps its first row). Every skip is a dict
``{sample_id, split, reason}`` whose reason starts with one of the codes below, or (``--strict``) an
error naming the file, the line and the sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from geoloc import contract

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


def skip_entry(sample_id: str, split: str, reason: str) -> dict:
    return {"sample_id": str(sample_id), "split": split, "reason": reason}


def fail_or_skip(strict: bool, entry: dict, where: str = "") -> dict:
    """The skip entry, or (``--strict``) an error naming the sample, the file and the problem."""
    if strict:
        where = f"{where}: " if where else ""
        raise contract.DataContractError(f"{where}sample {entry['sample_id']!r}: {entry['reason']}")
    return entry


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
