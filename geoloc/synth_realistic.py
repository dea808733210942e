"""The ``realistic`` generated world: scenes that vary smoothly with position over the US.

A fixed set of low-frequency random fields (sums of random plane waves on the sphere's 3-D unit vectors,
wavelengths 700-3000 km) gives every point of the US a handful of scene values in [0, 1]: sky colour,
ground colour, horizon height, relief, trees, buildings, road width, lane-marking colour, haze. Neighbouring
states therefore look alike and a big state's interior varies; the state itself is no more than a weak cue
(a small roadside sign in the state's palette colour, in few views). Each place gets its own "weather"
(noise on the scene values and an exposure), each view looks ``VIEW_OFFSET_KM`` towards its compass
direction and has its own random layout (where the trees, buildings and mountains stand), plus pixel
noise. The fields are a property of the world (``WORLD_SEED``), not of the data set's seed.
"""

from __future__ import annotations

import numpy as np

from geoloc.geo import EARTH_RADIUS_KM

WORLD_SEED = 4242
FIELDS = (
    "sky_r", "sky_g", "sky_b", "ground_r", "ground_g", "ground_b",
    "horizon", "relief", "trees", "urban", "road", "lane", "haze",
)  # fmt: skip
WAVES_PER_FIELD = 6
WAVELENGTH_KM = (700.0, 3000.0)
VIEW_OFFSET_KM = 20.0  # north, east, south, west views look this far in their direction
WEATHER_SIGMA = 0.45  # per-place noise on each field, in the field's unit-variance (pre-sigmoid) scale
VIEW_SIGMA = 0.15  # extra per-view noise on top
CUE_PROB = 0.12  # chance that a view shows the state's sign
SKY_BASE, GROUND_BASE = (0.55, 0.7, 0.9), (0.45, 0.45, 0.3)  # plausible colours the fields pull on
COLOUR_MIX = 0.6


def unit_vectors(latlon: np.ndarray) -> np.ndarray:
    """``(N, 2)`` degrees -> ``(N, 3)`` points on the unit sphere (smooth everywhere, antimeridian too)."""
    lat, lon = np.deg2rad(latlon[:, 0]), np.deg2rad(latlon[:, 1])
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=1)


