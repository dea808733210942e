"""The generated data set: the contract's files and columns, states and points, determinism, learnability."""

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from geoloc import contract
from geoloc.geography import contains, sample_points
from geoloc.synth import (
    ANSWERS_CSV,
    CORRUPTIONS,
    STATES,
    corrupt_view,
    generate_dataset,
    main,
    render_view,
    state_palettes,
    view_path,
)
from geoloc.synth_realistic import field_values, render_place, world_waves


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("synth"), n_train=200, n_test=50, seed=3, num_states=12)


def test_layout_and_columns_follow_the_contract(root):
    assert tuple(pd.read_csv(root / contract.TRAIN_CSV).columns) == contract.TRAIN_COLUMNS
    assert tuple(pd.read_csv(root / contract.SAMPLE_SUBMISSION).columns) == contract.SUBMISSION_COLUMNS
    assert list(pd.read_csv(root / contract.STATE_MAPPING).columns) == ["state_idx", "state"]
    assert list(pd.read_csv(root / ANSWERS_CSV).columns) == [
        "sample_id",
        "state",
        "state_idx",
        "latitude",
        "longitude",
    ]
    train = contract.read_train_table(root)
    test = contract.read_submission_template(root / contract.SAMPLE_SUBMISSION)
    assert len(train) == 200 and len(test) == 50
    for folder, table in ((contract.TRAIN_IMAGES, train), (contract.TEST_IMAGES, test)):
        names = {n for col in contract.IMAGE_COLUMNS for n in table[col]}
        assert names == {p.name for p in (root / folder).iterdir()}  # 4 per sample, nothing else
        for col, view in zip(contract.IMAGE_COLUMNS, contract.VIEWS):
            assert all(name == f"img_{sid}_{view}.jpg" for sid, name in zip(table["sample_id"], table[col]))


def test_images_are_256px_rgb_jpegs(root):
    for path in sorted((root / contract.TRAIN_IMAGES).iterdir())[:12]:
        img = Image.open(path)
        img.load()
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (256, 256))


def test_ids_are_strings_unique_across_train_and_test(root):
    train = contract.read_train_table(root)
    test = contract.read_submission_template(root / contract.SAMPLE_SUBMISSION)
    answers = pd.read_csv(root / ANSWERS_CSV, dtype={"sample_id": str})
    assert train["sample_id"].iloc[0].startswith("0")  # "000000": a reader that casts ids to int breaks
    assert not set(train["sample_id"]) & set(test["sample_id"])
    assert list(answers["sample_id"]) == list(test["sample_id"])
    assert train["sample_id"].is_unique and test["sample_id"].is_unique


def test_states_are_real_non_consecutive_and_imbalanced(root):
    mapping = contract.read_state_mapping(root)
    assert sorted(mapping) == list(range(50)) and mapping[4] == "California"
    train = contract.read_train_table(root)
    occurring = sorted(train["state_idx"].unique())
    assert len(occurring) == 12
    assert occurring != list(range(occurring[0], occurring[0] + 12))  # gaps in the original indices
    assert all(mapping[i] == name for i, name in zip(train["state_idx"], train["state"]))
    counts = train["state_idx"].value_counts()
    assert counts.max() >= 3 * counts.min()
    answers = pd.read_csv(root / ANSWERS_CSV)
    assert set(answers["state_idx"]) <= set(occurring)


def test_points_lie_in_their_state_disc(root):
    for df in (contract.read_train_table(root), pd.read_csv(root / ANSWERS_CSV)):
        table = np.array([STATES[i][1:] for i in df["state_idx"]])  # (N, 3): lat, lon, radius
        offset = np.hypot(df["latitude"] - table[:, 0], df["longitude"] - table[:, 1])
        assert (offset <= table[:, 2] + 1e-5).all()
        assert offset.std() > 0


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    a = generate_dataset(tmp_path / "a", n_train=10, n_test=4, seed=1)
    b = generate_dataset(tmp_path / "b", n_train=10, n_test=4, seed=1)
    c = generate_dataset(tmp_path / "c", n_train=10, n_test=4, seed=2)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / contract.TRAIN_CSV).read_bytes() != (c / contract.TRAIN_CSV).read_bytes()


