"""The competition submission: build it from predictions, validate it, write it atomically.

A submission has the template's rows in the template's order and all of its columns
(``contract.SUBMISSION_COLUMNS``): the top 5 ORIGINAL state indices and a predicted point per sample.
Samples the model could not see (no readable view) are predicted from the prior and reported. The file
is written to a temporary name, validated, and only then renamed over the target, so a failed run never
leaves a half-written or invalid submission under the final name.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from geoloc.contract import IMAGE_COLUMNS, MAX_STATE_IDX, PRED_STATE_COLUMNS, SUBMISSION_COLUMNS, US_BOX
from geoloc.errors import GeolocError
from geoloc.predict import Predictions, point_predictions

log = logging.getLogger(__name__)

MAX_LISTED = 10  # ids quoted per problem; the count is always given in full


class SubmissionError(GeolocError, ValueError):
    """A submission breaks the contract; the message lists every problem found."""


def build_submission(template: pd.DataFrame, preds: Predictions, encoder, prior) -> pd.DataFrame:
    """Template rows (same order, same image columns) + the predicted top 5 states and point.

    Samples without a readable view get ``prior`` (a ``geoloc.metrics.Prior``) and are logged with
    their ids (``blind_ids`` lists them). Every template id must have a prediction and every prediction
    a template row: a mismatch means the shards and the template come from different data, and is an
    error naming the ids.
    """
    ids = template["sample_id"].astype(str).to_numpy()
    index = _align(ids, preds.sample_id.astype(str))  # preds row of each template row
    rows = preds.take(index)
    top5, latlon = point_predictions(rows, encoder, prior)  # blind rows come from the prior
    blind = blind_ids(rows)
    if blind:
        log.warning("%d sample(s) without a readable view predicted from the prior: %s", len(blind), blind)
    out = pd.DataFrame({"sample_id": ids})
    for col in IMAGE_COLUMNS:
        out[col] = template[col].to_numpy()
    for k, col in enumerate(PRED_STATE_COLUMNS):
        out[col] = top5[:, k].astype(np.int64)
    out["predicted_latitude"], out["predicted_longitude"] = latlon[:, 0], latlon[:, 1]
    return out[list(SUBMISSION_COLUMNS)]


def blind_ids(preds: Predictions) -> list[str]:
    """Ids of the samples the model saw no view of (predicted from the prior)."""
    return [str(s) for s in preds.sample_id[~preds.has_views]]


def _align(template_ids: np.ndarray, pred_ids: np.ndarray) -> np.ndarray:
    """Row of ``pred_ids`` for each template id; raises naming the ids missing on either side."""
    position = {sid: i for i, sid in enumerate(pred_ids)}
    if len(position) != len(pred_ids):
        raise ValueError("predictions hold a sample id twice; de-duplicate them first (gather_predictions)")
    missing = [sid for sid in template_ids if sid not in position]
    extra = sorted(set(pred_ids) - set(template_ids))
    if missing or extra:
        raise ValueError(
            f"predictions do not match the template: {len(missing)} template id(s) without a prediction "
            f"{missing[:MAX_LISTED]}, {len(extra)} predicted id(s) not in the template {extra[:MAX_LISTED]}; "
            "are the shards and the template from the same data root?"
        )
    return np.array([position[sid] for sid in template_ids], dtype=np.int64)


# ----------------------------------------------------------------------------- validation


def read_submission(path: str | Path) -> pd.DataFrame:
    """A submission CSV with ids and image names kept as strings ("000123" stays "000123")."""
    return pd.read_csv(path, dtype={"sample_id": str, **{c: str for c in IMAGE_COLUMNS}})


def check_submission(sub: str | Path | pd.DataFrame, template: pd.DataFrame) -> tuple[list[str], list[str]]:
    """``(errors, warnings)`` of a submission (a path or a DataFrame) against its template; no errors = valid."""
    if not isinstance(sub, pd.DataFrame):
        if not Path(sub).is_file():
            return [f"{sub}: file not found"], []
        try:
            sub = read_submission(sub)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            return [f"{sub}: not a readable CSV: {err}"], []
    errors = _check_columns(sub)
    if errors:  # the row checks below need the columns
        return errors, []
    errors += _check_rows(sub, template)
    state_errors, state_warnings = _check_states(sub)
    point_errors, point_warnings = _check_points(sub)
    return errors + state_errors + point_errors, state_warnings + point_warnings


def validate_submission(sub: str | Path | pd.DataFrame, template: pd.DataFrame) -> list[str]:
    """Every problem of a submission (a path or a DataFrame); warnings are logged, not returned."""
    errors, warnings = check_submission(sub, template)
    for w in warnings:
        log.warning("submission: %s", w)
    return errors


def _check_columns(sub: pd.DataFrame) -> list[str]:
    cols = list(sub.columns)
    if cols == list(SUBMISSION_COLUMNS):
        return []
    missing = [c for c in SUBMISSION_COLUMNS if c not in cols]
    extra = [c for c in cols if c not in SUBMISSION_COLUMNS]
    if missing or extra:
        return [f"columns: missing {missing}, unexpected {extra}"]
    return [f"columns are out of order: {cols}, expected {list(SUBMISSION_COLUMNS)}"]


def _rows(mask: np.ndarray) -> str:
    """``'3 row(s), e.g. data lines [2, 7, 9]'`` (line 1 is the header)."""
    rows = np.flatnonzero(mask)
    return f"{len(rows)} row(s), e.g. data lines {(rows[:MAX_LISTED] + 2).tolist()}"


def _check_rows(sub: pd.DataFrame, template: pd.DataFrame) -> list[str]:
    """Row count, ids (unique, equal to the template's, same order) and image names."""
    ids, want = sub["sample_id"].astype(str).to_numpy(), template["sample_id"].astype(str).to_numpy()
    errors = []
    if len(ids) != len(want):
        errors.append(f"{len(ids)} rows, the template has {len(want)}")
    dup = pd.Series(ids).duplicated(keep=False).to_numpy()
    if dup.any():
        errors.append(f"duplicated sample_id in {_rows(dup)}: {sorted(set(ids[dup]))[:MAX_LISTED]}")
    missing, extra = sorted(set(want) - set(ids)), sorted(set(ids) - set(want))
    if missing:
        errors.append(f"{len(missing)} template sample(s) missing: {missing[:MAX_LISTED]}")
    if extra:
        errors.append(f"{len(extra)} sample(s) not in the template: {extra[:MAX_LISTED]}")
    if not (missing or extra or dup.any()) and not np.array_equal(ids, want):
        errors.append(f"rows are not in the template's order, {_rows(ids != want)}")
    if len(ids) == len(want) and np.array_equal(ids, want):
        for col in IMAGE_COLUMNS:
            bad = sub[col].astype(str).to_numpy() != template[col].astype(str).to_numpy()
            if bad.any():
                errors.append(f"{col} differs from the template in {_rows(bad)}")
    return errors


def _check_states(sub: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Integers in 0..49; -1 ("no prediction") only after position 1; duplicates in a row warned."""
    errors = []
    values = (
        sub[list(PRED_STATE_COLUMNS)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    )  # (N, 5)
    for k, col in enumerate(PRED_STATE_COLUMNS):
        v = values[:, k]
        nan, frac = np.isnan(v), ~np.isnan(v) & (v != np.round(v))
        low = -1 if k > 0 else 0
        out = ~nan & ~frac & ((v < low) | (v > MAX_STATE_IDX))
        if nan.any():
            errors.append(f"{col}: missing or not a number in {_rows(nan)}")
        if frac.any():
            errors.append(f"{col}: not an integer in {_rows(frac)}")
        if out.any():
            errors.append(f"{col}: outside {low}..{MAX_STATE_IDX} in {_rows(out)}")
    valid = np.where(np.isnan(values), -1, values)
    dup = np.array([len(set(r[r >= 0])) < (r >= 0).sum() for r in valid], dtype=bool)
    warnings = (
        [f"a state repeats within {_rows(dup)} (only its first position can score)"] if dup.any() else []
    )
    return errors, warnings


def _check_points(sub: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Latitude in -90..90 and longitude in -180..180 (errors); outside the US box (warning)."""
    errors, warnings, inside = [], [], np.ones(len(sub), dtype=bool)
    for col, key, limit in (("predicted_latitude", "lat", 90.0), ("predicted_longitude", "lon", 180.0)):
        v = pd.to_numeric(sub[col], errors="coerce").to_numpy(np.float64)
        nan, out = ~np.isfinite(v), np.isfinite(v) & (np.abs(v) > limit)
        if nan.any():
            errors.append(f"{col}: missing or not a finite number in {_rows(nan)}")
        if out.any():
            errors.append(f"{col}: outside -{limit:g}..{limit:g} in {_rows(out)}")
        lo, hi = US_BOX[key]
        inside &= nan | ((v >= lo) & (v <= hi))
    if (~inside).any():
        warnings.append(f"point outside the US bounding box {US_BOX} in {_rows(~inside)}")
    return errors, warnings


# ----------------------------------------------------------------------------- writing


def write_submission(sub: pd.DataFrame, path: str | Path, template: pd.DataFrame) -> Path:
    """Write to ``<path>.tmp-<pid>``, validate what was written, then rename over ``path``.

    Raises :class:`SubmissionError` listing every problem; the target is then left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        sub.to_csv(tmp, index=False, float_format="%.6f")
        problems = validate_submission(tmp, template)  # the file as written, not the DataFrame
        if problems:
            raise SubmissionError(
                f"{path}: submission not written, {len(problems)} problem(s):\n- " + "\n- ".join(problems)
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
