"""The report map: state outlines behind the points, the view limited to the data, PNG written."""

import sys

import numpy as np
import pytest
from matplotlib.collections import LineCollection

from geoloc import geography
from geoloc.infer import report

TRUE = np.array([[39.74, -104.99], [41.88, -87.63], [29.76, -95.37]])  # Denver, Chicago, Houston
PRED = np.array([[40.5, -100.0], [40.0, -86.0], [31.0, -97.0]])
CENTROIDS = np.array([[39.0, -105.5], [40.0, -89.2], [31.5, -99.3]])
NAMES = ["Colorado", "Illinois", "Texas"]


@pytest.fixture
def spy(monkeypatch):
    calls = []
    original = report.draw_outlines

    def record(ax, rings):
        lines = original(ax, rings)
        calls.append({"rings": rings, "lines": lines, "in_axes": lines in ax.collections, "ax": ax})
        return lines

    monkeypatch.setattr(report, "draw_outlines", record)
    return calls


def test_map_draws_every_state_outline_and_writes_a_png(tmp_path, spy):
    path = report.plot_map(PRED, TRUE, CENTROIDS, NAMES, tmp_path / "map.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    (call,) = spy
    want = sum(len(r) for r in geography.all_outline_rings(report.OUTLINE_TOLERANCE_DEG).values())
    assert len(call["rings"]) == want >= 50  # every ring of every state (islands included)
    assert isinstance(call["lines"], LineCollection) and call["in_axes"]
    assert len(call["lines"].get_segments()) == want
    assert all(r.ndim == 2 and r.shape[1] == 2 for r in call["rings"])


def test_map_view_is_the_data_extent_not_the_aleutians(tmp_path, spy):
    report.plot_map(PRED, TRUE, CENTROIDS, NAMES, tmp_path / "map.png")
    ax = spy[0]["ax"]
    lon0, lon1, lat0, lat1 = report.map_extent(TRUE, PRED, CENTROIDS)
    assert ax.get_xlim() == pytest.approx((lon0, lon1)) and ax.get_ylim() == pytest.approx((lat0, lat1))
    assert lon0 == pytest.approx(-105.5 - report.MAP_MARGIN_DEG) and lat1 == pytest.approx(41.88 + 2.0)


def test_outlines_are_simplified_for_speed():
    full = sum(len(r) for n in geography.STATE_NAMES for r in geography.outline_rings(n))
    drawn = sum(len(r) for r in report.state_outline_rings())
    assert drawn < full / 10


def test_map_extent_skips_nan_and_has_a_default():
    ext = report.map_extent(np.array([[np.nan, np.nan], [20.0, -156.0]]), np.array([[61.0, -150.0]]))
    assert ext == (-158.0, -148.0, 18.0, 63.0)
    assert report.map_extent(np.full((2, 2), np.nan)) == (-125.0, -66.0, 24.0, 50.0)


def test_map_without_the_boundary_file_warns_and_still_renders(tmp_path, monkeypatch, spy):
    monkeypatch.setitem(sys.modules, "geoloc.geography", None)  # import fails as if plotly-geo were absent
    with pytest.warns(UserWarning, match="without state outlines"):
        path = report.plot_map(PRED, TRUE, CENTROIDS, NAMES, tmp_path / "map.png")
    assert path.stat().st_size > 0 and spy[0]["rings"] == []