def _features(root, folder, ids):
    """(N, 4*4*4*3) view pixels at 4x4: a model sees at least this much."""
    views = [
        [np.asarray(Image.open(root / folder / f"img_{i}_{v}.jpg").resize((4, 4))) for v in contract.VIEWS]
        for i in ids
    ]
    return np.asarray(views, dtype=np.float32).reshape(len(ids), -1)


def test_views_reveal_the_state_and_the_point(root):
    train = contract.read_train_table(root)
    answers = pd.read_csv(root / ANSWERS_CSV, dtype={"sample_id": str})
    x_train = _features(root, contract.TRAIN_IMAGES, train["sample_id"])
    x_test = _features(root, contract.TEST_IMAGES, answers["sample_id"])
    dist = ((x_test[:, None] - x_train[None]) ** 2).sum(-1)  # (N_test, N_train)
    nearest = dist.argmin(1)
    # 1-NN at 4x4 px already gets the state: the signal is strong and coarse
    assert (train["state_idx"].to_numpy()[nearest] == answers["state_idx"].to_numpy()).mean() >= 0.95
    # and the point: the nearest neighbour is closer than the state's centre (pixels depend on lat/lon)
    true = answers[["latitude", "longitude"]].to_numpy()
    knn_err = np.hypot(*(train[["latitude", "longitude"]].to_numpy()[nearest] - true).T)
    centre = np.array([STATES[i][1:3] for i in answers["state_idx"]])
    assert np.median(knn_err) < 0.7 * np.median(np.hypot(*(centre - true).T))


def test_render_moves_the_horizon_with_latitude():
    palette = state_palettes()[7]
    rows = []
    for lat in (-0.8, 0.0, 0.8):
        img = render_view(palette, (lat, 0.0), (0.5, 0.5), 0, 64, np.random.default_rng(0)).astype(float)
        column = img[:, 2]  # (S, 3): left edge, away from the block
        sky_like = np.abs(column - palette[0]).sum(1) < np.abs(column - palette[1]).sum(1)
        rows.append(sky_like.sum())
    assert rows[0] > rows[1] > rows[2]  # further north in the state -> horizon higher up -> less sky


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupt_view(tmp_path, kind):
    root = generate_dataset(tmp_path, n_train=2, n_test=1, seed=0)
    path = view_path(root, "000001", "east")
    if kind == "missing":
        corrupt_view(root, "000001", "east", kind)
        assert not path.exists()
        return
    corrupt_view(root, "000001", "east", kind)
    if kind in ("truncated", "garbage"):
        with pytest.raises(OSError):
            Image.open(io.BytesIO(path.read_bytes())).load()
    else:
        img = Image.open(path)
        img.load()
        assert (img.mode, img.format) == {
            "grayscale": ("L", "JPEG"),
            "cmyk": ("CMYK", "JPEG"),
            "png": ("RGB", "PNG"),
        }[kind]
    assert path.name.endswith(".jpg")


def test_corrupt_view_rejects_unknown_kind(tmp_path):
    root = generate_dataset(tmp_path, n_train=1, n_test=0, seed=0)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt_view(root, "000000", "north", "melted")


def test_cli_writes_a_data_root(tmp_path, capsys):
    main([str(tmp_path / "d"), "--n-train", "5", "--n-test", "2", "--num-states", "3", "--image-size", "64"])
    assert len(contract.read_train_table(tmp_path / "d")) == 5
    assert Image.open(tmp_path / "d" / contract.TEST_IMAGES / "img_000005_west.jpg").size == (64, 64)
    assert "5 train + 2 test" in capsys.readouterr().out


# --- realistic mode -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_root(tmp_path_factory):
    out = tmp_path_factory.mktemp("real")
    return generate_dataset(out, n_train=150, n_test=40, seed=5, image_size=64, mode="realistic")


def _tables(root):
    return contract.read_train_table(root), pd.read_csv(root / ANSWERS_CSV, dtype={"sample_id": str})


