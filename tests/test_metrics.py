"""Competition metrics on hand-computed cases, top-5 decoding and the prior baseline."""

import json
import math

import numpy as np
import pytest

from geoloc.geo import EARTH_RADIUS_KM
from geoloc.labels import LabelEncoder
from geoloc.metrics import (
    TOP5_WEIGHTS,
    Prior,
    competition_metrics,
    gps_score,
    position_match_rates,
    top5_from_probs,
    weighted_top5,
)

KM_PER_DEG = math.pi * EARTH_RADIUS_KM / 180

# truths 7, 3, 12, 5: first match at position 1, 3, none, 1
PRED = [[7, 1, 2, 4, 5], [1, 2, 3, 4, 5], [0, 1, 2, 4, 5], [5, 0, 1, 2, 4]]
TRUE = [7, 3, 12, 5]


def test_weights():
    assert TOP5_WEIGHTS == (1.0, 0.6, 0.4, 0.25, 0.15)


def test_weighted_top5_hand_computed():
    assert weighted_top5(PRED[:3], TRUE[:3]) == pytest.approx((1.0 + 0.4 + 0.0) / 3)
    # every position once: (1 + 0.6 + 0.4 + 0.25 + 0.15) / 5
    pred = [[9, 1, 2, 3, 4], [1, 9, 2, 3, 4], [1, 2, 9, 3, 4], [1, 2, 3, 9, 4], [1, 2, 3, 4, 9]]
    assert weighted_top5(pred, [9] * 5) == pytest.approx(2.4 / 5)


def test_duplicates_and_minus_one_never_score():
    # the true state repeated: only its first position counts (1.0, not 1.0 + 0.6 + ...)
    assert weighted_top5([[7, 7, 7, 7, 7]], [7]) == 1.0
    # a repeated wrong guess keeps its slot: the truth at position 3 scores 0.4
    assert weighted_top5([[3, 3, 7, 7, 1]], [7]) == pytest.approx(0.4)
    # -1 is padding, never a match, even against a -1 truth
    assert weighted_top5([[-1, -1, -1, -1, -1]], [-1]) == 0.0
    assert weighted_top5([[-1, -1, 7, -1, -1]], [7]) == pytest.approx(0.4)


def test_position_match_rates():
    # positions 1, 3, none, 1 over 4 samples
    assert position_match_rates(PRED, TRUE) == pytest.approx([0.5, 0.0, 0.25, 0.0, 0.0])
    assert position_match_rates([[7, 7, 7, 7, 7]], [7]) == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_shape_errors():
    with pytest.raises(ValueError, match=r"\(N, 5\)"):
        weighted_top5([[1, 2, 3]], [1])
    with pytest.raises(ValueError, match=r"\(N, 5\)"):
        weighted_top5(PRED, TRUE[:2])


def test_gps_score():
    assert gps_score(0.0) == 1.0
    assert gps_score(1000.0) == pytest.approx(0.8)
    assert gps_score(5000.0) == 0.0
    assert gps_score(12000.0) == 0.0  # clamped, never negative


def _latlon_case():
    """4 predictions due north of the truth by 0, 0.1, 1 and 10 degrees (same meridian)."""
    offsets = np.array([0.0, 0.1, 1.0, 10.0])
    true = np.stack([np.full(4, 30.0), np.full(4, -100.0)], axis=1)
    pred = true + np.stack([offsets, np.zeros(4)], axis=1)
    return pred, true, offsets * KM_PER_DEG  # km: 0, 11.1, 111.2, 1112.0


def test_competition_metrics_hand_computed():
    pred_ll, true_ll, km = _latlon_case()
    m = competition_metrics(PRED, TRUE, pred_ll, true_ll)
    cls = (1.0 + 0.4 + 0.0 + 1.0) / 4
    mean_km = (0 + 0.1 + 1 + 10) * KM_PER_DEG / 4  # ~308.6 km
    gps = 1 - mean_km / 5000
    assert m["cls_score"] == pytest.approx(cls)
    assert m["mean_km"] == pytest.approx(mean_km)
    assert m["gps_score"] == pytest.approx(gps)
    assert m["score"] == pytest.approx(0.7 * cls + 0.3 * gps)
    assert m["top1_acc"] == pytest.approx(0.5) and m["top5_acc"] == pytest.approx(0.75)
    assert [m[f"match_rate_{k}"] for k in range(1, 6)] == pytest.approx([0.5, 0, 0.25, 0, 0])
    assert m["median_km"] == pytest.approx((km[1] + km[2]) / 2)
    # numpy's linear quantile: position 0.9 * (4 - 1) = 2.7 between the 3rd and 4th sorted distance
    assert m["p90_km"] == pytest.approx(km[2] + 0.7 * (km[3] - km[2]))
    assert m["within_25km"] == 0.5 and m["within_200km"] == 0.75 and m["within_750km"] == 0.75
    assert m["n"] == 4


