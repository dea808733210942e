"""The competition data contract: folder and file names, CSV columns, and their readers.

A data root holds ``train_images/``, ``test_images/`` (JPEGs named ``img_XXXXXX_<view>.jpg``),
``train_ground_truth.csv``, ``sample_submission.csv`` and ``state_mapping.csv``. Nothing here assumes
which states occur, their order, or that state indices are consecutive.

Reading is forgiving where the meaning is clear and strict where it is not: sample ids and image names
are stripped of surrounding blanks (``"000002 "`` is ``"000002"``, so a stray space makes a duplicate,
not a new sample) and a byte-order mark is dropped; an empty, non-UTF-8 or ragged file, an unclosed quote,
a missing column or an empty id is a :class:`DataContractError` naming the file and, where known, the line.
An image cell names a file below its images folder (or the data root): an absolute path or a ``..``
component is refused (:func:`image_path_problem`), so a CSV cannot make a tool read outside the root.
"""

from __future__ import annotations

import io
import re
from pathlib import Path, PurePath

import pandas as pd

from geoloc.errors import GeolocError

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
# the competition's places: the contiguous US, Alaska and Hawaii (degrees). The GPS head predicts inside
# it and the submission check warns about points outside it.
US_BOX = {"lat": (18.0, 72.0), "lon": (-180.0, -65.0)}


class DataContractError(GeolocError, ValueError):
    """A data-root file breaks the contract; the message names the file (and row)."""


def sample_key(sample_id: str) -> str:
    """WebDataset key for a sample id: no dots (wds splits member names at the first dot)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(sample_id))


def image_path_problem(name: str) -> str | None:
    """Why an image cell may not be used as a path below the data root, else None.

    Checked lexically, not by resolving links, so image folders that are symlinks keep working. Any
    ``..`` is refused, even one that normalises away: after a symlinked folder it climbs out of the link's
    target, not back into the root."""
    path = PurePath(str(name))
    if path.anchor:  # "/x", and on Windows also "C:x" and "\\x"
        return f"{name!r} is an absolute path; image cells are relative to the images folder"
    if ".." in path.parts:
        return f"{name!r} has a '..' component; image cells stay below the images folder"
    return None


def _csv_text(path: Path) -> str:
    """The file as UTF-8 text (a byte-order mark is dropped); an error naming the line of a bad byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataContractError(
            f"{path}, line {line}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
            "save the file as UTF-8"
        ) from None


def _parser_problem(path: Path, err: Exception) -> DataContractError:
    """A pandas parser error as a contract error naming the file and, when pandas tells it, the line."""
    message = str(err).strip().removeprefix("Error tokenizing data. C error: ")
    ragged = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", message)
    if ragged:
        want, line, saw = ragged.groups()
        return DataContractError(f"{path}, line {line}: {saw} fields, the header has {want}")
    quote = re.search(r"EOF inside string starting at row (\d+)", message)
    if quote:  # pandas counts rows from 0 (the header): row N is line N + 1
        line = int(quote.group(1)) + 1
        return DataContractError(f"{path}, line {line}: a quoted field opened here is never closed")
    return DataContractError(f"{path}: not a readable CSV: {message}")


