"""US state outlines: the Census cartographic boundary file (1:500k, 2016) that ships inside ``plotly-geo``.

The file ``cb_2016_us_state_500k.shp`` (with its ``.dbf``/``.shx``) lies in the ``_plotly_geo`` package's
``package_data`` folder; it is read with ``pyshp`` and turned into ``shapely`` geometries, once per process
(``lru_cache``). Only the 50 states are kept, keyed by name and indexed 0..49 in alphabetical order
(``STATE_NAMES``, the competition's indices, the same order as ``geoloc.synth.STATES``): the District of
Columbia, Puerto Rico and the island areas are not states of the competition, so a point there is in no
state (``locate`` gives -1).

Coordinates are degrees; functions take and return (lat, lon) like the rest of geoloc, while shapely and
the plotting rings are (lon, lat) = (x, y). Alaska's Aleutian islands cross the antimeridian: the file
holds them at longitudes up to +179.8, so ``locate`` finds Alaska there too, while ``sample_points`` by
default draws only from the western hemisphere part (longitude <= 0, what the GPS head can output;
a loss of well under 1% of Alaska's area).
"""

from __future__ import annotations

import importlib.resources
from functools import lru_cache
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon, box, shape

SHAPEFILE = "cb_2016_us_state_500k.shp"
# fmt: off
STATE_NAMES = (
    "Alabama", "Alaska", "Arizona", "Arkansas", "California", "Colorado", "Connecticut", "Delaware",
    "Florida", "Georgia", "Hawaii", "Idaho", "Illinois", "Indiana", "Iowa", "Kansas", "Kentucky",
    "Louisiana", "Maine", "Maryland", "Massachusetts", "Michigan", "Minnesota", "Mississippi", "Missouri",
    "Montana", "Nebraska", "Nevada", "New Hampshire", "New Jersey", "New Mexico", "New York",
    "North Carolina", "North Dakota", "Ohio", "Oklahoma", "Oregon", "Pennsylvania", "Rhode Island",
    "South Carolina", "South Dakota", "Tennessee", "Texas", "Utah", "Vermont", "Virginia", "Washington",
    "West Virginia", "Wisconsin", "Wyoming",
)
# fmt: on
WESTERN_HEMISPHERE = box(-180.0, -90.0, 0.0, 90.0)


def shapefile_path() -> Path:
    """Path of the state boundary ``.shp`` inside the installed ``plotly-geo`` package."""
    try:
        folder = importlib.resources.files("_plotly_geo") / "package_data"
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "the US state outlines need the plotly-geo package: pip install plotly-geo"
        ) from err
    path = Path(str(folder / SHAPEFILE))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: state boundary file missing from the plotly-geo package")
    return path


@lru_cache(maxsize=1)
def load_states() -> dict[str, MultiPolygon]:
    """The 50 states as shapely MultiPolygons (lon, lat), keyed by name in alphabetical order."""
    import shapefile  # pyshp

    path = shapefile_path()
    with shapefile.Reader(str(path)) as reader:
        found = {rec.record["NAME"]: rec.shape.__geo_interface__ for rec in reader.shapeRecords()}
    missing = sorted(set(STATE_NAMES) - set(found))
    if missing:
        raise ValueError(f"{path}: no outline for state(s) {missing}")
    states = {}
    for name in STATE_NAMES:
        geom = shape(found[name])
        states[name] = geom if isinstance(geom, MultiPolygon) else MultiPolygon([geom])
    return states


def state_geometry(name: str) -> MultiPolygon:
    """One state's outline; a clear error for a name that is not one of the 50 states."""
    states = load_states()
    if name not in states:
        raise KeyError(f"unknown state {name!r}: choose one of the 50 names in geoloc.geography.STATE_NAMES")
    return states[name]


@lru_cache(maxsize=1)
def _polygon_index() -> tuple[shapely.STRtree, np.ndarray]:
    """An STRtree over every single polygon of every state, and the state index of each polygon."""
    parts, owner = [], []
    for idx, geom in enumerate(load_states().values()):
        parts.extend(geom.geoms)
        owner.extend([idx] * len(geom.geoms))
    return shapely.STRtree(parts), np.asarray(owner, dtype=np.int64)


