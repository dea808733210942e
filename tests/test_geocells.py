"""Geocells nested in states: borders, size bounds, state probabilities, smoothed targets, round trip."""

import json

import numpy as np
import pytest
import torch

from geoloc.geo import haversine_km
from geoloc.geocells import (
    GeoCells,
    assign_to_cells,
    build_geocells,
    cell_soft_targets,
    spherical_mean,
    sum_by_group,
)
from geoloc.geography import STATE_NAMES, locate, sample_points
from geoloc.labels import LabelEncoder

# original indices with gaps; counts: one tiny state (< min), one just under 2*min, one at max, big ones
COUNTS = {1: 12, 5: 430, 12: 35, 31: 60, 43: 777, 48: 61}


@pytest.fixture(scope="module")
def points():
    rng = np.random.default_rng(0)
    state = np.concatenate([np.full(n, s) for s, n in COUNTS.items()])
    latlon = np.concatenate([sample_points(STATE_NAMES[s], n, rng) for s, n in COUNTS.items()])
    perm = rng.permutation(len(state))
    return latlon[perm], state[perm]


@pytest.fixture(scope="module")
def built(points):
    return build_geocells(*points, min_size=20, max_size=40, seed=0)


def test_cells_never_cross_a_state(points, built):
    _latlon, state = points
    cells, member = built
    assert (cells.state[member] == state).all()  # every member shares its cell's state
    assert cells.cell_to_state is cells.state and set(cells.state) == set(COUNTS)
    # and each state's cells hold exactly that state's points
    for s in COUNTS:
        assert cells.count[cells.state == s].sum() == (state == s).sum()
    # centroids of a multi-cell state lie inside that state's outline (convex-ish clusters in a state)
    inside = locate(cells.centroid[:, 0], cells.centroid[:, 1]) == cells.state
    assert inside.mean() > 0.9


def test_sizes_follow_the_rule(points, built):
    _, _state = points
    cells, member = built
    assert np.array_equal(np.bincount(member, minlength=cells.num_cells), cells.count)
    for s, n in COUNTS.items():
        sizes = cells.count[cells.state == s]
        if n <= 40:  # at most max_size (so also every state under 2 * min_size): one cell
            assert sizes.tolist() == [n]
        else:
            assert (sizes >= 20).all() and (sizes <= 40).all(), (s, sizes)
            assert len(sizes) >= int(np.ceil(n / 40))


def test_cell_ids_grouped_by_state_and_centroid_is_spherical_mean(points, built):
    latlon, _ = points
    cells, member = built
    assert (np.diff(cells.state) >= 0).all()
    for k in (0, cells.num_cells // 2, cells.num_cells - 1):
        assert np.allclose(cells.centroid[k], spherical_mean(latlon[member == k]), atol=1e-9)


def test_cells_are_compact(points, built):
    latlon, _ = points
    cells, member = built
    texas = np.flatnonzero(cells.state == 43)
    assert len(texas) >= 777 // 40
    rows = np.isin(member, texas)
    neighbour = dict(zip(texas, np.roll(texas, 1)))  # another Texas cell for each Texas cell
    own = haversine_km(*latlon[rows].T, *cells.centroid[member[rows]].T)
    other = haversine_km(*latlon[rows].T, *cells.centroid[[neighbour[m] for m in member[rows]]].T)
    assert np.median(own) < 0.5 * np.median(other)  # clusters in space, not random subsets


def test_deterministic_for_a_seed(points, built):
    again, member = build_geocells(*points, min_size=20, max_size=40, seed=0)
    assert np.array_equal(again.centroid, built[0].centroid) and np.array_equal(member, built[1])
    other, _ = build_geocells(*points, min_size=20, max_size=40, seed=1)
    assert other.num_cells > 0  # another seed may or may not differ; it must still satisfy the bounds
    assert (other.count[other.count > 40] == 0).all()


def test_bad_sizes_and_shapes_rejected(points):
    with pytest.raises(ValueError, match="max_size >= 2 \\* min_size - 1"):
        build_geocells(*points, min_size=30, max_size=50)
    with pytest.raises(ValueError, match="3 points but 2 state labels"):
        build_geocells(np.zeros((3, 2)), [1, 2])


def test_duplicate_points_still_split_within_bounds():
    latlon = np.tile([[39.0, -105.0]], (100, 1))
    cells, _member = build_geocells(latlon, np.full(100, 5), min_size=10, max_size=19)
    assert cells.count.sum() == 100 and (cells.count >= 10).all() and (cells.count <= 19).all()


def test_state_probs_are_exact_sums(built):
    cells, _ = built
    enc = LabelEncoder.fit(list(COUNTS))
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 64, size=(7, cells.num_cells)).astype(np.float64)
    probs = raw / 1024  # dyadic: sums are exact in any order
    want = np.stack([probs[:, cells.state == s].sum(1) for s in enc.state_indices], axis=1)
    got = cells.state_probs(probs, enc)
    assert got.shape == (7, enc.num_classes) and np.array_equal(got, want)
    got_t = cells.state_probs(torch.tensor(probs, dtype=torch.float32), enc)
    assert isinstance(got_t, torch.Tensor) and np.array_equal(got_t.numpy(), want.astype(np.float32))
    soft = torch.softmax(torch.randn(5, cells.num_cells), -1)
    assert torch.allclose(cells.state_probs(soft, enc).sum(1), torch.ones(5))


