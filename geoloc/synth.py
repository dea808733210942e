"""A generated data set in exactly the competition contract, for tests and the demo.

    python -m geoloc.synth OUT_DIR [--n-train 200] [--n-test 50] [--seed 0] [--num-states 12] [--mode easy]

Every location is drawn inside one of ``num_states`` real US states (picked by the seed from the 50,
indexed 0..49 in alphabetical order, so the indices that occur have gaps), with more samples for some
states than others. Each of the 4 views is a coarse street-like scene (sky, ground, one big block) whose
colours come from the state's palette, rolled per view, while latitude/longitude move the horizon, the
block and a colour gradient: a tiny model at 56 px learns the state and roughly the point in minutes.
The test labels go to ``test_answers.csv``, never into the data root's contract files.

``mode="realistic"`` (``--mode realistic``) is the honest benchmark: points are drawn uniformly (by
area) inside the real state outlines (``geoloc.geography``; 36 states by default, still a seeded,
imbalanced subset with gaps in the indices), and the views come from ``geoloc.synth_realistic``: scenes
(sky and ground colours, horizon, relief, trees, buildings, road, lane colour, haze) that are smooth
functions of the position over the whole US, so neighbouring states look alike and a state's interior
varies, with per-place weather, per-view layout and pixel noise; the state shows only as a small sign in
a few views. A tiny model cannot read the state off it: state accuracy is well below 1 and distance
errors are hundreds of km, so ablations mean something. The default ``easy`` mode is unchanged.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from geoloc import contract

ANSWERS_CSV = "test_answers.csv"
MODES = ("easy", "realistic")
DEFAULT_NUM_STATES = {"easy": 12, "realistic": 36}

# (name, centre latitude, centre longitude, radius in degrees): a disc that lies inside the state
# fmt: off
STATES = (
    ("Alabama", 32.8, -86.8, 1.2), ("Alaska", 64.0, -150.0, 3.0), ("Arizona", 34.3, -111.7, 1.8),
    ("Arkansas", 34.9, -92.4, 1.2), ("California", 37.2, -119.8, 1.5), ("Colorado", 39.0, -105.5, 1.6),
    ("Connecticut", 41.6, -72.7, 0.3), ("Delaware", 39.0, -75.5, 0.2), ("Florida", 28.6, -81.8, 1.0),
    ("Georgia", 32.7, -83.4, 1.2), ("Hawaii", 19.6, -155.5, 0.4), ("Idaho", 43.8, -114.5, 1.0),
    ("Illinois", 40.0, -89.2, 0.9), ("Indiana", 39.9, -86.3, 0.7), ("Iowa", 42.1, -93.5, 1.1),
    ("Kansas", 38.5, -98.4, 1.3), ("Kentucky", 37.5, -85.3, 0.7), ("Louisiana", 31.1, -92.3, 0.8),
    ("Maine", 45.4, -69.2, 0.9), ("Maryland", 39.1, -76.9, 0.3), ("Massachusetts", 42.3, -71.9, 0.3),
    ("Michigan", 43.3, -84.5, 0.9), ("Minnesota", 46.3, -94.3, 1.4), ("Mississippi", 32.7, -89.7, 1.0),
    ("Missouri", 38.4, -92.5, 1.2), ("Montana", 47.0, -109.6, 1.8), ("Nebraska", 41.5, -99.8, 1.2),
    ("Nevada", 39.3, -116.6, 1.6), ("New Hampshire", 43.6, -71.6, 0.4), ("New Jersey", 40.2, -74.6, 0.3),
    ("New Mexico", 34.4, -106.1, 1.7), ("New York", 42.9, -75.5, 0.9), ("North Carolina", 35.6, -79.4, 0.8),
    ("North Dakota", 47.5, -100.5, 1.3), ("Ohio", 40.3, -82.8, 0.9), ("Oklahoma", 35.6, -97.5, 1.0),
    ("Oregon", 43.9, -120.6, 1.6), ("Pennsylvania", 40.9, -77.8, 0.9), ("Rhode Island", 41.7, -71.5, 0.1),
    ("South Carolina", 33.9, -80.9, 0.8), ("South Dakota", 44.4, -100.2, 1.3), ("Tennessee", 35.9, -86.4, 0.6),
    ("Texas", 31.5, -99.3, 2.5), ("Utah", 39.3, -111.7, 1.4), ("Vermont", 44.0, -72.7, 0.3),
    ("Virginia", 37.5, -78.8, 0.8), ("Washington", 47.4, -120.5, 1.3), ("West Virginia", 38.6, -80.6, 0.6),
    ("Wisconsin", 44.6, -89.9, 1.1), ("Wyoming", 43.0, -107.5, 1.7),
)
# fmt: on
US_LAT = (19.0, 66.0)  # bounds of the table above, to map any point to [0, 1] for the national tint
US_LON = (-159.0, -67.0)
PALETTE_SEED = 20240  # palettes are a property of the state, not of the data set's seed
CORRUPTIONS = ("truncated", "garbage", "missing", "grayscale", "cmyk", "png")


def state_palettes() -> np.ndarray:
    """(50, 3, 3) uint8: three RGB colours per state; random triples are far apart in 9-D colour space."""
    return np.random.default_rng(PALETTE_SEED).integers(20, 236, size=(len(STATES), 3, 3)).astype(np.uint8)


def sample_id_for(i: int) -> str:
    """Zero-padded string ids, so a reader that turns ids into ints ("000123" -> 123) breaks loudly."""
    return f"{i:06d}"


def image_name(sample_id: str, view: str) -> str:
    return f"img_{sample_id}_{view}.jpg"


def pick_states(rng: np.random.Generator, num_states: int) -> tuple[np.ndarray, np.ndarray]:
    """The state indices that occur (sorted) and their sampling weights (Zipf-like: imbalanced)."""
    chosen = np.sort(rng.choice(len(STATES), size=min(num_states, len(STATES)), replace=False))
    weights = 1.0 / np.arange(1, len(chosen) + 1) ** 0.8
    weights = rng.permutation(weights)  # which state is frequent is up to the seed, not its index
    return chosen, weights / weights.sum()


def draw_states(rng: np.random.Generator, chosen: np.ndarray, weights: np.ndarray, n: int) -> np.ndarray:
    """n state indices; when n allows it every chosen state occurs at least once."""
    first = rng.permutation(chosen)[: min(n, len(chosen))]
    rest = rng.choice(chosen, size=n - len(first), p=weights)
    return rng.permutation(np.concatenate([first, rest]).astype(np.int64))


def draw_points(rng: np.random.Generator, states: np.ndarray) -> np.ndarray:
    """(N, 2) lat/lon, uniform in each state's disc."""
    table = np.array([s[1:] for s in STATES])[states]  # (N, 3): lat, lon, radius
    r = table[:, 2] * np.sqrt(rng.uniform(size=len(states)))
    angle = rng.uniform(0, 2 * np.pi, size=len(states))
    return np.stack([table[:, 0] + r * np.sin(angle), table[:, 1] + r * np.cos(angle)], axis=1)


