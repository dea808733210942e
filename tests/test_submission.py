"""geoloc.infer.submission: building in template order, the validator (each kind of bad file), atomic write."""

import numpy as np
import pandas as pd
import pytest

from geoloc.contract import IMAGE_COLUMNS, PRED_STATE_COLUMNS, SUBMISSION_COLUMNS
from geoloc.infer.submission import (
    SubmissionError,
    blind_ids,
    build_submission,
    check_submission,
    validate_submission,
    write_submission,
)
from geoloc.labels import LabelEncoder
from geoloc.metrics import Prior
from geoloc.predict import Predictions

ENCODER = LabelEncoder((3, 8, 21, 34, 40, 47), ("AZ", "CO", "KY", "NM", "OK", "WA"))  # non-consecutive
PRIOR = Prior((21, 3, 8, 34, 40), 38.5, -97.0)
IDS = ["000104", "000007", "000311", "000020"]  # leading zeros must survive


def make_template(ids=IDS):
    df = pd.DataFrame({"sample_id": ids})
    for col in IMAGE_COLUMNS:
        df[col] = [f"img_{i}_{col[6:]}.jpg" for i in ids]
    for col in PRED_STATE_COLUMNS:
        df[col] = 0
    df["predicted_latitude"], df["predicted_longitude"] = 0.0, 0.0
    return df


def make_preds(ids):
    """Probabilities with a known ranking per sample: class (row + k) % C at position k."""
    n, c = len(ids), ENCODER.num_classes
    probs = np.zeros((n, c), np.float32)
    for i in range(n):
        for k in range(c):
            probs[i, (i + k) % c] = (c - k) / 21.0  # 6/21 > 5/21 > ... ; rows sum to 1
    gps = np.stack([30.0 + np.arange(n), -110.0 + np.arange(n)], axis=1).astype(np.float32)
    return Predictions(
        sample_id=np.asarray(ids, dtype=object),
        label=np.full(n, -1),
        latlon=np.full((n, 2), np.nan, np.float32),
        n_views=np.full(n, 4),
        values={"state_probs": probs, "gps": gps},
    )


def test_build_follows_template_order_with_original_state_indices():
    template = make_template()
    preds = make_preds(sorted(IDS))  # gathered predictions are sorted by id, the template is not
    sub = build_submission(template, preds, ENCODER, PRIOR)
    assert list(sub.columns) == list(SUBMISSION_COLUMNS)
    assert list(sub["sample_id"]) == IDS
    for col in IMAGE_COLUMNS:
        assert list(sub[col]) == list(template[col])
    for sid, row in zip(IDS, sub.itertuples(index=False)):
        i = sorted(IDS).index(sid)
        want = [ENCODER.state_indices[(i + k) % 6] for k in range(5)]
        assert [getattr(row, c) for c in PRED_STATE_COLUMNS] == want
        assert (row.predicted_latitude, row.predicted_longitude) == (30.0 + i, -110.0 + i)
    assert set(sub[list(PRED_STATE_COLUMNS)].to_numpy().ravel()) <= set(ENCODER.state_indices)
    assert validate_submission(sub, template) == []


def test_sample_without_views_gets_the_prior_and_is_reported(caplog):
    preds = make_preds(sorted(IDS))
    blind = sorted(IDS).index("000311")
    preds.n_views[blind], preds.probs[blind], preds.gps[blind] = 0, np.nan, np.nan
    sub = build_submission(make_template(), preds, ENCODER, PRIOR)
    row = sub.set_index("sample_id").loc["000311"]
    assert [row[c] for c in PRED_STATE_COLUMNS] == list(PRIOR.top5)
    assert (row["predicted_latitude"], row["predicted_longitude"]) == (PRIOR.lat, PRIOR.lon)
    assert blind_ids(preds) == ["000311"]
    assert "000311" in caplog.text and "prior" in caplog.text
    assert validate_submission(sub, make_template()) == []


def test_fewer_than_five_classes_pad_with_minus_one_and_stay_valid():
    enc = LabelEncoder((9, 30), ("A", "B"))
    preds = make_preds(IDS)
    preds.values["state_probs"] = np.tile(np.array([[0.3, 0.7]], np.float32), (len(IDS), 1))
    sub = build_submission(make_template(), preds, enc, PRIOR)
    assert sub[list(PRED_STATE_COLUMNS)].iloc[0].tolist() == [30, 9, -1, -1, -1]
    assert validate_submission(sub, make_template()) == []


def test_build_refuses_predictions_from_other_data():
    preds = make_preds(["000104", "000007", "000311", "999999"])
    with pytest.raises(ValueError, match=r"000020.*999999"):
        build_submission(make_template(), preds, ENCODER, PRIOR)


# ----------------------------------------------------------------------------- validator


@pytest.fixture
def good():
    return build_submission(make_template(), make_preds(IDS), ENCODER, PRIOR)


def _set(df, row, col, value):
    df = df.copy()
    df[col] = df[col].astype(object)
    df.loc[row, col] = value
    return df