def test_competition_metrics_keys_are_plain_floats():
    pred_ll, true_ll, _ = _latlon_case()
    m = competition_metrics(PRED, TRUE, pred_ll, true_ll)
    keys = {"score", "cls_score", "gps_score", "top1_acc", "top5_acc", "mean_km", "median_km", "p90_km"}
    keys |= {f"match_rate_{k}" for k in range(1, 6)} | {"within_25km", "within_200km", "within_750km", "n"}
    assert set(m) == keys
    assert all(type(v) is float for v in m.values())
    assert json.loads(json.dumps(m)) == m


def test_competition_metrics_rejects_bad_coordinates():
    pred_ll, true_ll, _ = _latlon_case()
    pred_ll[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"pred_latlon.*rows \[2\]"):
        competition_metrics(PRED, TRUE, pred_ll, true_ll)
    with pytest.raises(ValueError, match="N > 0"):
        competition_metrics(np.zeros((0, 5)), [], np.zeros((0, 2)), np.zeros((0, 2)))


def test_top5_from_probs_decodes_pads_and_breaks_ties():
    enc = LabelEncoder.fit([17, 4, 9])  # classes 0, 1, 2 are states 4, 9, 17
    probs = np.array([[0.2, 0.5, 0.3], [0.4, 0.2, 0.4]])
    top5 = top5_from_probs(probs, enc)
    assert top5.dtype == np.int64
    # row 1 ties classes 0 and 2: the lower class (state 4) comes first
    np.testing.assert_array_equal(top5, [[9, 17, 4, -1, -1], [4, 17, 9, -1, -1]])
    enc7 = LabelEncoder.fit([0, 2, 5, 8, 11, 30, 49])
    probs7 = np.array([[0.05, 0.3, 0.1, 0.05, 0.2, 0.1, 0.2]])
    np.testing.assert_array_equal(top5_from_probs(probs7, enc7), [[2, 11, 49, 5, 30]])
    with pytest.raises(ValueError, match=r"\(N, 7\)"):
        top5_from_probs(probs, enc7)


def test_prior_fit_predict_roundtrip():
    states = [5, 5, 2, 2, 9, 9, 9, 1, 30, 12]
    latlon = np.array([[30.0 + i, -100.0 - 2 * i] for i in range(10)])
    prior = Prior.fit(states, latlon)
    # counts: 9 x3, then 2 and 5 x2, then 1, 12, 30 x1 (ties: lowest state first)
    assert prior.top5 == (9, 2, 5, 1, 12)
    assert prior.lat == pytest.approx(34.5) and prior.lon == pytest.approx(-109.0)
    top5, ll = prior.predict(3)
    np.testing.assert_array_equal(top5, [[9, 2, 5, 1, 12]] * 3)
    np.testing.assert_allclose(ll, [[34.5, -109.0]] * 3)
    assert Prior.from_dict(json.loads(json.dumps(prior.to_dict()))) == prior


def test_prior_pads_and_scores():
    prior = Prior.fit([3, 3, 8], [[40.0, -90.0], [40.0, -90.0], [43.0, -93.0]])
    assert prior.top5 == (3, 8, -1, -1, -1)
    top5, ll = prior.predict(2)
    m = competition_metrics(top5, [8, 20], ll, [[41.0, -91.0], [41.0, -91.0]])
    assert m["cls_score"] == pytest.approx((0.6 + 0.0) / 2) and m["mean_km"] == 0.0
    with pytest.raises(ValueError, match="labels >= 0"):
        Prior.fit([3, -1], [[40.0, -90.0], [41.0, -91.0]])
