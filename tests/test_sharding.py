"""shard_dataset: shard layout and bytes, manifest, stratified split, bad input, workers, reruns, CLI."""

import hashlib
import json
import subprocess
import sys
import tarfile
from itertools import pairwise
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from geoloc import contract, sharding
from geoloc.labels import LabelEncoder
from geoloc.sharding import SHARD_RE, shard_dataset, split_counts, view_problem, write_atomic
from geoloc.sharding import workers as shard_workers
from geoloc.sharding import write as shard_write
from geoloc.synth import corrupt_view, generate_dataset, view_path
from geoloc.writable import OutputPathError

REPO = Path(__file__).resolve().parents[1]


def small_root(path, n_train=30, n_test=6, seed=0):
    """32 px views: decoding is what the sharder checks, not the size."""
    return generate_dataset(path, n_train=n_train, n_test=n_test, seed=seed, num_states=5, image_size=32)


def read_split(out, split):
    """``{sample_id: {member suffix: bytes}}`` over the split's shards, plus ids in written order."""
    samples, order = {}, []
    for shard in sorted(Path(out).glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, suffix = m.name.split(".", 1)
                samples.setdefault(key, {})[suffix] = tar.extractfile(m).read()
    for key, members in samples.items():
        order.append(json.loads(members["json"])["sample_id"])
    return {json.loads(m["json"])["sample_id"]: m for m in samples.values()}, order


def shard_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(Path(out).iterdir())}


def edit_train_csv(root, edit):
    df = pd.read_csv(root / contract.TRAIN_CSV, dtype=str)
    edit(df)
    df.to_csv(root / contract.TRAIN_CSV, index=False)


# ---------------------------------------------------------------- layout, bytes, manifest


def test_manifest_fields(tiny_shards, tiny_data_root):
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    assert manifest["version"] == 1
    assert manifest["data_root"] == str(Path(tiny_data_root).resolve())
    assert (manifest["seed"], manifest["val_fraction"]) == (0, 0.25)
    csv = (Path(tiny_data_root) / contract.TRAIN_CSV).read_bytes()
    assert manifest["csv_sha256"] == hashlib.sha256(csv).hexdigest()
    train = contract.read_train_table(tiny_data_root)
    expected = LabelEncoder.fit(train["state_idx"], contract.read_state_mapping(tiny_data_root))
    assert LabelEncoder.from_dict(manifest["label_encoder"]) == expected
    assert manifest["skipped"] == [] and manifest["missing_views"] == []
    on_disk = sorted(p.name for p in tiny_shards.glob("*.tar"))
    assert on_disk == sorted(n for s in manifest["splits"].values() for n in s["shards"])
    for split, info in manifest["splits"].items():
        assert info["count"] == sum(info["shards"].values()) == len(read_split(tiny_shards, split)[0])
        assert all(n.startswith(f"{split}-") and SHARD_RE.match(n) for n in info["shards"])
        assert all(0 < c <= 7 for c in info["shards"].values())
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == 48
    assert manifest["splits"]["test"]["count"] == 12


def test_members_hold_original_bytes_and_labels(tiny_shards, tiny_data_root):
    root = Path(tiny_data_root)
    rows = contract.read_train_table(root).set_index("sample_id")
    for split in ("train", "val"):
        samples, _ = read_split(tiny_shards, split)
        for sid, members in samples.items():
            assert sorted(members) == ["east.jpg", "json", "north.jpg", "south.jpg", "west.jpg"]
            for view in contract.VIEWS:  # no re-encode
                assert (
                    members[f"{view}.jpg"]
                    == (root / contract.TRAIN_IMAGES / rows.loc[sid, f"image_{view}"]).read_bytes()
                )
            meta = json.loads(members["json"])
            assert meta == {
                "sample_id": sid,
                "state_idx": int(rows.loc[sid, "state_idx"]),
                "lat": float(rows.loc[sid, "latitude"]),
                "lon": float(rows.loc[sid, "longitude"]),
                "missing_views": [],
            }
    test, _ = read_split(tiny_shards, "test")
    template = contract.read_submission_template(root / contract.SAMPLE_SUBMISSION)
    assert sorted(test) == sorted(template["sample_id"])
    for sid, members in test.items():
        assert json.loads(members["json"]) == {
            "sample_id": sid,
            "state_idx": None,
            "lat": None,
            "lon": None,
            "missing_views": [],
        }
        assert members["north.jpg"] == view_path(root, sid, "north").read_bytes()


def test_plain_tar_reads_a_shard(tiny_shards):
    shard = min(tiny_shards.glob("train-*.tar"))
    listed = subprocess.run(
        ["tar", "-tf", str(shard)], capture_output=True, text=True, check=True
    ).stdout.split()
    with tarfile.open(shard) as tar:
        assert listed == tar.getnames()
        first = tar.extractfile(listed[0]).read()
    assert (
        subprocess.run(["tar", "-xOf", str(shard), listed[0]], capture_output=True, check=True).stdout
        == first
    )


