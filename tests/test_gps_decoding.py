"""Spherical weighted median, Bayes-optimal point of a cell posterior, argmax decoding."""

import numpy as np
import pytest
import torch

from geoloc.geo import haversine_km
from geoloc.gps_decoding import (
    argmax_centroid,
    bayes_point,
    expected_distance_km,
    spherical_median,
)


def _grid_min(points, weights, lat_range, lon_range, step):
    """Brute force: the least expected distance over a lat/lon grid (one row)."""
    lat, lon = np.meshgrid(np.arange(*lat_range, step), np.arange(*lon_range, step), indexing="ij")
    d = haversine_km(lat.ravel()[:, None], lon.ravel()[:, None], points[None, :, 0], points[None, :, 1])
    cost = (d * weights).sum(1) / weights.sum()
    return cost.min()


def test_median_of_one_point_is_the_point():
    pts = np.array([[[40.0, -105.0]], [[21.3, -157.8]], [[52.0, 179.5]]])
    got = spherical_median(pts, np.ones((3, 1)))
    assert np.allclose(got, pts[:, 0], atol=1e-9)


def test_median_of_symmetric_points_is_the_centre():
    # four points at equal distance north/south/east/west of (0, -100) on the equator: exact symmetry
    pts = np.array([[[1.0, -100.0], [-1.0, -100.0], [0.0, -99.0], [0.0, -101.0]]])
    assert np.allclose(spherical_median(pts), [[0.0, -100.0]], atol=1e-7)
    # two points, equal weight: any point of the arc is optimal; the start (the midpoint) is kept
    two = np.array([[[30.0, -90.0], [40.0, -90.0]]])
    assert np.allclose(spherical_median(two), [[35.0, -90.0]], atol=1e-6)


def test_majority_weight_wins():
    # a point holding more than half the weight is the median (the classical Weiszfeld property)
    pts = np.array([[[40.0, -120.0], [35.0, -80.0], [45.0, -75.0]]])
    w = np.array([[0.55, 0.25, 0.2]])
    assert np.allclose(spherical_median(pts, w), pts[:, 0], atol=1e-5)


def test_median_minimises_expected_distance_against_a_grid():
    rng = np.random.default_rng(0)
    pts = np.stack([rng.uniform(30, 45, 7), rng.uniform(-120, -80, 7)], axis=1)
    w = rng.uniform(0.1, 1.0, 7)
    med = spherical_median(pts[None], w[None])
    cost = expected_distance_km(med, pts[None], w[None])[0]
    grid = _grid_min(pts, w, (28, 47), (-122, -78), 0.1)
    assert cost <= grid + 1e-6  # no grid point does better
    assert cost > grid - 5.0  # and the grid gets close (0.1 degree cells)


def test_antimeridian_is_not_a_seam():
    pts = np.array([[[52.0, 179.0], [52.0, -179.0], [53.0, 179.8]]])
    med = spherical_median(pts)
    assert 51.9 < med[0, 0] < 53.1 and abs(med[0, 1]) > 178.9  # near +-180, never near 0
    cost = expected_distance_km(med, pts, np.ones((1, 3)))[0]
    assert cost < 100


def test_batched_equals_per_row():
    rng = np.random.default_rng(1)
    pts = np.stack([rng.uniform(25, 48, (6, 9)), rng.uniform(-124, -68, (6, 9))], axis=-1)
    w = rng.uniform(0, 1, (6, 9))
    w[2, 3:] = 0  # padding by zero weight
    batch = spherical_median(pts, w)
    rows = np.concatenate([spherical_median(pts[i : i + 1], w[i : i + 1]) for i in range(6)])
    assert np.allclose(batch, rows, atol=1e-9)
    assert np.allclose(spherical_median(pts[2:3, :3], w[2:3, :3]), batch[2:3], atol=1e-9)


def test_torch_in_torch_out_and_zero_weight_rows_rejected():
    pts = torch.tensor([[[30.0, -90.0], [31.0, -91.0]]])
    out = spherical_median(pts, torch.tensor([[1.0, 3.0]]))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (1, 2)
    with pytest.raises(ValueError, match="positive total weight"):
        spherical_median(pts, torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"points \(N, K, 2\) and weights \(N, K\)"):
        spherical_median(pts, torch.ones(1, 3))


def test_bayes_point_beats_argmax_on_a_split_posterior():
    # one western cell is the single most likely, but 70% of the mass sits in three eastern cells
    centroids = np.array([[40.0, -120.0], [40.0, -80.0], [41.0, -80.5], [39.0, -79.5], [33.0, -97.0]])
    probs = np.array([[0.29, 0.25, 0.23, 0.22, 0.01]])
    bayes, top1 = bayes_point(probs, centroids, top_k=None), argmax_centroid(probs, centroids)
    assert np.allclose(top1, [[40.0, -120.0]])
    cost_bayes = expected_distance_km(bayes, centroids[None], probs)[0]
    cost_top1 = expected_distance_km(top1, centroids[None], probs)[0]
    assert cost_bayes < 0.5 * cost_top1
    assert cost_bayes <= _grid_min(centroids, probs[0], (30, 45), (-125, -75), 0.1) + 1e-6


def test_bayes_point_top_k_and_torch():
    centroids = torch.tensor([[40.0, -120.0], [40.0, -80.0], [41.0, -80.5], [20.0, -156.0]])
    probs = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.7, 0.1, 0.1, 0.1]])
    top2 = bayes_point(probs, centroids, top_k=2)
    want = spherical_median(centroids[torch.tensor([[1, 2], [0, 1]])], torch.tensor([[0.5, 0.3], [0.7, 0.1]]))
    assert torch.allclose(top2, want)
    assert torch.allclose(bayes_point(probs, centroids, top_k=1), argmax_centroid(probs, centroids))
    assert torch.allclose(argmax_centroid(probs, centroids), centroids[[1, 0]])


def test_expected_distance_matches_haversine():
    pts = np.array([[[40.0, -105.0], [34.0, -118.0]]])
    w = np.array([[1.0, 3.0]])
    x = np.array([[39.0, -100.0]])
    want = (haversine_km(39.0, -100.0, 40.0, -105.0) + 3 * haversine_km(39.0, -100.0, 34.0, -118.0)) / 4
    assert expected_distance_km(x, pts, w)[0] == pytest.approx(want, rel=1e-9)