def world_waves(seed: int = WORLD_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Wave vectors ``(F, W, 3)`` in radians per unit-sphere length and phases ``(F, W)`` of the fields."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=(len(FIELDS), WAVES_PER_FIELD, 3))
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    wavelength = rng.uniform(*WAVELENGTH_KM, size=(len(FIELDS), WAVES_PER_FIELD, 1))
    k = 2 * np.pi * EARTH_RADIUS_KM / wavelength  # (F, W, 1): the unit sphere has radius 1, not R
    return direction * k, rng.uniform(0, 2 * np.pi, size=(len(FIELDS), WAVES_PER_FIELD))


def field_values(latlon: np.ndarray, waves=None) -> np.ndarray:
    """``(N, 2)`` degrees -> ``(N, F)`` raw field values, about unit variance over the globe, smooth in space."""
    k, phase = waves if waves is not None else world_waves()
    u = unit_vectors(np.asarray(latlon, np.float64))  # (N, 3)
    arg = np.einsum("nd,fwd->nfw", u, k) + phase  # (N, F, W)
    return np.sqrt(2.0 / WAVES_PER_FIELD) * np.cos(arg).sum(-1)


def offset_points(latlon: np.ndarray, km: float) -> np.ndarray:
    """``(N, 2)`` -> ``(N, 4, 2)``: each point moved ``km`` north, east, south, west (small-distance rule)."""
    dlat = km / (np.pi * EARTH_RADIUS_KM / 180)
    dlon = dlat / np.maximum(np.cos(np.deg2rad(latlon[:, 0])), 0.05)  # (N,)
    north = np.stack([np.full_like(dlon, dlat), np.zeros_like(dlon)], axis=1)  # (N, 2)
    east = np.stack([np.zeros_like(dlon), dlon], axis=1)  # (N, 2)
    steps = np.stack([north, east, -north, -east], axis=1)  # (N, 4, 2)
    return latlon[:, None, :] + steps


def view_scenes(latlon: np.ndarray, rng: np.random.Generator, waves=None) -> np.ndarray:
    """Scene values in [0, 1] of each place's four views: ``(N, 2) -> (N, 4, F)``, with weather noise."""
    looks = offset_points(np.asarray(latlon, np.float64), VIEW_OFFSET_KM)  # (N, 4, 2)
    raw = field_values(looks.reshape(-1, 2), waves).reshape(len(latlon), 4, len(FIELDS))
    weather = rng.normal(0, WEATHER_SIGMA, size=(len(latlon), 1, len(FIELDS)))
    raw = raw + weather + rng.normal(0, VIEW_SIGMA, size=raw.shape)
    return 1 / (1 + np.exp(-1.3 * raw))


def _value(scene: np.ndarray, name: str) -> float:
    return float(scene[FIELDS.index(name)])


def _colour(scene: np.ndarray, part: str, base: tuple[float, float, float]) -> np.ndarray:
    """(3,) RGB 0..255 of ``part`` (sky or ground): its base colour pulled towards the fields' colour."""
    field = np.array([_value(scene, f"{part}_{c}") for c in "rgb"], np.float32)
    return 255 * ((1 - COLOUR_MIX) * np.asarray(base, np.float32) + COLOUR_MIX * field)


def _paint(img: np.ndarray, mask: np.ndarray, rgb) -> None:
    """Set the pixels under ``mask`` (S, S) of ``img`` (3, S, S) to ``rgb`` (3,)."""
    for c in range(3):
        img[c][mask] = rgb[c]


def _sky_and_ground(scene, yy, xx, rng) -> tuple[np.ndarray, np.ndarray]:
    """The base picture (3, S, S) and the horizon line per column (1, S), mountains included."""
    sky = _colour(scene, "sky", SKY_BASE)
    ground = _colour(scene, "ground", GROUND_BASE)
    waves = rng.integers(1, 4)
    ridge = np.sin(2 * np.pi * (waves * xx + rng.uniform()))  # (1, S)
    horizon = 0.32 + 0.22 * _value(scene, "horizon") - 0.18 * _value(scene, "relief") * (0.5 + 0.5 * ridge)
    is_sky = yy < horizon  # (S, S)
    fade = np.clip((yy - horizon) / 0.5, 0, 1)  # (S, S): 0 at the horizon, 1 far below
    haze = 0.6 * _value(scene, "haze") * (1 - fade)  # ground near the horizon takes the sky's colour
    img = np.empty((3, *is_sky.shape), np.float32)
    for c in range(3):
        near_ground = ground[c] * (1 - haze) + sky[c] * haze
        img[c] = np.where(is_sky, sky[c] + 40 * (yy - horizon), near_ground * (0.8 + 0.2 * (1 - fade)))
    return img, horizon


def _road(img, scene, yy, xx, horizon_mid: float) -> None:
    """A road from the bottom to a vanishing point at the horizon, with a dashed centre line."""
    depth = np.clip((yy - horizon_mid) / (1 - horizon_mid), 0, 1)  # (S, 1): 0 at horizon, 1 at bottom
    half = (0.08 + 0.3 * _value(scene, "road")) * depth
    on_road = (np.abs(xx - 0.5) < half) & (yy > horizon_mid)
    grey = 70 + 60 * _value(scene, "urban")
    _paint(img, on_road, (grey, grey, grey))
    lane = _value(scene, "lane")  # 0: white, 1: yellow
    dashes = (np.abs(xx - 0.5) < 0.012 * depth + 0.002) & (np.sin(40 * np.log1p(8 * depth)) > 0) & on_road
    _paint(img, dashes, (235, 235 - 10 * lane, 235 - 200 * lane))


def _trees(img, scene, yy, xx, horizon, rng) -> None:
    """Round dark-green crowns standing on the horizon; how many comes from the ``trees`` field."""
    ground = _colour(scene, "ground", GROUND_BASE) / 255
    colour = 255 * (0.45 * ground * np.array([0.6, 1.0, 0.6]) + np.array([0.02, 0.12, 0.03]))
    for _ in range(round(14 * _value(scene, "trees") ** 1.5)):
        x, r = rng.uniform(0, 1), rng.uniform(0.03, 0.08)
        y = horizon[0, min(int(x * horizon.shape[1]), horizon.shape[1] - 1)] - 0.5 * r
        _paint(img, (yy - y) ** 2 + (xx - x) ** 2 < r * r, colour * rng.uniform(0.85, 1.15))


def _buildings(img, scene, yy, xx, horizon_mid: float, rng) -> None:
    """Boxes on the horizon, taller and more numerous where ``urban`` is high."""
    urban = _value(scene, "urban")
    for _ in range(round(9 * urban**2)):
        x0, w = rng.uniform(0, 0.9), rng.uniform(0.04, 0.12)
        h = rng.uniform(0.05, 0.1 + 0.3 * urban)
        box = (xx > x0) & (xx < x0 + w) & (yy > horizon_mid - h) & (yy < horizon_mid + 0.02)
        _paint(img, box, rng.uniform(90, 200) * np.array([1.0, 0.97, 0.93]))


def _sign(img, yy, xx, colour: np.ndarray, rng) -> None:
    """The weak state cue: a small sign in the state's palette colour on a post, right of the road."""
    x, y = rng.uniform(0.72, 0.92), rng.uniform(0.45, 0.6)
    _paint(img, (np.abs(xx - x) < 0.006) & (yy > y) & (yy < y + 0.15), (60, 60, 60))
    _paint(img, (np.abs(xx - x) < 0.035) & (np.abs(yy - y) < 0.025), colour + rng.uniform(-25, 25, 3))


def render_scene(
    scene: np.ndarray, cue: np.ndarray | None, size: int, rng: np.random.Generator
) -> np.ndarray:
    """``(F,)`` scene values in [0, 1] (+ the sign colour or None) -> ``(size, size, 3)`` uint8 view."""
    yy = np.linspace(0, 1, size, dtype=np.float32)[:, None]  # (S, 1)
    xx = np.linspace(0, 1, size, dtype=np.float32)[None, :]  # (1, S)
    img, horizon = _sky_and_ground(scene, yy, xx, rng)  # (3, S, S), (1, S)
    horizon_mid = float(np.median(horizon))
    _road(img, scene, yy, xx, horizon_mid)
    _buildings(img, scene, yy, xx, horizon_mid, rng)
    _trees(img, scene, yy, xx, horizon, rng)
    if cue is not None:
        _sign(img, yy, xx, np.asarray(cue, np.float32), rng)
    img *= rng.uniform(0.8, 1.2)  # exposure
    noise = np.frombuffer(rng.bytes(img.size), dtype=np.uint8).reshape(img.shape)  # (3, S, S)
    img += noise % 31 - np.float32(15)
    return np.clip(img, 0, 255).astype(np.uint8).transpose(1, 2, 0)  # (S, S, 3)


def render_place(
    latlon: np.ndarray, cue_colour: np.ndarray, size: int, rng: np.random.Generator, waves=None
) -> list[np.ndarray]:
    """The four views (north, east, south, west) of one place: ``(2,)`` degrees -> 4 x ``(S, S, 3)`` uint8."""
    scenes = view_scenes(np.asarray(latlon, np.float64)[None], rng, waves)[0]  # (4, F)
    shows = rng.uniform(size=4) < CUE_PROB
    return [render_scene(scenes[v], cue_colour if shows[v] else None, size, rng) for v in range(4)]