def locate(lat, lon) -> np.ndarray:
    """State index (0..49) of each point, -1 when in no state: ``(N,), (N,) -> (N,)`` int64.

    A point exactly on a shared border gets the lower index of the states that touch it.
    """
    lat, lon = np.atleast_1d(np.asarray(lat, np.float64)), np.atleast_1d(np.asarray(lon, np.float64))
    tree, owner = _polygon_index()
    hits = tree.query(shapely.points(lon, lat), predicate="intersects")  # (2, M): point row, polygon
    out = np.full(lat.shape, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(out, hits[0], owner[hits[1]])
    return np.where(out == np.iinfo(np.int64).max, -1, out)


def contains(name: str, lat, lon) -> np.ndarray:
    """Whether each point lies in (or on the outline of) the named state: ``(N,), (N,) -> (N,)`` bool."""
    geom = state_geometry(name)
    shapely.prepare(geom)  # idempotent; builds the spatial index of the outline once
    return shapely.intersects_xy(geom, np.asarray(lon, np.float64), np.asarray(lat, np.float64))


@lru_cache(maxsize=128)
def _sampling_parts(name: str, western: bool) -> tuple[list[Polygon], np.ndarray]:
    """The state's polygons (prepared) and their approximate share of its area on the sphere."""
    geom = state_geometry(name)
    if western:
        geom = geom.intersection(WESTERN_HEMISPHERE)
    parts = [p for p in getattr(geom, "geoms", [geom]) if isinstance(p, Polygon) and p.area > 0]
    for p in parts:
        shapely.prepare(p)
    # planar degree area x cos(latitude) ~ area on the sphere for polygons this small
    area = np.array([p.area * np.cos(np.deg2rad(p.centroid.y)) for p in parts])
    return parts, area / area.sum()


def _sample_in_polygon(poly: Polygon, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 2) lat/lon uniform on the sphere's surface inside ``poly``, by rejection from its bounding box."""
    lon0, lat0, lon1, lat1 = poly.bounds
    z0, z1 = np.sin(np.deg2rad(lat0)), np.sin(np.deg2rad(lat1))  # uniform in sin(lat): equal area
    out = np.empty((0, 2))
    while len(out) < n:
        m = max(64, 2 * (n - len(out)))
        lat = np.rad2deg(np.arcsin(rng.uniform(z0, z1, m)))
        lon = rng.uniform(lon0, lon1, m)
        keep = shapely.contains_xy(poly, lon, lat)
        out = np.concatenate([out, np.stack([lat[keep], lon[keep]], axis=1)])
    return out[:n]


def sample_points(name: str, n: int, rng: np.random.Generator, western: bool = True) -> np.ndarray:
    """``(n, 2)`` lat/lon drawn uniformly (by area) inside the named state's outline.

    A polygon (mainland, island) is picked in proportion to its area, then the point is drawn uniformly
    on the sphere inside it. ``western`` keeps only longitudes <= 0 (drops Alaska's far Aleutians).
    Deterministic for the generator's state.
    """
    parts, share = _sampling_parts(name, western)
    counts = np.bincount(rng.choice(len(parts), size=n, p=share), minlength=len(parts))
    points = [_sample_in_polygon(parts[i], int(k), rng) for i, k in enumerate(counts) if k]
    out = np.concatenate(points) if points else np.empty((0, 2))
    return out[rng.permutation(n)] if n else out


def outline_rings(name: str, tolerance: float = 0.0) -> list[np.ndarray]:
    """The state's outer rings for plotting, each ``(M, 2)`` lon/lat; simplified to ``tolerance`` degrees."""
    geom = state_geometry(name)
    if tolerance > 0:
        geom = geom.simplify(tolerance, preserve_topology=True)
    return [np.asarray(p.exterior.coords) for p in getattr(geom, "geoms", [geom]) if not p.is_empty]


@lru_cache(maxsize=8)
def all_outline_rings(tolerance: float = 0.05) -> dict[str, list[np.ndarray]]:
    """``outline_rings`` of every state at one tolerance, cached (the report map draws these)."""
    return {name: outline_rings(name, tolerance) for name in STATE_NAMES}