def test_manifest_hashes_every_source_csv(tmp_path):
    root = small_root(tmp_path / "data", n_train=6, n_test=2)
    names = (contract.TRAIN_CSV, contract.SAMPLE_SUBMISSION, contract.STATE_MAPPING)
    before = shard_dataset(root, tmp_path / "a", progress=False)
    assert before["source_sha256"] == {n: hashlib.sha256((root / n).read_bytes()).hexdigest() for n in names}
    assert before["csv_sha256"] == before["source_sha256"][contract.TRAIN_CSV]
    mapping = pd.read_csv(root / contract.STATE_MAPPING)
    mapping.assign(state=mapping["state"].str.upper()).to_csv(root / contract.STATE_MAPPING, index=False)
    after = shard_dataset(root, tmp_path / "b", progress=False)
    changed = {n for n in names if before["source_sha256"][n] != after["source_sha256"][n]}
    assert changed == {contract.STATE_MAPPING}


# ---------------------------------------------------------------- split


def test_split_counts_are_proportional_and_keep_one_in_train():
    counts = split_counts({3: 1, 7: 10, 9: 4, 20: 2}, 0.25)
    assert counts[3] == 0  # a state with one sample stays in train
    assert sum(counts.values()) == round(17 * 0.25)
    assert all(abs(counts[s] - n * 0.25) < 1 for s, n in {7: 10, 9: 4, 20: 2}.items())
    assert split_counts({1: 5, 2: 5}, 0.0) == {1: 0, 2: 0}
    assert split_counts({1: 2, 2: 2, 5: 2}, 0.9) == {1: 1, 2: 1, 5: 1}


def test_split_is_stratified_disjoint_and_complete(tiny_shards, tiny_data_root):
    train, _ = read_split(tiny_shards, "train")
    val, _ = read_split(tiny_shards, "val")
    rows = contract.read_train_table(tiny_data_root)
    assert not set(train) & set(val)
    assert set(train) | set(val) == set(rows["sample_id"])
    sizes = rows["state_idx"].value_counts()
    val_states = pd.Series([json.loads(m["json"])["state_idx"] for m in val.values()]).value_counts()
    assert set(val_states.index) <= {s for s, n in sizes.items() if n > 1}
    for state, n in sizes.items():
        assert abs(val_states.get(state, 0) - 0.25 * n) < 1
    assert len(val) == round(48 * 0.25)


def test_split_and_order_are_seeded_and_shuffled(tmp_path):
    root = small_root(tmp_path / "data")
    a = shard_dataset(root, tmp_path / "a", val_fraction=0.3, seed=1, samples_per_shard=8, progress=False)
    shard_dataset(root, tmp_path / "b", val_fraction=0.3, seed=1, samples_per_shard=8, progress=False)
    c = shard_dataset(root, tmp_path / "c", val_fraction=0.3, seed=2, samples_per_shard=8, progress=False)
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    assert a["splits"]["val"]["count"] == c["splits"]["val"]["count"]
    assert set(read_split(tmp_path / "a", "val")[0]) != set(read_split(tmp_path / "c", "val")[0])
    samples, order = read_split(tmp_path / "a", "train")
    assert order != sorted(order)  # written shuffled, not in id/CSV order
    states = [json.loads(samples[sid]["json"])["state_idx"] for sid in order]
    changes = sum(a != b for a, b in pairwise(states))
    assert changes > 2 * len(set(states))  # states interleaved, not written state by state


def test_split_ignores_csv_row_order(tmp_path):
    root = small_root(tmp_path / "data")
    shard_dataset(root, tmp_path / "a", val_fraction=0.3, seed=0, samples_per_shard=8, progress=False)
    df = pd.read_csv(root / contract.TRAIN_CSV, dtype=str)
    df.iloc[::-1].to_csv(root / contract.TRAIN_CSV, index=False)
    shard_dataset(root, tmp_path / "b", val_fraction=0.3, seed=0, samples_per_shard=8, progress=False)
    for split in ("train", "val"):
        assert read_split(tmp_path / "a", split)[0] == read_split(tmp_path / "b", split)[0]


def test_a_corrupt_image_counts_as_an_absent_row_in_split_and_labels(tmp_path):
    """A state with 2 samples at val_fraction 0.5: corrupting its training sample keeps the other in train."""
    root = small_root(tmp_path / "data", n_train=20, n_test=2)
    rare = min(set(range(50)) - set(contract.read_train_table(root)["state_idx"].astype(int)))
    name = contract.read_state_mapping(root)[rare]

    def move_two_rows_to_rare(df):
        df.loc[df.index < 2, ["state_idx", "state"]] = [str(rare), name]

    edit_train_csv(root, move_two_rows_to_rare)
    kwargs = {"val_fraction": 0.5, "samples_per_shard": 4, "progress": False}
    shard_dataset(root, tmp_path / "clean", **kwargs)
    was_train = [sid for sid in ("000000", "000001") if sid in read_split(tmp_path / "clean", "train")[0]]
    assert len(was_train) == 1  # one each side: the test's premise
    bad, survivor = was_train[0], ({"000000", "000001"} - set(was_train)).pop()
    corrupt_view(root, bad, "north", "truncated")
    manifest = shard_dataset(root, tmp_path / "out", **kwargs)
    train, val = read_split(tmp_path / "out", "train")[0], read_split(tmp_path / "out", "val")[0]
    assert survivor in train and survivor not in val and bad not in train | val.keys()
    train_states = {json.loads(m["json"])["state_idx"] for m in train.values()}
    val_states = {json.loads(m["json"])["state_idx"] for m in val.values()}
    encoder = LabelEncoder.from_dict(manifest["label_encoder"])
    assert set(encoder.state_indices) == train_states >= val_states  # every class has a training point
    # the same split and shards as a run on the CSV without that row
    edit_train_csv(root, lambda df: df.drop(df.index[df["sample_id"] == bad], inplace=True))
    shard_dataset(root, tmp_path / "without", **kwargs)
    for split in ("train", "val"):
        assert read_split(tmp_path / "out", split) == read_split(tmp_path / "without", split)


