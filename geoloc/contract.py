"""The competition data contract: folder and file names, CSV columns, and their readers.

A data root holds ``train_images/``, ``test_images/`` (JPEGs named ``img_XXXXXX_<view>.jpg``),
``train_ground_truth.csv``, ``sample_submission.csv`` and ``state_mapping.csv``. Nothing here assumes
which states occur, their order, or that state indices are consecutive.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

VIEWS = ("north", "east", "south", "west")
IMAGE_COLUMNS = tuple(f"image_{v}" for v in VIEWS)
TOP_K = 5
PRED_STATE_COLUMNS = tuple(f"predicted_state_idx_{k}" for k in range(1, TOP_K + 1))

TRAIN_IMAGES = "train_images"
TEST_IMAGES = "test_images"
TRAIN_CSV = "train_ground_truth.csv"
SAMPLE_SUBMISSION = "sample_submission.csv"
STATE_MAPPING = "state_mapping.csv"

TRAIN_COLUMNS = ("sample_id", "state", "state_idx", "latitude", "longitude", *IMAGE_COLUMNS)
SUBMISSION_COLUMNS = (
    "sample_id",
    *IMAGE_COLUMNS,
    *PRED_STATE_COLUMNS,
    "predicted_latitude",
    "predicted_longitude",
)
MAX_STATE_IDX = 49  # original indices live in 0..49


class DataContractError(ValueError):
    """A data-root file breaks the contract; the message names the file (and row)."""


def sample_key(sample_id: str) -> str:
    """WebDataset key for a sample id: no dots (wds splits member names at the first dot)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(sample_id))


def _read_csv(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    if not path.is_file():
        raise DataContractError(f"{path}: file not found")
    # sample ids and image names stay strings ("000123" must not become 123)
    df = pd.read_csv(path, dtype={"sample_id": str, **{c: str for c in IMAGE_COLUMNS}})
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataContractError(f"{path}: missing column(s) {missing}; found {list(df.columns)}")
    return df


def read_state_mapping(root: str | Path) -> dict[int, str]:
    """``state_idx -> state name``; accepts a ``state`` or ``state_name`` column, ignores extras."""
    path = Path(root) / STATE_MAPPING
    df = _read_csv(path, ("state_idx",))
    name_col = "state" if "state" in df.columns else "state_name" if "state_name" in df.columns else None
    if name_col is None:
        raise DataContractError(f"{path}: needs a 'state' or 'state_name' column; found {list(df.columns)}")
    mapping: dict[int, str] = {}
    numeric = pd.to_numeric(df["state_idx"], errors="coerce")  # "x" -> NaN, reported below by line
    for row, (raw, idx, name) in enumerate(zip(df["state_idx"], numeric, df[name_col]), start=2):
        if pd.isna(idx) or not float(idx).is_integer() or not 0 <= int(idx) <= MAX_STATE_IDX:
            raise DataContractError(f"{path}, line {row}: state_idx {raw!r} is not an integer in 0..49")
        if int(idx) in mapping:
            raise DataContractError(f"{path}, line {row}: state_idx {int(idx)} appears twice")
        mapping[int(idx)] = str(name)
    return mapping


def read_train_table(root: str | Path) -> pd.DataFrame:
    """``train_ground_truth.csv`` as read (rows are validated later, per sample, by the sharder)."""
    return _read_csv(Path(root) / TRAIN_CSV, TRAIN_COLUMNS)


def read_submission_template(path: str | Path) -> pd.DataFrame:
    """``sample_submission.csv``: the test samples, their image names, and the output row order."""
    return _read_csv(Path(path), ("sample_id", *IMAGE_COLUMNS))