def test_realistic_points_lie_inside_their_state_outline(real_root):
    for df in _tables(real_root):
        for s, rows in df.groupby("state_idx"):
            assert contains(STATES[s][0], rows["latitude"], rows["longitude"]).all(), STATES[s][0]
        assert (df["longitude"] <= 0).all()


def test_realistic_has_many_states_with_gaps_and_imbalance(real_root):
    train, answers = _tables(real_root)
    occurring = sorted(set(train["state_idx"]) | set(answers["state_idx"]))
    assert len(occurring) >= 33
    assert len(occurring) < 50 and occurring != list(range(occurring[0], occurring[0] + len(occurring)))
    counts = pd.concat([train, answers])["state_idx"].value_counts()
    assert counts.max() >= 5 * counts.min()
    mapping = contract.read_state_mapping(real_root)
    assert all(mapping[i] == name for i, name in zip(train["state_idx"], train["state"]))


def test_realistic_is_deterministic_for_a_seed(tmp_path):
    kw = {"n_train": 6, "n_test": 2, "image_size": 48, "mode": "realistic"}
    a, b = generate_dataset(tmp_path / "a", seed=1, **kw), generate_dataset(tmp_path / "b", seed=1, **kw)
    c = generate_dataset(tmp_path / "c", seed=2, **kw)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / contract.TRAIN_CSV).read_bytes() != (c / contract.TRAIN_CSV).read_bytes()


def test_realistic_data_root_is_accepted_by_the_sharder(real_root, tmp_path):
    from geoloc.sharding import shard_dataset

    manifest = shard_dataset(
        real_root, tmp_path / "shards", val_fraction=0.2, samples_per_shard=50, progress=False
    )
    assert manifest["skipped"] == [] and manifest["missing_views"] == []
    counts = {split: info["count"] for split, info in manifest["splits"].items()}
    assert counts["train"] + counts["val"] == 150 and counts["test"] == 40
    assert len(manifest["label_encoder"]["state_indices"]) >= 30


def test_realistic_views_are_smooth_in_space():
    """Image statistics of places 25 km apart are much closer than of places 1500+ km apart."""
    rng = np.random.default_rng(0)
    waves = world_waves()
    palette = state_palettes()[0, 0].astype(np.float32)
    near, far = [], []
    for name in ("Colorado", "Texas", "Ohio", "Georgia", "Montana", "Oregon", "Iowa", "Maine"):
        p = sample_points(name, 1, rng)[0]
        q = p + [0.2, 0.1]  # ~25 km away
        r = np.array([p[0], p[1] + (25 if p[1] < -95 else -25)])  # 25 degrees of longitude away
        stats = [
            _image_stats(render_place(x, palette, 64, np.random.default_rng(1), waves)) for x in (p, q, r)
        ]
        near.append(np.abs(stats[0] - stats[1]).mean())
        far.append(np.abs(stats[0] - stats[2]).mean())
    assert np.mean(near) < 0.5 * np.mean(far)


def _image_stats(views):
    """Mean colour of the top and bottom halves of each view: (4 * 2 * 3,)."""
    return np.concatenate([[v[:32].mean((0, 1)), v[32:].mean((0, 1))] for v in views]).ravel()


def test_realistic_fields_vary_inside_a_state_but_slowly():
    pts = sample_points("Texas", 300, np.random.default_rng(2))
    vals = field_values(pts)  # (300, F)
    assert vals.std(0).min() > 0.15  # a big state's interior varies
    shifted = field_values(pts + [0.01, 0.01])  # ~1.5 km
    assert np.abs(vals - shifted).max() < 0.05  # continuous


def test_unknown_mode_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown mode 'hard'"):
        generate_dataset(tmp_path, n_train=1, n_test=0, mode="hard")


def test_cli_realistic_mode(tmp_path, capsys):
    main(
        [str(tmp_path / "d"), "--n-train", "3", "--n-test", "1", "--image-size", "48", "--mode", "realistic"]
    )
    assert "realistic" in capsys.readouterr().out
    train = contract.read_train_table(tmp_path / "d")
    assert all(
        contains(STATES[s][0], [la], [lo])[0]
        for s, la, lo in zip(train["state_idx"], train["latitude"], train["longitude"])
    )