def _strip_cells(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Ids and image names without surrounding blanks ("000002 " is "000002"); an empty id is an error."""
    for col in ("sample_id", *IMAGE_COLUMNS):
        if col in df.columns:
            df[col] = df[col].str.strip()
    if "sample_id" in df.columns:
        empty = df["sample_id"].isna() | (df["sample_id"] == "")
        if empty.any():
            lines = (empty.to_numpy().nonzero()[0] + 2).tolist()[:10]
            raise DataContractError(f"{path}, line(s) {lines}: empty sample_id")
    return df


def _read_csv(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """A contract CSV; every way it can be unreadable is a :class:`DataContractError` naming the file.

    Sample ids and image names stay strings ("000123" must not become 123) and are stripped."""
    if not path.is_file():
        raise DataContractError(f"{path}: file not found")
    text = _csv_text(path)
    if not text.strip():
        raise DataContractError(f"{path}: the file is empty (not even a header line)")
    try:
        df = pd.read_csv(io.StringIO(text), dtype={"sample_id": str, **{c: str for c in IMAGE_COLUMNS}})
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise _parser_problem(path, err) from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataContractError(f"{path}: missing column(s) {missing}; found {list(df.columns)}")
    return _strip_cells(df, path)


def duplicate_lines(values, key=str) -> dict[str, list[int]]:
    """``key(value)`` -> CSV line numbers, for keys used by more than one row (the header is line 1)."""
    lines: dict[str, list[int]] = {}
    for i, value in enumerate(values):
        lines.setdefault(key(value), []).append(i + 2)
    return {k: v for k, v in lines.items() if len(v) > 1}


def state_name_key(name) -> str:
    """How state names compare: stripped, case-insensitive ("new york " == "New York")."""
    return str(name).strip().casefold()


def _state_rows(path: Path, df: pd.DataFrame, name_col: str):
    """``(line, state_idx, name)`` per row; an error naming the line for a bad index or an empty name."""
    numeric = pd.to_numeric(df["state_idx"], errors="coerce")  # "x" -> NaN, reported below by line
    for line, (raw, idx, name) in enumerate(zip(df["state_idx"], numeric, df[name_col]), start=2):
        if pd.isna(idx) or not float(idx).is_integer() or not 0 <= int(idx) <= MAX_STATE_IDX:
            raise DataContractError(f"{path}, line {line}: state_idx {raw!r} is not an integer in 0..49")
        if pd.isna(name) or not str(name).strip():
            raise DataContractError(f"{path}, line {line}: state_idx {int(idx)} has no state name")
        yield line, int(idx), str(name).strip()


def read_state_mapping(root: str | Path) -> dict[int, str]:
    """``state_idx -> state name``; accepts a ``state`` or ``state_name`` column, ignores extras.

    Every index and every name (compared stripped, case-insensitive) appears once; at least one row."""
    path = Path(root) / STATE_MAPPING
    df = _read_csv(path, ("state_idx",))
    name_col = "state" if "state" in df.columns else "state_name" if "state_name" in df.columns else None
    if name_col is None:
        raise DataContractError(f"{path}: needs a 'state' or 'state_name' column; found {list(df.columns)}")
    if df.empty:
        raise DataContractError(f"{path}: no rows (a header only); every state needs a line")
    mapping: dict[int, str] = {}
    for line, idx, name in _state_rows(path, df, name_col):
        if idx in mapping:
            raise DataContractError(f"{path}, line {line}: state_idx {idx} appears twice")
        mapping[idx] = name
    names = duplicate_lines(df[name_col], key=state_name_key)
    if names:
        name, lines = next(iter(names.items()))
        raise DataContractError(f"{path}, lines {lines}: state name {name!r} is given to several indices")
    return mapping


def read_train_table(root: str | Path) -> pd.DataFrame:
    """``train_ground_truth.csv`` as read (rows are validated later, per sample, by the sharder)."""
    return _read_csv(Path(root) / TRAIN_CSV, TRAIN_COLUMNS)


def read_submission_template(path: str | Path) -> pd.DataFrame:
    """``sample_submission.csv``: the test samples, their image names, and the output row order.

    A template without rows or with a repeated sample id can never give a valid submission (one row
    per id): an error naming the file, the lines and the ids."""
    path = Path(path)
    df = _read_csv(path, ("sample_id", *IMAGE_COLUMNS))
    if df.empty:
        raise DataContractError(f"{path}: no rows (a header only); the template lists the test samples")
    dups = duplicate_lines(df["sample_id"])
    if dups:
        listed = "; ".join(f"{sid!r} on lines {lines}" for sid, lines in list(dups.items())[:10])
        raise DataContractError(
            f"{path}: {len(dups)} sample id(s) appear more than once ({listed}); "
            "a submission has exactly one row per id: fix the template"
        )
    return df
