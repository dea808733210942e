"""Haversine, centroids, distance matrix and the two haversine-smoothed soft-label modes."""

import math

import numpy as np
import pytest
import torch

from geoloc.geo import (
    EARTH_RADIUS_KM,
    distance_matrix,
    haversine_km,
    make_soft_labels,
    soft_labels_sample,
    soft_labels_state,
    state_centroids,
)

KM_PER_DEG = math.pi * EARTH_RADIUS_KM / 180  # one degree of a great circle, ~111.195 km

# (lat, lon) in degrees: New York City Hall, Los Angeles City Hall, London (Charing Cross), Paris (Notre-Dame)
NYC, LA = (40.7128, -74.0060), (34.0522, -118.2437)
LONDON, PARIS = (51.5074, -0.1278), (48.8566, 2.3522)


def test_known_city_pairs():
    # published great-circle distances: NYC-LA ~3936 km, London-Paris ~344 km
    assert haversine_km(*NYC, *LA) == pytest.approx(3936, abs=2)
    assert haversine_km(*LONDON, *PARIS) == pytest.approx(344, abs=1)


def test_symmetric_and_one_degree():
    assert haversine_km(*NYC, *LA) == pytest.approx(haversine_km(*LA, *NYC), rel=1e-12)
    assert haversine_km(10.0, 20.0, 11.0, 20.0) == pytest.approx(KM_PER_DEG, rel=1e-9)
    assert haversine_km(0.0, 20.0, 0.0, 21.0) == pytest.approx(KM_PER_DEG, rel=1e-9)  # on the equator


def test_zero_and_antipodes_exact():
    assert haversine_km(*NYC, *NYC) == 0.0
    half_circle = math.pi * EARTH_RADIUS_KM
    assert haversine_km(0.0, 0.0, 0.0, 180.0) == pytest.approx(half_circle, rel=1e-12)
    assert haversine_km(90.0, 0.0, -90.0, 0.0) == pytest.approx(half_circle, rel=1e-12)
    # for this antipodal pair rounding gives a = 1 + 2e-16: without the clamp sqrt(1 - a) is NaN
    assert haversine_km(-20.7, -100.0, 20.7, 80.0) == pytest.approx(half_circle, rel=1e-12)
    pred = torch.tensor([-20.7, -100.0], dtype=torch.float64, requires_grad=True)
    haversine_km(pred[0], pred[1], 20.7, 80.0).backward()
    assert torch.isfinite(pred.grad).all()


def test_numpy_torch_agree_and_broadcast():
    lat1, lon1 = np.array([NYC[0], LONDON[0], 0.0]), np.array([NYC[1], LONDON[1], 0.0])
    lat2, lon2 = np.array([LA[0], PARIS[0], 0.0]), np.array([LA[1], PARIS[1], 180.0])
    d_np = haversine_km(lat1, lon1, lat2, lon2)
    d_t64 = haversine_km(*(torch.from_numpy(a) for a in (lat1, lon1, lat2, lon2)))
    d_t32 = haversine_km(*(torch.from_numpy(a).float() for a in (lat1, lon1, lat2, lon2)))
    assert isinstance(d_np, np.ndarray) and isinstance(d_t64, torch.Tensor)
    assert d_t32.dtype == torch.float32 and d_t64.dtype == torch.float64
    np.testing.assert_allclose(d_t64.numpy(), d_np, rtol=1e-12)
    np.testing.assert_allclose(d_t32.numpy(), d_np, rtol=1e-5)
    # (3, 1) against (1, 3) broadcasts to (3, 3); a scalar mixed with a tensor becomes a tensor
    assert haversine_km(lat1[:, None], lon1[:, None], lat2[None], lon2[None]).shape == (3, 3)
    assert isinstance(haversine_km(torch.tensor(10.0), 20.0, 11.0, 20.0), torch.Tensor)


def test_torch_gradient_finite_at_zero_and_correct_elsewhere():
    pred = torch.tensor([[40.0, -100.0], [30.0, -90.0]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[40.0, -100.0], [31.0, -90.0]], dtype=torch.float64)  # row 0: zero distance
    d = haversine_km(pred[:, 0], pred[:, 1], target[:, 0], target[:, 1])
    d.sum().backward()
    assert d[0].item() == 0.0
    assert torch.isfinite(pred.grad).all()
    # moving north towards a target 1 degree north shortens the distance by ~KM_PER_DEG per degree
    assert pred.grad[1, 0].item() == pytest.approx(-KM_PER_DEG, rel=1e-6)


def test_state_centroids_mean_per_class():
    lat = [10.0, 20.0, 40.0, 0.0]
    lon = [-100.0, -110.0, -80.0, -70.0]
    classes = [0, 0, 2, 1]
    c = state_centroids(lat, lon, classes, num_classes=3)
    np.testing.assert_allclose(c, [[15.0, -105.0], [0.0, -70.0], [40.0, -80.0]])