def test_no_shard_is_written_empty_when_its_samples_are_bad(tmp_path):
    root = small_root(tmp_path / "data", n_train=12, n_test=2)
    kwargs = {"val_fraction": 0.0, "samples_per_shard": 3, "progress": False}
    shard_dataset(root, tmp_path / "clean", **kwargs)
    with tarfile.open(tmp_path / "clean" / "train-000001.tar") as tar:
        doomed = {json.loads(tar.extractfile(m).read())["sample_id"] for m in tar if m.name.endswith(".json")}
    for sid in doomed:
        corrupt_view(root, sid, "west", "garbage")
    manifest = shard_dataset(root, tmp_path / "out", **kwargs)
    shards = manifest["splits"]["train"]["shards"]
    assert sorted(shards.values()) == [3, 3, 3] and len(manifest["skipped"]) == 3
    assert sorted(p.name for p in (tmp_path / "out").glob("train-*.tar")) == sorted(shards)
    for name, count in shards.items():
        with tarfile.open(tmp_path / "out" / name) as tar:
            assert len(tar.getnames()) == 5 * count


# ---------------------------------------------------------------- bad input


def break_training_data(root):
    """One sample per kind of bad input; returns {sample_id: expected reason code}."""
    corrupt_view(root, "000001", "north", "missing")
    corrupt_view(root, "000002", "east", "truncated")
    corrupt_view(root, "000003", "south", "garbage")

    def edit(df):
        df.loc[4, "latitude"] = "nan"
        df.loc[5, "longitude"] = "-200.5"
        df.loc[6, "state_idx"] = "77"
        df.loc[7, "state_idx"] = "abc"
        df.loc[8, "sample_id"] = "000009"  # now 000009 twice: both rows go
        df.loc[10, "image_west"] = None

    edit_train_csv(root, edit)
    return {
        "000001": "missing_view",
        "000002": "bad_image",
        "000003": "bad_image",
        "000004": "bad_coordinate",
        "000005": "bad_coordinate",
        "000006": "unknown_state",
        "000007": "unknown_state",
        "000009": "duplicate_id",
        "000010": "missing_view",
    }


def test_bad_training_samples_are_skipped_listed_and_printed(tmp_path, capsys):
    root = small_root(tmp_path / "data")
    expected = break_training_data(root)
    manifest = shard_dataset(root, tmp_path / "out", val_fraction=0.2, samples_per_shard=8, progress=False)
    listed = {}
    for e in manifest["skipped"]:
        assert set(e) == {"sample_id", "split", "reason"} and e["split"] in ("train", "val")
        listed.setdefault(e["sample_id"], set()).add(e["reason"].split(":")[0])
    assert listed == {sid: {code} for sid, code in expected.items()}
    assert len(manifest["skipped"]) == len(expected) + 1  # two rows carry the duplicated id
    kept = {**read_split(tmp_path / "out", "train")[0], **read_split(tmp_path / "out", "val")[0]}
    assert not set(kept) & set(expected)
    assert len(kept) == 30 - len(expected) - 1  # 000008 was renamed to the duplicate 000009
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == len(kept)
    out = capsys.readouterr().out
    assert "10 skipped: bad_coordinate 2, bad_image 2, duplicate_id 2, missing_view 2, unknown_state 2" in out
    lines = out.splitlines()
    assert all(f"  {e['sample_id']} ({e['split']}): {e['reason']}" in lines for e in manifest["skipped"])


def bad_coordinates(root, rows):
    edit_train_csv(root, lambda df: df.__setitem__("latitude", df["latitude"].where(df.index >= rows, "nan")))


def test_console_lists_every_skipped_sample_up_to_fifty(tmp_path, capsys):
    root = small_root(tmp_path / "data", n_train=12, n_test=2)
    bad_coordinates(root, 6)
    corrupt_view(root, "000008", "east", "garbage")
    manifest = shard_dataset(root, tmp_path / "out", val_fraction=0.0, progress=False)
    out = capsys.readouterr().out.splitlines()
    assert "7 skipped: bad_coordinate 6, bad_image 1" in out
    listed = [line for line in out if line.startswith("  ")]
    assert listed == [f"  {e['sample_id']} ({e['split']}): {e['reason']}" for e in manifest["skipped"]]
    assert sorted(e["sample_id"] for e in manifest["skipped"]) == [f"{i:06d}" for i in (0, 1, 2, 3, 4, 5, 8)]
    assert not any("more" in line for line in out)


