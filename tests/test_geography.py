"""State outlines from the Census boundary file: names, point-in-state, sampling, plotting rings."""

import numpy as np
import pytest
from shapely.geometry import box

from geoloc import geography
from geoloc.geography import STATE_NAMES, contains, locate, outline_rings, sample_points, state_geometry
from geoloc.synth import STATES

# (lat, lon) of city halls / downtowns
CITIES = {
    "Colorado": (39.7392, -104.9903),  # Denver
    "Illinois": (41.8781, -87.6298),  # Chicago
    "Alaska": (61.2181, -149.9003),  # Anchorage
    "Hawaii": (21.3069, -157.8583),  # Honolulu
    "California": (34.0522, -118.2437),  # Los Angeles
    "New York": (40.7128, -74.0060),  # New York City
    "Texas": (29.7604, -95.3698),  # Houston
    "Florida": (25.7617, -80.1918),  # Miami
    "Rhode Island": (41.8240, -71.4128),  # Providence
    "Maine": (43.6591, -70.2568),  # Portland
    "Oregon": (45.5152, -122.6784),  # Portland
    "Michigan": (46.4977, -84.3476),  # Sault Ste. Marie (upper peninsula)
}


def test_fifty_states_alphabetical_same_as_synth():
    states = geography.load_states()
    assert list(states) == list(STATE_NAMES) == sorted(STATE_NAMES) == [s[0] for s in STATES]
    assert len(states) == 50 and "District of Columbia" not in states and "Puerto Rico" not in states
    assert all(g.is_valid and not g.is_empty for g in states.values())


def test_load_is_cached():
    assert geography.load_states() is geography.load_states()


def test_known_cities_fall_in_their_state():
    names = list(CITIES)
    lat, lon = np.array([CITIES[n] for n in names]).T
    assert [STATE_NAMES[i] for i in locate(lat, lon)] == names
    for name, (la, lo) in CITIES.items():
        assert contains(name, [la], [lo]).all()
        assert not contains("Wyoming", [la], [lo]).any()


def test_points_in_no_state():
    # Washington DC, the Gulf of Mexico, Toronto, Puerto Rico (San Juan), London
    lat = [38.8977, 25.0, 43.6532, 18.4655, 51.5074]
    lon = [-77.0365, -90.0, -79.3832, -66.1057, -0.1278]
    assert (locate(lat, lon) == -1).all()


def test_alaska_across_the_antimeridian():
    parts = [p for p in state_geometry("Alaska").geoms if p.bounds[0] > 0]  # Aleutians east of 180
    assert parts
    pt = parts[0].representative_point()
    assert locate([pt.y], [pt.x])[0] == STATE_NAMES.index("Alaska")


def test_locate_scalar_and_border_rule():
    assert locate(39.7392, -104.9903).shape == (1,)
    # a vertex of the Colorado-Wyoming border lies on both outlines: the lower index (Colorado) wins
    co, wy = (np.asarray(state_geometry(n).geoms[0].exterior.coords) for n in ("Colorado", "Wyoming"))
    lon, lat = sorted(set(map(tuple, co)) & set(map(tuple, wy)))[5]
    assert contains("Colorado", [lat], [lon])[0] and contains("Wyoming", [lat], [lon])[0]
    assert STATE_NAMES[locate(lat, lon)[0]] == "Colorado"


def test_unknown_state_name():
    with pytest.raises(KeyError, match="unknown state 'Atlantis'"):
        state_geometry("Atlantis")


@pytest.mark.parametrize("name", ["Alaska", "Hawaii", "Rhode Island", "Michigan", "Colorado", "Maryland"])
def test_sampled_points_are_inside(name):
    pts = sample_points(name, 400, np.random.default_rng(0))
    assert pts.shape == (400, 2)
    assert contains(name, pts[:, 0], pts[:, 1]).all()
    assert (locate(pts[:, 0], pts[:, 1]) == STATE_NAMES.index(name)).mean() >= 0.99  # borders may tie
    assert (pts[:, 1] <= 0).all()  # western hemisphere by default
    assert len(np.unique(pts, axis=0)) == 400


def test_sampling_is_deterministic_and_uniform_by_area():
    a = sample_points("Colorado", 2000, np.random.default_rng(5))
    assert np.array_equal(a, sample_points("Colorado", 2000, np.random.default_rng(5)))
    # Colorado is almost a lat/lon rectangle: its west half (by longitude) holds about half the points
    lon0, _, lon1, _ = state_geometry("Colorado").bounds
    west = (a[:, 1] < (lon0 + lon1) / 2).mean()
    assert 0.45 < west < 0.55
    # equal-area: the northern half in sin(latitude) holds about half too
    lat0, lat1 = 37.0, 41.0
    mid = np.rad2deg(np.arcsin((np.sin(np.deg2rad(lat0)) + np.sin(np.deg2rad(lat1))) / 2))
    assert 0.45 < (a[:, 0] > mid).mean() < 0.55


def test_sampling_hawaii_reaches_several_islands():
    pts = sample_points("Hawaii", 1000, np.random.default_rng(1))
    big_island = box(-156.1, 18.9, -154.8, 20.3)
    share = np.mean([big_island.contains(geography.shapely.Point(lo, la)) for la, lo in pts])
    assert 0.5 < share < 0.75  # the Big Island is ~63% of Hawaii's land; the rest is elsewhere


def test_sample_zero_points():
    assert sample_points("Utah", 0, np.random.default_rng(0)).shape == (0, 2)


def test_outline_rings_for_plotting():
    full = outline_rings("Colorado")
    assert len(full) == 1 and full[0].shape[1] == 2
    lon, lat = full[0][:, 0], full[0][:, 1]
    assert -109.1 < lon.min() < -109.0 and 40.9 < lat.max() < 41.1
    simple = outline_rings("Michigan", tolerance=0.05)
    assert sum(len(r) for r in simple) < sum(len(r) for r in outline_rings("Michigan")) / 5
    rings = geography.all_outline_rings(0.05)
    assert list(rings) == list(STATE_NAMES) and rings is geography.all_outline_rings(0.05)