def draw_points_in_outlines(rng: np.random.Generator, states: np.ndarray) -> np.ndarray:
    """(N, 2) lat/lon, uniform by area inside each row's real state outline (``geoloc.geography``)."""
    from geoloc.geography import sample_points

    points = np.empty((len(states), 2))
    for s in np.unique(states):  # sorted: the draw order, hence the points, depend only on the rng
        rows = np.flatnonzero(states == s)
        points[rows] = sample_points(STATES[s][0], len(rows), rng)
    return points


def render_view(
    palette: np.ndarray,
    local: tuple[float, float],
    national: tuple[float, float],
    view: int,
    size: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """(size, size, 3) uint8 scene.

    ``local`` is the point's offset from its state's centre in radii (each in [-1, 1]) and moves the
    horizon and the block; ``national`` is the point in [0, 1]^2 over the US and tints the whole image.
    """
    colours = np.roll(palette.astype(np.float32), view, axis=0)  # (3, 3): sky, ground, block
    yy = np.linspace(0, 1, size, dtype=np.float32)[:, None]  # (S, 1)
    xx = np.linspace(0, 1, size, dtype=np.float32)[None, :]  # (1, S)
    horizon = 0.45 - 0.2 * local[0]
    block_x = 0.5 + 0.3 * local[1] * (1 if view % 2 == 0 else -1)  # east/west views see it mirrored
    sky = np.broadcast_to(yy < horizon, (size, size))
    block = (np.abs(xx - block_x) < 0.17) & (yy > horizon - 0.25) & (yy < horizon + 0.3)  # (S, S)
    gradient = np.float32(25 * local[1]) * (xx - 0.5) + np.float32(25 * local[0]) * (yy - 0.5)  # (S, S)
    tint = (60 * national[0] - 30, 0.0, 60 * national[1] - 30)
    # channel planes are contiguous (C, S, S): much faster to fill than (S, S, 3) in numpy
    img = np.empty((3, size, size), dtype=np.float32)
    for c in range(3):
        img[c] = np.where(block, colours[2, c], np.where(sky, colours[0, c], colours[1, c])) + tint[c]
    img += gradient
    noise = np.frombuffer(rng.bytes(img.size), dtype=np.uint8).reshape(img.shape)  # (3, S, S)
    img += noise % 25 - np.float32(12)  # pixel noise in -12..12: no two images are equal
    return np.clip(img, 0, 255).astype(np.uint8).transpose(1, 2, 0)  # (S, S, 3)


def jpeg_bytes(pixels: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_views(
    folder: Path,
    sample_id: str,
    state: int,
    latlon: np.ndarray,
    palettes: np.ndarray,
    size: int,
    rng: np.random.Generator,
) -> None:
    _, clat, clon, radius = STATES[state]
    local = ((latlon[0] - clat) / radius, (latlon[1] - clon) / radius)
    national = (
        (latlon[0] - US_LAT[0]) / (US_LAT[1] - US_LAT[0]),
        (latlon[1] - US_LON[0]) / (US_LON[1] - US_LON[0]),
    )
    for v, view in enumerate(contract.VIEWS):
        pixels = render_view(palettes[state], local, national, v, size, rng)
        (folder / image_name(sample_id, view)).write_bytes(jpeg_bytes(pixels))


def write_realistic_views(
    folder: Path, sample_id: str, state: int, latlon: np.ndarray, cue: np.ndarray, size: int, rng, waves
) -> None:
    """The four views of a ``realistic`` place; ``cue`` (3,) is the colour of the state's rare sign."""
    from geoloc.synth_realistic import render_place

    for view, pixels in zip(contract.VIEWS, render_place(latlon, cue, size, rng, waves)):
        (folder / image_name(sample_id, view)).write_bytes(jpeg_bytes(pixels))


def label_table(ids: list[str], states: np.ndarray, points: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "sample_id": ids,
            "state": [STATES[s][0] for s in states],
            "state_idx": states,
            "latitude": points[:, 0].round(6),
            "longitude": points[:, 1].round(6),
        }
    )


def image_columns(ids: list[str]) -> dict[str, list[str]]:
    return {col: [image_name(i, v) for i in ids] for col, v in zip(contract.IMAGE_COLUMNS, contract.VIEWS)}


def placeholder_submission(ids: list[str], chosen: np.ndarray) -> pd.DataFrame:
    """The template's prediction columns hold valid-looking placeholders (first occurring states, US centre)."""
    top = [int(chosen[k % len(chosen)]) for k in range(contract.TOP_K)]
    df = pd.DataFrame({"sample_id": ids, **image_columns(ids)})
    for col, s in zip(contract.PRED_STATE_COLUMNS, top):
        df[col] = s
    df["predicted_latitude"] = 39.8
    df["predicted_longitude"] = -98.6
    return df[list(contract.SUBMISSION_COLUMNS)]


def generate_dataset(
    root: str | Path,
    n_train: int = 200,
    n_test: int = 50,
    seed: int = 0,
    num_states: int | None = None,
    image_size: int = 256,
    mode: str = "easy",
) -> Path:
    """Write a data root (images, the three contract CSVs, ``test_answers.csv``); returns its path.

    ``mode``: ``easy`` (per-state palettes in discs; the demo's) or ``realistic`` (real outlines,
    smooth scenes; see the module docstring). ``num_states`` defaults to 12 (easy) or 36 (realistic).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {list(MODES)}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    chosen, weights = pick_states(rng, num_states or DEFAULT_NUM_STATES[mode])
    states = draw_states(rng, chosen, weights, n_train + n_test)
    points = draw_points(rng, states) if mode == "easy" else draw_points_in_outlines(rng, states)
    ids = [sample_id_for(i) for i in range(n_train + n_test)]
    palettes = state_palettes()
    write = _view_writer(mode, palettes, image_size)
    for folder, part in (
        (contract.TRAIN_IMAGES, slice(0, n_train)),
        (contract.TEST_IMAGES, slice(n_train, None)),
    ):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n_train + n_test)[part]:
            pixel_rng = np.random.default_rng([seed, i])  # per sample, so views don't depend on loop order
            write(root / folder, ids[i], int(states[i]), points[i], pixel_rng)
    train = label_table(ids[:n_train], states[:n_train], points[:n_train])
    train = train.assign(**image_columns(ids[:n_train]))[list(contract.TRAIN_COLUMNS)]
    train.to_csv(root / contract.TRAIN_CSV, index=False)
    label_table(ids[n_train:], states[n_train:], points[n_train:]).to_csv(root / ANSWERS_CSV, index=False)
    placeholder_submission(ids[n_train:], chosen).to_csv(root / contract.SAMPLE_SUBMISSION, index=False)
    mapping = pd.DataFrame({"state_idx": range(len(STATES)), "state": [s[0] for s in STATES]})
    mapping.to_csv(root / contract.STATE_MAPPING, index=False)
    return root


def _view_writer(mode: str, palettes: np.ndarray, size: int):
    """``write(folder, sample_id, state, latlon, rng)`` for the mode."""
    if mode == "easy":
        return lambda folder, sid, state, latlon, rng: write_views(
            folder, sid, state, latlon, palettes, size, rng
        )
    from geoloc.synth_realistic import world_waves

    waves = world_waves()
    return lambda folder, sid, state, latlon, rng: write_realistic_views(
        folder, sid, state, latlon, palettes[state, 0].astype(np.float32), size, rng, waves
    )


def view_path(root: str | Path, sample_id: str, view: str) -> Path:
    """Where a generated sample's view lives (train or test folder)."""
    root = Path(root)
    for folder in (contract.TRAIN_IMAGES, contract.TEST_IMAGES):
        path = root / folder / image_name(sample_id, view)
        if path.exists():
            return path
    raise FileNotFoundError(f"no {view} view for sample {sample_id!r} under {root}")


def corrupt_view(root: str | Path, sample_id: str, view: str, kind: str) -> Path:
    """Damage (or re-format) one view in place, for tests; ``kind`` is one of ``CORRUPTIONS``.

    truncated: the JPEG cut in half; garbage: random bytes; missing: file deleted; grayscale / cmyk: a
    valid JPEG in that mode; png: PNG bytes under the ``.jpg`` name. The last three must be accepted.
    """
    path = view_path(root, sample_id, view)
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, size=4096, dtype=np.uint8).tobytes())
    elif kind == "missing":
        path.unlink()
    elif kind in ("grayscale", "cmyk", "png"):
        img = Image.open(io.BytesIO(data))
        mode, fmt = {"grayscale": ("L", "JPEG"), "cmyk": ("CMYK", "JPEG"), "png": ("RGB", "PNG")}[kind]
        buf = io.BytesIO()
        img.convert(mode).save(buf, format=fmt)
        path.write_bytes(buf.getvalue())
    else:
        raise ValueError(f"unknown corruption {kind!r}; choose one of {list(CORRUPTIONS)}")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a generated data root in the competition layout.")
    parser.add_argument("out", type=Path, help="data root to create (train_images/, test_images/, CSVs)")
    parser.add_argument("--n-train", type=int, default=200, help="labelled samples (train_ground_truth.csv)")
    parser.add_argument("--n-test", type=int, default=50, help="test samples (sample_submission.csv)")
    parser.add_argument("--seed", type=int, default=0, help="seed for states, points and pixels")
    parser.add_argument(
        "--num-states", type=int, default=None, help="how many of the 50 states occur (12 easy, 36 realistic)"
    )
    parser.add_argument("--image-size", type=int, default=256, help="side of each square JPEG view")
    parser.add_argument("--mode", choices=MODES, default="easy", help="easy (the demo's) or realistic")
    args = parser.parse_args(argv)
    root = generate_dataset(
        args.out, args.n_train, args.n_test, args.seed, args.num_states, args.image_size, args.mode
    )
    print(f"wrote {args.n_train} train + {args.n_test} test {args.mode} samples to {root}")


if __name__ == "__main__":
    main()