def test_console_lists_fifty_skipped_samples_then_points_to_the_manifest(tmp_path, capsys):
    root = small_root(tmp_path / "data", n_train=56, n_test=1, seed=1)
    bad_coordinates(root, 53)
    manifest = shard_dataset(root, tmp_path / "out", val_fraction=0.0, progress=False)
    out = capsys.readouterr().out.splitlines()
    assert "53 skipped: bad_coordinate 53" in out
    listed = [line for line in out if line.startswith("  ")]
    assert listed[:50] == [
        f"  {e['sample_id']} ({e['split']}): {e['reason']}" for e in manifest["skipped"][:50]
    ]
    assert listed[50:] == [f"  ... and 3 more (all in {tmp_path / 'out' / 'manifest.json'})"]


def test_no_training_sample_left_is_an_error_before_anything_is_written(tmp_path, capsys):
    root = small_root(tmp_path / "data", n_train=3, n_test=2)
    bad_coordinates(root, 2)
    corrupt_view(root, "000002", "south", "truncated")
    with pytest.raises(contract.DataContractError, match="no usable training sample"):
        shard_dataset(root, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert "3 skipped: bad_coordinate 2, bad_image 1" in capsys.readouterr().out


def test_image_cells_may_hold_a_path_below_the_data_root(tmp_path):
    root = small_root(tmp_path / "data", n_train=6, n_test=2)
    edit_train_csv(
        root, lambda df: df.__setitem__("image_north", contract.TRAIN_IMAGES + "/" + df["image_north"])
    )
    manifest = shard_dataset(root, tmp_path / "out", val_fraction=0.0, progress=False)
    assert manifest["skipped"] == [] and manifest["splits"]["train"]["count"] == 6


def test_unknown_state_is_checked_against_the_mapping(tmp_path):
    root = small_root(tmp_path / "data")
    present = int(contract.read_train_table(root)["state_idx"].iloc[0])
    mapping = pd.read_csv(root / contract.STATE_MAPPING)
    mapping[mapping["state_idx"] != present].to_csv(root / contract.STATE_MAPPING, index=False)
    manifest = shard_dataset(root, tmp_path / "out", samples_per_shard=8, progress=False)
    assert manifest["skipped"] and all(e["reason"].startswith("unknown_state") for e in manifest["skipped"])
    assert present not in manifest["label_encoder"]["state_indices"]


def nan_latitude_in_row_4(root):
    edit_train_csv(root, lambda df: df.__setitem__("latitude", df["latitude"].where(df.index != 4, "nan")))


def truncate_000002_east(root):
    corrupt_view(root, "000002", "east", "truncated")


@pytest.mark.parametrize(
    "breakage, sample, where",
    [
        (truncate_000002_east, "000002", "img_000002_east.jpg"),
        (nan_latitude_in_row_4, "000004", f"{contract.TRAIN_CSV}, line 6"),
    ],
)
def test_strict_stops_at_the_first_bad_sample(tmp_path, breakage, sample, where):
    root = small_root(tmp_path / "data")
    breakage(root)
    with pytest.raises(contract.DataContractError, match=where) as err:
        shard_dataset(root, tmp_path / "out", strict=True, samples_per_shard=8, progress=False)
    assert f"sample '{sample}'" in str(err.value)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_truncated_jpeg_is_caught_by_decoding_not_by_opening(tmp_path):
    root = generate_dataset(tmp_path, n_train=1, n_test=0, seed=0)  # 256 px: the header survives the cut
    path = corrupt_view(root, "000000", "south", "truncated")
    Image.open(path)  # opening reads only the header and succeeds
    problem = view_problem(str(path), "south")
    assert problem.startswith("bad_image: south view:") and str(path) in problem


@pytest.mark.parametrize("kind", ["grayscale", "cmyk", "png"])
def test_other_image_modes_are_kept_byte_for_byte(tmp_path, kind):
    root = small_root(tmp_path / "data", n_train=6, n_test=2)
    path = corrupt_view(root, "000003", "west", kind)
    test_path = corrupt_view(root, "000007", "north", kind)
    manifest = shard_dataset(root, tmp_path / "out", val_fraction=0.0, progress=False)
    assert manifest["skipped"] == [] and manifest["missing_views"] == []
    assert read_split(tmp_path / "out", "train")[0]["000003"]["west.jpg"] == path.read_bytes()
    assert read_split(tmp_path / "out", "test")[0]["000007"]["north.jpg"] == test_path.read_bytes()


def test_test_sample_with_bad_views_is_kept(tmp_path, capsys):
    root = small_root(tmp_path / "data", n_train=8, n_test=4)
    corrupt_view(root, "000009", "east", "truncated")
    corrupt_view(root, "000009", "west", "missing")
    for view in contract.VIEWS:
        corrupt_view(root, "000010", view, "garbage")
    manifest = shard_dataset(root, tmp_path / "out", samples_per_shard=3, progress=False)
    assert manifest["skipped"] == [] and manifest["splits"]["test"]["count"] == 4
    test = read_split(tmp_path / "out", "test")[0]
    assert sorted(test["000009"]) == ["json", "north.jpg", "south.jpg"]
    assert json.loads(test["000009"]["json"])["missing_views"] == ["east", "west"]
    assert sorted(test["000010"]) == ["json"]
    assert json.loads(test["000010"]["json"])["missing_views"] == list(contract.VIEWS)
    recorded = [(m["sample_id"], m["view"], m["reason"].split(":")[0]) for m in manifest["missing_views"]]
    assert ("000009", "east", "bad_image") in recorded and ("000009", "west", "missing_view") in recorded
    assert len(recorded) == 6
    assert "6 test views missing (sample kept)" in capsys.readouterr().out


def edit_template(root, edit):
    df = pd.read_csv(root / contract.SAMPLE_SUBMISSION, dtype=str)
    df = edit(df)
    df.to_csv(root / contract.SAMPLE_SUBMISSION, index=False)


def repeat_first_row(df):
    return pd.concat([df, df.iloc[[0]]])


def repeat_first_id_padded(df):
    df.loc[1, "sample_id"] = df.loc[0, "sample_id"] + " "  # "000008 " is "000008" once stripped
    return df


@pytest.mark.parametrize(
    "edit, match",
    [
        (repeat_first_row, r"'000008' on lines \[2, 5\]"),
        (repeat_first_id_padded, r"'000008' on lines \[2, 3\]"),
        (lambda df: df.iloc[:0], "no rows"),
    ],
)
def test_a_template_with_a_repeated_id_or_no_rows_is_refused_before_any_work(
    tmp_path, monkeypatch, edit, match
):
    """infer.py could never write a valid submission from it: refused at sharding time, nothing written."""
    root = small_root(tmp_path / "data", n_train=8, n_test=3)
    edit_template(root, edit)
    monkeypatch.setattr(
        sharding, "check_samples", lambda *a: pytest.fail("images checked before the refusal")
    )
    with pytest.raises(contract.DataContractError, match=match) as err:
        shard_dataset(root, tmp_path / "out", progress=False)
    assert str(root / contract.SAMPLE_SUBMISSION) in str(err.value)
    assert not (tmp_path / "out").exists()


def test_a_blank_padded_train_id_duplicates_the_plain_one_and_both_rows_are_skipped(tmp_path):
    root = small_root(tmp_path / "data", n_train=12, n_test=2)
    edit_train_csv(
        root, lambda df: df.__setitem__("sample_id", df["sample_id"].mask(df.index == 3, " 000002 "))
    )
    manifest = shard_dataset(root, tmp_path / "out", val_fraction=0.0, progress=False)
    assert [(e["sample_id"], e["reason"].split(":")[0]) for e in manifest["skipped"]] == [
        ("000002", "duplicate_id"),
        ("000002", "duplicate_id"),
    ]
    assert "CSV lines [4, 5]" in manifest["skipped"][0]["reason"]
    assert manifest["splits"]["train"]["count"] == 10


def test_two_test_ids_with_one_shard_key_are_an_error_naming_both(tmp_path):
    root = small_root(tmp_path / "data", n_train=6, n_test=3)
    template = pd.read_csv(root / contract.SAMPLE_SUBMISSION, dtype=str)
    template.loc[0, "sample_id"], template.loc[1, "sample_id"] = "a.b", "a_b"
    template.to_csv(root / contract.SAMPLE_SUBMISSION, index=False)
    with pytest.raises(contract.DataContractError, match=r"'a\.b'.*'a_b'") as err:
        shard_dataset(root, tmp_path / "out", progress=False)
    assert contract.SAMPLE_SUBMISSION in str(err.value) and "lines [2, 3]" in str(err.value)


def test_bad_arguments_are_rejected(tmp_path):
    root = small_root(tmp_path / "data", n_train=2, n_test=1)
    for kwargs in ({"val_fraction": 1.0}, {"val_fraction": -0.1}, {"samples_per_shard": 0}, {"workers": 0}):
        with pytest.raises(ValueError):
            shard_dataset(root, tmp_path / "out", progress=False, **kwargs)


def test_a_state_mapping_with_a_header_only_is_an_error_naming_it(tmp_path):
    root = small_root(tmp_path / "data", n_train=6, n_test=2)
    (root / contract.STATE_MAPPING).write_text("state_idx,state\n")
    with pytest.raises(contract.DataContractError, match=r"state_mapping\.csv: no rows") as err:
        shard_dataset(root, tmp_path / "out", progress=False)
    assert str(root / contract.STATE_MAPPING) in str(err.value)
    assert not (tmp_path / "out").exists()


def rename_state_of_row_2(root, name="Atlantis"):
    edit_train_csv(root, lambda df: df.__setitem__("state", df["state"].mask(df.index == 2, name)))


def test_a_state_name_disagreeing_with_the_mapping_is_a_counted_skip(tmp_path, capsys):
    root = small_root(tmp_path / "data", n_train=12, n_test=2)
    rename_state_of_row_2(root)
    # case and surrounding blanks do not count as a disagreement
    edit_train_csv(
        root,
        lambda df: df.__setitem__(
            "state", df["state"].mask(df.index == 5, f"  {df.loc[5, 'state'].upper()} ")
        ),
    )
    manifest = shard_dataset(root, tmp_path / "out", val_fraction=0.0, progress=False)
    assert [e["sample_id"] for e in manifest["skipped"]] == ["000002"]
    reason = manifest["skipped"][0]["reason"]
    idx = int(contract.read_train_table(root)["state_idx"][2])
    assert reason.startswith("state_mismatch: state 'Atlantis'")
    assert f"state_idx {idx} {contract.read_state_mapping(root)[idx]!r}" in reason
    assert manifest["splits"]["train"]["count"] == 11
    assert "1 skipped: state_mismatch 1" in capsys.readouterr().out


def test_strict_makes_a_state_mismatch_an_error_naming_file_line_and_sample(tmp_path):
    root = small_root(tmp_path / "data", n_train=12, n_test=2)
    rename_state_of_row_2(root)
    with pytest.raises(
        contract.DataContractError, match=rf"{contract.TRAIN_CSV}, line 4: sample '000002': state_mismatch"
    ):
        shard_dataset(root, tmp_path / "out", strict=True, progress=False)


OUTSIDE = {
    "absolute": lambda outside: str(outside),
    "dotdot": lambda outside: f"../../{outside.parent.name}/{outside.name}",
}


def point_cell_outside(root, csv, row, col, kind):
    """Copy a valid view outside the data root and point one CSV cell at it; returns the cell."""
    outside = root.parent / "elsewhere" / "stolen.jpg"
    outside.parent.mkdir(exist_ok=True)
    folder = contract.TRAIN_IMAGES if csv == contract.TRAIN_CSV else contract.TEST_IMAGES
    df = pd.read_csv(root / csv, dtype=str)
    outside.write_bytes((root / folder / df.loc[row, col]).read_bytes())
    df.loc[row, col] = OUTSIDE[kind](outside)
    df.to_csv(root / csv, index=False)
    return df.loc[row, col]


@pytest.mark.parametrize("kind", sorted(OUTSIDE))
def test_a_train_image_cell_outside_the_root_is_skipped_as_bad_path(tmp_path, kind):
    root = small_root(tmp_path / "data", n_train=12, n_test=2)
    cell = point_cell_outside(root, contract.TRAIN_CSV, 3, "image_south", kind)
    manifest = shard_dataset(root, tmp_path / "out", val_fraction=0.0, progress=False)
    assert [e["sample_id"] for e in manifest["skipped"]] == ["000003"]
    reason = manifest["skipped"][0]["reason"]
    assert reason.startswith("bad_path: south view: image_south") and repr(cell) in reason
    with pytest.raises(
        contract.DataContractError, match=rf"{contract.TRAIN_CSV}, line 5: sample '000003': bad_path"
    ):
        shard_dataset(root, tmp_path / "strict", val_fraction=0.0, strict=True, progress=False)


@pytest.mark.parametrize("kind", sorted(OUTSIDE))
def test_a_test_image_cell_outside_the_root_is_a_missing_view_and_the_sample_is_kept(tmp_path, kind):
    root = small_root(tmp_path / "data", n_train=8, n_test=3)
    point_cell_outside(root, contract.SAMPLE_SUBMISSION, 1, "image_east", kind)
    manifest = shard_dataset(root, tmp_path / "out", progress=False)
    assert manifest["skipped"] == [] and manifest["splits"]["test"]["count"] == 3
    [missing] = manifest["missing_views"]
    assert (missing["sample_id"], missing["view"]) == ("000009", "east")
    assert missing["reason"].startswith("bad_path: east view: image_east")
    test = read_split(tmp_path / "out", "test")[0]
    assert sorted(test["000009"]) == ["json", "north.jpg", "south.jpg", "west.jpg"]
    assert json.loads(test["000009"]["json"])["missing_views"] == ["east"]


@pytest.mark.parametrize("kind", sorted(OUTSIDE))
def test_allow_outside_root_reads_such_cells(tmp_path, kind):
    root = small_root(tmp_path / "data", n_train=8, n_test=3)
    point_cell_outside(root, contract.TRAIN_CSV, 3, "image_south", kind)
    point_cell_outside(root, contract.SAMPLE_SUBMISSION, 1, "image_east", kind)
    stolen = (root.parent / "elsewhere" / "stolen.jpg").read_bytes()
    manifest = shard_dataset(
        root, tmp_path / "out", val_fraction=0.0, progress=False, allow_outside_root=True
    )
    assert manifest["skipped"] == [] and manifest["missing_views"] == []
    assert read_split(tmp_path / "out", "test")[0]["000009"]["east.jpg"] == stolen


def test_symlinked_image_folders_inside_the_root_keep_working(tmp_path):
    root = small_root(tmp_path / "data", n_train=8, n_test=3)
    for folder in (contract.TRAIN_IMAGES, contract.TEST_IMAGES):
        target = tmp_path / "disk2" / folder
        target.parent.mkdir(exist_ok=True)
        (root / folder).rename(target)
        (root / folder).symlink_to(target, target_is_directory=True)
    manifest = shard_dataset(root, tmp_path / "out", val_fraction=0.0, progress=False)
    assert manifest["skipped"] == [] and manifest["missing_views"] == []
    assert manifest["splits"]["train"]["count"] == 8 and manifest["splits"]["test"]["count"] == 3


# ---------------------------------------------------------------- bad input: the output directory


@pytest.mark.parametrize("where", ["", contract.TRAIN_IMAGES, f"{contract.TEST_IMAGES}/shards"])
def test_out_in_the_data_root_or_its_image_folders_is_refused_before_any_work(tmp_path, monkeypatch, where):
    root = small_root(tmp_path / "data", n_train=6, n_test=2)
    before = shard_bytes(root / contract.TRAIN_IMAGES)
    monkeypatch.setattr(
        sharding, "check_samples", lambda *a: pytest.fail("images checked before the refusal")
    )
    with pytest.raises(
        OutputPathError, match=r"--out .*(is the data root|lies in the data root's image folder)"
    ):
        shard_dataset(root, root / where, progress=False)
    with pytest.raises(OutputPathError):  # the same folder through another spelling
        shard_dataset(root, tmp_path / "data" / "." / where, progress=False)
    assert shard_bytes(root / contract.TRAIN_IMAGES) == before
    assert not (root / "manifest.json").exists()


def test_out_where_nothing_can_be_written_is_refused_before_checking_images(
    tmp_path, monkeypatch, read_only_dir
):
    root = small_root(tmp_path / "data", n_train=6, n_test=2)
    monkeypatch.setattr(
        sharding, "check_samples", lambda *a: pytest.fail("images checked before the refusal")
    )
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (a_file, "is a file"),
        (a_file / "shards", f"lies under the file {a_file}"),
        (read_only_dir / "shards", f"cannot write in {read_only_dir}"),
    ]
    for out, match in cases:
        with pytest.raises(OutputPathError, match=match) as err:
            shard_dataset(root, out, progress=False)
        assert f"--out {out}" in str(err.value)


