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


# ----------------------------------------------------------------------------- embeddings picture


def _clusters(n: int, classes: int = 3, dim: int = 16, seed: int = 0):
    """``n`` points in ``classes`` well separated clusters: (N, D) float32 and (N,) classes."""
    rng = np.random.default_rng(seed)
    cls = np.arange(n) % classes
    centres = rng.normal(scale=10.0, size=(classes, dim))
    return (centres[cls] + rng.normal(size=(n, dim))).astype(np.float32), cls


@pytest.fixture
def projected(monkeypatch):
    """Every input ``project_2d`` receives."""
    calls = []
    original = report.project_2d

    def record(x, seed=0):
        calls.append(np.array(x))
        return original(x, seed)

    monkeypatch.setattr(report, "project_2d", record)
    return calls


def test_subsample_is_deterministic_and_capped():
    assert np.array_equal(report.subsample(7, 10), np.arange(7))
    a, b = report.subsample(20_000, 5000), report.subsample(20_000, 5000)
    assert np.array_equal(a, b) and len(np.unique(a)) == 5000 and np.all(np.diff(a) > 0)
    assert not np.array_equal(a, report.subsample(20_000, 5000, seed=1))


def test_embedding_picture_plots_every_point_and_names_the_frequent_states(tmp_path, projected, monkeypatch):
    monkeypatch.setattr(report, "EMBEDDING_LEGEND", 2)
    emb, cls = _clusters(60)
    cls[:30] = 0  # class 0 the most frequent, then 1 (15 of the others), then 2
    path = tmp_path / "embeddings.png"
    info = report.plot_embeddings(emb, cls, NAMES, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert info == {"points": 60, "of": 60, "method": "t-SNE", "legend": ["Colorado", "Illinois"]}
    (x,) = projected
    np.testing.assert_array_equal(x, emb)


def test_embedding_picture_subsamples_beyond_the_cap_deterministically_and_skips_nan(tmp_path, projected):
    emb, cls = _clusters(40)
    emb[5] = np.nan  # a sample without any view
    first = report.plot_embeddings(emb, cls, NAMES, tmp_path / "a.png", cap=25)
    second = report.plot_embeddings(emb, cls, NAMES, tmp_path / "b.png", cap=25)
    assert first["points"] == 25 and first["of"] == 39 and first == second
    assert len(projected) == 2 and projected[0].shape == (25, 16)
    np.testing.assert_array_equal(projected[0], projected[1])  # the same rows both times
    kept = np.delete(emb, 5, axis=0)[report.subsample(39, 25)]
    np.testing.assert_array_equal(projected[0], kept)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_projection_separates_clusters_and_falls_back_to_pca_for_a_few_points():
    emb, cls = _clusters(45)
    xy, method = report.project_2d(emb)
    assert method == "t-SNE" and xy.shape == (45, 2)
    centres = np.stack([xy[cls == c].mean(0) for c in range(3)])
    spread = max(np.linalg.norm(xy[cls == c] - centres[c], axis=1).mean() for c in range(3))
    gaps = [np.linalg.norm(centres[i] - centres[j]) for i in range(3) for j in range(i + 1, 3)]
    assert min(gaps) > 2 * spread  # the three clusters stay apart in 2-D
    for n in (1, 2, 4):
        xy, method = report.project_2d(emb[:n])
        assert method == "PCA" and xy.shape == (n, 2) and np.isfinite(xy).all()


def test_write_report_draws_the_embeddings_only_when_given(tmp_path):
    from geoloc.labels import LabelEncoder
    from geoloc.predict import Predictions

    encoder = LabelEncoder((3, 7, 40), tuple(NAMES))
    emb, cls = _clusters(12)
    probs = np.eye(3, dtype=np.float32)[cls]
    latlon = CENTROIDS[cls].astype(np.float32)
    ids = np.array([f"s{i:02d}" for i in range(12)], dtype=object)
    base = {"sample_id": ids, "label": cls.astype(np.int64), "latlon": latlon, "n_views": np.full(12, 4)}
    with_emb = Predictions(**base, values={"state_probs": probs, "gps": latlon, "embedding": emb})
    got = report.write_report(tmp_path / "a", with_emb, encoder, CENTROIDS)
    assert (tmp_path / "a" / "embeddings.png").is_file() and got["pictures"]["embeddings"] == "embeddings.png"
    assert got["embeddings"]["points"] == 12 and got["embeddings"]["method"] == "t-SNE"
    plain = Predictions(**base, values={"state_probs": probs, "gps": latlon})
    got = report.write_report(tmp_path / "b", plain, encoder, CENTROIDS)
    assert not (tmp_path / "b" / "embeddings.png").exists() and "embeddings" not in got
