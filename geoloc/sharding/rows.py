"""The data root's CSVs -> ``Sample`` records, and skip entries for the rows that cannot be used.

A training row is skipped for an unknown state, a state name that disagrees with ``state_mapping.csv``,
a bad coordinate, an image cell pointing outside the data root, or an id whose shard key another row
also uses. Every skip is a dict ``{sample_id, split, reason}`` whose reason starts with one of the codes
below, or (``--strict``) an error naming the file, the line and the sample. A test row is never skipped:
a template with a repeated id is refused when it is read (``contract.read_submission_template``), and
a test view whose cell points outside the root is recorded as missing (``bad_path``).
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
STATE_MISMATCH = "state_mismatch"  # the row's state name is not state_mapping.csv's name of its state_idx
BAD_PATH = "bad_path"  # an image cell is an absolute path or has a '..' (outside the data root)
# --dedup drop: a train sample whose views near-duplicate a val / test sample's (geoloc.sharding.dedup)
DUPLICATE_OF_VAL, DUPLICATE_OF_TEST = "duplicate_of_val", "duplicate_of_test"


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
    view_problems: tuple[tuple[str, str], ...] = ()  # (view, reason) known from the CSV: a refused path


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


def image_paths(root: Path, folder: str, row: dict, allow_outside: bool):
    """``(paths, problems)``: a path (or None) per view, and ``(view, bad_path reason)`` for each cell
    that points outside the data root (its path is None) unless ``allow_outside``."""
    paths, problems = [], []
    for view, col in zip(contract.VIEWS, contract.IMAGE_COLUMNS):
        name = row[col]
        blank = pd.isna(name) or not str(name).strip()
        why = None if allow_outside or blank else contract.image_path_problem(name)
        if why:
            problems.append((view, f"{BAD_PATH}: {view} view: {col} {why} (--allow-outside-root permits it)"))
        paths.append(None if why else resolve_image(root, folder, name))
    return tuple(paths), tuple(problems)


def parse_labels(row: dict, states: dict[int, str]) -> tuple[tuple[int, float, float] | None, str | None]:
    """``((state_idx, lat, lon), None)`` for a usable training row, else ``(None, why not)``."""
    idx = pd.to_numeric(row["state_idx"], errors="coerce")
    if pd.isna(idx) or not float(idx).is_integer() or int(idx) not in states:
        return None, f"{UNKNOWN_STATE}: state_idx {row['state_idx']!r} is not in {contract.STATE_MAPPING}"
    name = states[int(idx)]
    if contract.state_name_key(row["state"]) != contract.state_name_key(name):
        return None, (
            f"{STATE_MISMATCH}: state {row['state']!r}, but {contract.STATE_MAPPING} calls state_idx "
            f"{int(idx)} {name!r}"
        )
    coords = []
    for col, bound in (("latitude", 90.0), ("longitude", 180.0)):
        value = pd.to_numeric(row[col], errors="coerce")
        if pd.isna(value) or not -bound <= float(value) <= bound:
            return None, f"{BAD_COORDINATE}: {col} {row[col]!r} is not a number in [-{bound:g}, {bound:g}]"
        coords.append(float(value))
    return (int(idx), *coords), None


def duplicate_lines(ids: list[str]) -> dict[str, list[int]]:
    """Shard key -> CSV line numbers, for keys used by more than one row (the header is line 1)."""
    return contract.duplicate_lines(ids, key=contract.sample_key)


def read_train_samples(
    root: Path, states: dict[int, str], strict: bool, allow_outside: bool = False
) -> tuple[list[Sample], list[dict]]:
    """Valid-looking training rows as samples, plus skip entries for the rows that are not."""
    rows = contract.read_train_table(root).to_dict("records")
    dups = duplicate_lines([r["sample_id"] for r in rows])
    samples, skipped = [], []
    for line, row in enumerate(rows, start=2):
        sid = str(row["sample_id"])
        key = contract.sample_key(sid)
        labels, problem = parse_labels(row, states)
        paths, bad_paths = image_paths(root, contract.TRAIN_IMAGES, row, allow_outside)
        problem = problem or (bad_paths[0][1] if bad_paths else None)
        if key in dups:  # which row is right is unknowable: skip all of them
            problem = f"{DUPLICATE_ID}: sample_id {sid!r} (key {key!r}) on CSV lines {dups[key]}"
        if problem:
            entry = skip_entry(sid, "train", problem)
            skipped.append(fail_or_skip(strict, entry, f"{root / contract.TRAIN_CSV}, line {line}"))
            continue
        samples.append(Sample(sid, "train", paths, *labels))
    return samples, skipped


def read_test_samples(root: Path, allow_outside: bool = False) -> list[Sample]:
    """Every test sample (the template reader refuses repeated ids); a view whose cell points outside
    the root carries a ``bad_path`` problem and is recorded as missing by the check.

    Two different ids with one shard key would lose a test sample: an error naming both."""
    path = root / contract.SAMPLE_SUBMISSION
    rows = contract.read_submission_template(path).to_dict("records")
    dups = duplicate_lines([r["sample_id"] for r in rows])
    if dups:
        key, lines = next(iter(dups.items()))
        ids = [str(rows[line - 2]["sample_id"]) for line in lines]
        raise contract.DataContractError(
            f"{path}, lines {lines}: test sample ids {ids} all map to shard key {key!r} "
            "(characters outside [A-Za-z0-9_-] become '_'); rename them"
        )
    samples = []
    for row in rows:
        paths, bad_paths = image_paths(root, contract.TEST_IMAGES, row, allow_outside)
        samples.append(Sample(str(row["sample_id"]), "test", paths, view_problems=bad_paths))
    return samples