# ---------------------------------------------------------------- workers and reruns


def test_output_and_manifest_bytes_are_identical_for_one_and_two_workers(tmp_path):
    root = small_root(tmp_path / "data", n_train=40, n_test=8)
    corrupt_view(root, "000005", "north", "truncated")  # the skip list must match too
    garbage = corrupt_view(root, "000006", "east", "garbage")  # PIL's message holds an object address
    test_garbage = corrupt_view(root, "000041", "west", "garbage")
    kwargs = {"val_fraction": 0.2, "samples_per_shard": 6, "progress": False}
    one = shard_dataset(root, tmp_path / "one", workers=1, **kwargs)
    two = shard_dataset(root, tmp_path / "two", workers=2, **kwargs)
    assert one == two and len(one["skipped"]) == 2 and len(one["missing_views"]) == 1
    assert len(one["splits"]["train"]["shards"]) > 2
    manifest = (tmp_path / "one" / "manifest.json").read_bytes()
    assert manifest == (tmp_path / "two" / "manifest.json").read_bytes()
    assert b" at 0x" not in manifest
    reasons = [e["reason"] for e in one["skipped"] + one["missing_views"]]
    assert any(str(garbage) in r for r in reasons) and any(str(test_garbage) in r for r in reasons)
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two")


def test_interrupted_run_leaves_no_finished_looking_shard_and_rerun_repairs(tmp_path, monkeypatch):
    root = small_root(tmp_path / "data")
    kwargs = {"val_fraction": 0.2, "samples_per_shard": 5, "progress": False}
    shard_dataset(root, tmp_path / "clean", **kwargs)
    out = tmp_path / "out"
    shard_dataset(root, out, seed=9, samples_per_shard=2, progress=False)  # a different earlier run
    (out / "notes.txt").write_text("not ours")

    calls = {"n": 0}
    real_add = shard_write.add_member

    def dying_add(tar, name, data):
        calls["n"] += 1
        if calls["n"] == 12:  # in the middle of the third sample of the first shard
            raise KeyboardInterrupt
        real_add(tar, name, data)

    monkeypatch.setattr(shard_write, "add_member", dying_add)
    with pytest.raises(KeyboardInterrupt):
        shard_dataset(root, out, **kwargs)
    monkeypatch.undo()
    assert not (out / "manifest.json").exists()  # the old manifest no longer vouches for the directory
    assert not (out / "train-000000.tar.tmp").exists()  # a failed write cleans up after itself
    # the half-written shard is only a temporary; what .tar files remain belong to the earlier run
    with tarfile.open(out / "train-000000.tar") as tar:
        assert len(tar.getnames()) == 2 * 5
    (out / "val-000001.tar.tmp").write_bytes(b"left by a killed worker")
    shard_dataset(root, out, **kwargs)
    assert shard_bytes(out) == {**shard_bytes(tmp_path / "clean"), "notes.txt": b"not ours"}