BAD_FILES = {
    "too few rows": (lambda d: d.iloc[:-1], "3 rows, the template has 4"),
    "id not in template": (lambda d: _set(d, 1, "sample_id", "123456"), "not in the template: ['123456']"),
    "duplicate id": (lambda d: _set(d, 1, "sample_id", "000104"), "duplicated sample_id"),
    "wrong order": (lambda d: d.iloc[[1, 0, 2, 3]].reset_index(drop=True), "not in the template's order"),
    "missing column": (lambda d: d.drop(columns="predicted_longitude"), "missing ['predicted_longitude']"),
    "columns reordered": (lambda d: d[list(SUBMISSION_COLUMNS)[::-1]], "out of order"),
    "image name changed": (lambda d: _set(d, 2, "image_east", "x.jpg"), "image_east differs"),
    "NaN state": (lambda d: _set(d, 0, "predicted_state_idx_3", np.nan), "predicted_state_idx_3: missing"),
    "text state": (lambda d: _set(d, 0, "predicted_state_idx_2", "Ohio"), "predicted_state_idx_2: missing"),
    "fractional state": (lambda d: _set(d, 3, "predicted_state_idx_4", 2.5), "not an integer in 1 row(s)"),
    "state 50": (lambda d: _set(d, 0, "predicted_state_idx_5", 50), "predicted_state_idx_5: outside -1..49"),
    "state -2": (lambda d: _set(d, 0, "predicted_state_idx_2", -2), "predicted_state_idx_2: outside -1..49"),
    "-1 first": (lambda d: _set(d, 0, "predicted_state_idx_1", -1), "predicted_state_idx_1: outside 0..49"),
    "NaN latitude": (lambda d: _set(d, 2, "predicted_latitude", np.nan), "predicted_latitude: missing"),
    "latitude 95": (lambda d: _set(d, 2, "predicted_latitude", 95.0), "predicted_latitude: outside -90..90"),
    "longitude -190": (lambda d: _set(d, 1, "predicted_longitude", -190.0), "outside -180..180"),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_validator_rejects_each_kind_of_bad_file(kind, good, tmp_path):
    spoil, message = BAD_FILES[kind]
    path = tmp_path / "bad.csv"
    spoil(good).to_csv(path, index=False)
    problems = validate_submission(path, make_template())
    assert problems, kind
    assert any(message in p for p in problems), problems


def test_validator_names_the_data_line(good):
    problems = validate_submission(_set(good, 2, "predicted_latitude", 95.0), make_template())
    assert "data lines [4]" in problems[0]  # header is line 1, so row 2 is line 4


def test_minus_one_after_position_one_is_valid(good):
    sub = _set(_set(good, 0, "predicted_state_idx_4", -1), 0, "predicted_state_idx_5", -1)
    assert validate_submission(sub, make_template()) == []


def test_point_outside_the_us_is_a_warning_not_an_error(good):
    sub = _set(_set(good, 1, "predicted_latitude", 48.85), 1, "predicted_longitude", 2.35)  # Paris
    errors, warnings = check_submission(sub, make_template())
    assert errors == []
    assert len(warnings) == 1 and "outside the US" in warnings[0] and "[3]" in warnings[0]


def test_repeated_state_in_a_row_is_a_warning(good):
    sub = _set(good, 0, "predicted_state_idx_3", good.loc[0, "predicted_state_idx_1"])
    errors, warnings = check_submission(sub, make_template())
    assert errors == [] and "repeats" in warnings[0]


def test_validator_reports_a_missing_or_empty_file(tmp_path):
    assert "file not found" in validate_submission(tmp_path / "nope.csv", make_template())[0]
    (tmp_path / "empty.csv").write_text("")
    assert "not a readable CSV" in validate_submission(tmp_path / "empty.csv", make_template())[0]


# ----------------------------------------------------------------------------- writing


def test_write_round_trips_and_keeps_ids_as_strings(good, tmp_path):
    path = write_submission(good, tmp_path / "sub" / "submission.csv", make_template())
    back = pd.read_csv(path, dtype={"sample_id": str})
    assert list(back["sample_id"]) == IDS
    np.testing.assert_array_equal(
        back[list(PRED_STATE_COLUMNS)].to_numpy(), good[list(PRED_STATE_COLUMNS)].to_numpy()
    )
    np.testing.assert_allclose(back["predicted_latitude"], good["predicted_latitude"], atol=1e-6)
    assert [p.name for p in path.parent.iterdir()] == ["submission.csv"]  # no temporary file left


def test_invalid_submission_is_not_written_and_the_old_file_survives(good, tmp_path):
    path = tmp_path / "submission.csv"
    path.write_text("previous\n")
    with pytest.raises(SubmissionError, match="predicted_latitude"):
        write_submission(_set(good, 0, "predicted_latitude", np.nan), path, make_template())
    assert path.read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir()] == ["submission.csv"]