def test_sum_by_group_small_case():
    probs = np.array([[0.5, 0.25, 0.25], [0.0, 1.0, 0.0]])
    assert np.array_equal(sum_by_group(probs, [2, 0, 2], 3), [[0.25, 0.0, 0.75], [1.0, 0.0, 0.0]])


def test_soft_targets_sum_to_one_and_peak_at_the_true_cell(built):
    cells, _ = built
    true = torch.arange(0, cells.num_cells, 3)
    x = torch.tensor(cells.centroid[true.numpy()], dtype=torch.float32)  # points at their cell's centre
    t = cells.soft_targets(x, true, tau_km=75.0)
    assert t.shape == (len(true), cells.num_cells) and t.dtype == torch.float32
    assert torch.allclose(t.sum(1), torch.ones(len(true)))
    assert torch.equal(t.argmax(1), true)


def test_soft_targets_formula_and_stability():
    centroid = np.array([[40.0, -100.0], [40.0, -99.0], [20.0, -156.0]])
    x = torch.tensor([[40.0, -99.6]])
    t = cell_soft_targets(x, torch.tensor([0]), centroid, tau_km=50.0)
    d = haversine_km(40.0, -99.6, centroid[:, 0], centroid[:, 1])
    want = np.exp(-(d - d[0]) / 50.0)
    assert np.allclose(t.numpy()[0], want / want.sum(), atol=1e-6)
    tiny = cell_soft_targets(x, torch.tensor([2]), centroid, tau_km=0.01)  # exponents of +-1e8
    assert torch.isfinite(tiny).all() and torch.allclose(tiny.sum(1), torch.ones(1))


def test_assign_new_points_to_the_nearest_cell_of_their_state(points, built):
    latlon, state = points
    cells, member = built
    # a cell's centroid is assigned to that cell
    assert np.array_equal(cells.assign(cells.centroid, cells.state), np.arange(cells.num_cells))
    got = cells.assign(latlon, state)
    assert (cells.state[got] == state).all()  # never another state's cell, even near a border
    assert (got == member).mean() > 0.8  # mostly its member cell
    # brute force nearest within the state
    d = haversine_km(latlon[:, None, 0], latlon[:, None, 1], *cells.centroid.T[:, None, :])
    d[state[:, None] != cells.state[None, :]] = np.inf
    assert np.array_equal(got, d.argmin(1))
    assert np.array_equal(assign_to_cells(latlon, state, cells.centroid, cells.state, chunk=7), got)


def test_assign_unknown_state_is_an_error(built):
    with pytest.raises(ValueError, match=r"state index\(es\) \[0\] have no geocell"):
        built[0].assign([[32.0, -86.0]], [0])


def test_to_dict_round_trip_is_json_safe(built):
    cells, _ = built
    d = json.loads(json.dumps(cells.to_dict()))
    back = GeoCells.from_dict(d)
    assert np.array_equal(back.state, cells.state) and np.array_equal(back.count, cells.count)
    assert np.array_equal(back.centroid, cells.centroid)
    assert (back.min_size, back.max_size, back.seed) == (20, 40, 0)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d.pop("centroid"), "missing key"),
        (lambda d: d.update(version=2), "version 1"),
        (lambda d: d.update(count=d["count"][:-1]), "counts"),
        (lambda d: d.update(state=["x"] * len(d["state"])), "not numeric"),
    ],
)
def test_from_dict_rejects_malformed(built, edit, match):
    d = built[0].to_dict()
    edit(d)
    with pytest.raises(ValueError, match=match):
        GeoCells.from_dict(d)


def test_spherical_mean_across_the_antimeridian():
    mean = spherical_mean([[52.0, 179.0], [52.0, -179.0]])
    assert mean[0] == pytest.approx(52.0, abs=0.01) and abs(mean[1]) == pytest.approx(180.0, abs=1e-6)