def test_write_atomic_never_leaves_a_partial_file(tmp_path):
    target = tmp_path / "x.tar"

    def fail(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(target, fail)
    assert not target.exists() and not (tmp_path / "x.tar.tmp").exists()
    write_atomic(target, lambda f: f.write(b"done"))
    assert target.read_bytes() == b"done" and not (tmp_path / "x.tar.tmp").exists()


def test_strict_failure_with_workers_leaves_no_temporary(tmp_path):
    root = small_root(tmp_path / "data", n_train=60, n_test=4)
    corrupt_view(root, "000001", "south", "garbage")
    with pytest.raises(contract.DataContractError, match="000001"):
        shard_dataset(root, tmp_path / "out", strict=True, workers=3, samples_per_shard=6, progress=False)
    assert not list(tmp_path.glob("out/*.tmp"))


def test_a_failed_run_removes_the_temporaries_a_killed_writer_leaves(tmp_path, monkeypatch):
    root = small_root(tmp_path / "data", n_train=8, n_test=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.tmp").write_text("not ours")

    def killed_writer(path, write):  # a worker terminated mid-write cannot remove its temporary
        path.with_name(path.name + ".tmp").write_bytes(b"half a shard")
        raise KeyboardInterrupt

    monkeypatch.setattr(shard_write, "write_atomic", killed_writer)
    with pytest.raises(KeyboardInterrupt):
        shard_dataset(root, out, samples_per_shard=3, progress=False)
    assert [p.name for p in out.iterdir()] == ["notes.tmp"]


def test_a_view_vanishing_after_its_check_is_an_error_naming_it(tmp_path, monkeypatch):
    root = small_root(tmp_path / "data", n_train=24, n_test=2)
    real_check = sharding.check_samples

    def check_then_delete(*args):
        checked = real_check(*args)
        view_path(root, "000003", "north").unlink()
        return checked

    monkeypatch.setattr(sharding, "check_samples", check_then_delete)
    with pytest.raises(
        contract.DataContractError, match="img_000003_north.jpg: unreadable .* changed during"
    ):
        shard_dataset(root, tmp_path / "out", workers=2, samples_per_shard=2, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not SHARD_RE.match(p.name)) == []


# ---------------------------------------------------------------- CLI


def run_cli(*args):
    return subprocess.run(
        [sys.executable, str(REPO / "shard_dataset.py"), *args],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
    )


def test_cli_help_explains_every_flag():
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in (
        "--data-root",
        "--out",
        "--val-fraction",
        "--seed",
        "--samples-per-shard",
        "--workers",
        "--strict",
        "--allow-outside-root",
    ):
        assert flag in result.stdout
    assert result.stdout.count("(default:") >= 4
    assert "min(8, CPU count)" in " ".join(result.stdout.split())


def test_cli_workers_default_to_the_cpu_count_up_to_eight(monkeypatch):
    for cpus, expected in ((2, 2), (64, 8), (None, 1)):
        monkeypatch.setattr(shard_workers.os, "cpu_count", lambda cpus=cpus: cpus)
        assert sharding.parse_args(["--data-root", "d", "--out", "o"]).workers == expected


def test_cli_run_and_strict_error(tmp_path):
    root = small_root(tmp_path / "data", n_train=20, n_test=4)
    result = run_cli(
        "--data-root",
        str(root),
        "--out",
        str(tmp_path / "out"),
        "--val-fraction",
        "0.25",
        "--samples-per-shard",
        "4",
        "--workers",
        "2",
        "--seed",
        "3",
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (manifest["seed"], manifest["val_fraction"]) == (3, 0.25)
    assert manifest["splits"]["val"]["count"] == 5 and len(manifest["splits"]["train"]["shards"]) == 4
    assert "wrote train 15, val 5, test 4 samples" in result.stdout
    corrupt_view(root, "000004", "south", "garbage")
    result = run_cli("--data-root", str(root), "--out", str(tmp_path / "out2"), "--strict")
    assert result.returncode != 0
    assert "000004" in result.stderr and "img_000004_south.jpg" in result.stderr
    assert (
        run_cli("--data-root", str(root), "--out", str(tmp_path / "o3"), "--val-fraction", "1").returncode
        == 2
    )


def test_labels_file_matches_the_shards_json_exactly(tiny_shards):
    """labels.csv beside the manifest holds every train/val label as the shards' JSON do (floats exact)."""
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    table = pd.read_csv(tiny_shards / manifest["labels_file"], dtype={"sample_id": str})
    from_tars = {}
    for split in ("train", "val"):
        for path in sorted(tiny_shards.glob(f"{split}-*.tar")):
            with tarfile.open(path) as tar:
                for m in tar.getmembers():
                    if m.name.endswith(".json"):
                        meta = json.load(tar.extractfile(m))
                        from_tars[meta["sample_id"]] = (split, meta["state_idx"], meta["lat"], meta["lon"])
    from_csv = {r.sample_id: (r.split, r.state_idx, r.lat, r.lon) for r in table.itertuples(index=False)}
    assert from_csv == from_tars
    assert len(table) == manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"]


def test_cli_errors_on_bad_input_are_one_line_without_a_traceback(tmp_path):
    root = small_root(tmp_path / "data", n_train=6, n_test=2)
    result = run_cli("--data-root", str(root), "--out", str(root))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: --out {root}: is the data root")
    (root / contract.STATE_MAPPING).write_bytes(b"")
    result = run_cli("--data-root", str(root), "--out", str(tmp_path / "out"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"{root / contract.STATE_MAPPING}: the file is empty" in result.stderr