def test_state_centroids_names_empty_class():
    with pytest.raises(ValueError, match=r"\[1\]"):
        state_centroids([10.0, 20.0], [-100.0, -90.0], [0, 2], num_classes=3)
    with pytest.raises(ValueError, match="classes must lie"):
        state_centroids([10.0], [-100.0], [3], num_classes=3)


def test_distance_matrix_numpy_and_torch():
    c = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    d = distance_matrix(c)
    assert d.shape == (3, 3)
    np.testing.assert_array_equal(np.diag(d), 0.0)
    np.testing.assert_allclose(d, d.T)
    assert d[0, 1] == pytest.approx(KM_PER_DEG) and d[0, 2] == pytest.approx(KM_PER_DEG)
    assert d[1, 2] == pytest.approx(math.sqrt(2) * KM_PER_DEG, rel=1e-3)  # small right triangle at 0N
    np.testing.assert_allclose(distance_matrix(torch.from_numpy(c)).numpy(), d, rtol=1e-12)


def _line_dist():
    """3 states on a line, 75 km apart."""
    return torch.tensor([[0.0, 75.0, 150.0], [75.0, 0.0, 75.0], [150.0, 75.0, 0.0]])


def test_state_mode_hand_computed():
    p = soft_labels_state(torch.tensor([0, 1]), _line_dist(), tau_km=75.0)
    # true 0: exp(0), exp(-75/75), exp(-150/75) normalised; true 1: exp(-1), exp(0), exp(-1)
    e = math.exp(-1.0)
    row0 = torch.tensor([1.0, e, e * e]) / (1 + e + e * e)
    row1 = torch.tensor([e, 1.0, e]) / (1 + 2 * e)
    torch.testing.assert_close(p, torch.stack([row0, row1]))


def test_state_mode_properties_and_tiny_tau():
    rng = np.random.default_rng(0)
    cents = np.stack([rng.uniform(25, 48, 7), rng.uniform(-124, -70, 7)], axis=1)
    dist = distance_matrix(cents)
    true = torch.arange(7)
    p = soft_labels_state(true, dist, tau_km=75.0)
    assert p.shape == (7, 7) and (p >= 0).all()
    torch.testing.assert_close(p.sum(1), torch.ones(7))
    assert (p.argmax(1) == true).all()
    one_hot = soft_labels_state(true, dist, tau_km=1e-3)
    torch.testing.assert_close(one_hot, torch.eye(7))


def test_sample_mode_hand_computed():
    # centroids on the equator at lon 0, 1, 2; the sample sits at lon 0.5, its true state is 0
    cents = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    x = torch.tensor([[0.0, 0.5]])
    p = soft_labels_sample(torch.tensor([0]), x, cents, tau_km=KM_PER_DEG)
    # d = 0.5, 0.5, 1.5 degrees; exponents -(d - d_true)/tau = 0, 0, -1  -> 1, 1, e^-1 normalised
    e = math.exp(-1.0)
    torch.testing.assert_close(p, torch.tensor([[1.0, 1.0, e]]) / (2 + e))


def test_sample_mode_at_true_centroid_favours_true_state():
    rng = np.random.default_rng(1)
    cents = torch.tensor(np.stack([rng.uniform(25, 48, 6), rng.uniform(-124, -70, 6)], axis=1))
    true = torch.tensor([0, 3, 5])
    p = soft_labels_sample(true, cents[true], cents, tau_km=75.0)
    assert p.shape == (3, 6) and (p >= 0).all()
    torch.testing.assert_close(p.sum(1), torch.ones(3))
    assert (p.argmax(1) == true).all()


def test_sample_mode_numerically_safe_far_from_true_state():
    # the point sits on state 1's centroid but is labelled 0: exp(+(d_true - d_1)/tau) would overflow
    cents = torch.tensor([[30.0, -100.0], [45.0, -75.0]])
    p = soft_labels_sample(torch.tensor([0]), cents[1:2], cents, tau_km=0.01)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p, torch.tensor([[0.0, 1.0]]))


def test_make_soft_labels_dispatch_and_errors():
    cents = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    dist = distance_matrix(cents)
    true, x = torch.tensor([2]), torch.tensor([[0.0, 1.9]])
    torch.testing.assert_close(make_soft_labels("state", true, x, cents, dist), soft_labels_state(true, dist))
    torch.testing.assert_close(
        make_soft_labels("sample", true, x, cents, dist, 50.0), soft_labels_sample(true, x, cents, 50.0)
    )
    with pytest.raises(ValueError, match="choose one of"):
        make_soft_labels("nearest", true, x, cents, dist)
    with pytest.raises(ValueError, match=r"rows \[1\]"):  # an unlabelled (-1) row would wrap around
        soft_labels_state(torch.tensor([0, -1]), dist)
