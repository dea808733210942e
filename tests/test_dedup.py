"""Near-duplicate detection: the matcher against brute force, the hash on planted copies, and
shard_dataset --dedup report / drop / off with planted duplicates (re-encoded and resized copies)."""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from geoloc import contract
from geoloc.data.shardset import ShardSet
from geoloc.sharding import check as shard_check
from geoloc.sharding import dedup, duplicates, shard_dataset
from geoloc.sharding.rows import Sample
from geoloc.synth import corrupt_view, generate_dataset, view_path

REPO = Path(__file__).resolve().parents[1]
KINDS = ("q70", "q90", "r240", "k240", "r272")  # the copies the default threshold must catch


# ---------------------------------------------------------------- the matcher


def random_codes(n, seed, planted=40, max_flips=10, missing=0.1):
    """Random hashes ``(n, 4, WORDS)`` with ``planted`` near copies (a few bits flipped per view)."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2**64, size=(n, 4, dedup.WORDS), dtype=np.uint64)
    for _ in range(planted):
        a, b = rng.choice(n, size=2, replace=False)
        codes[b] = codes[a]
        for v in range(4):
            for _ in range(rng.integers(0, max_flips)):
                word = 0 if rng.random() < 0.3 else rng.integers(dedup.WORDS)
                codes[b, v, word] ^= np.uint64(1) << np.uint64(rng.integers(64))
    present = rng.random((n, 4)) >= missing
    return codes, present, rng.random(n) < 0.7


def python_pairs(codes, present, query, threshold, coarse, min_views):
    """The definition, in plain Python ints: the reference the numpy code is held to."""
    found = []
    for i in range(len(codes)):
        for j in range(i + 1, len(codes)):
            views = [v for v in range(4) if present[i, v] and present[j, v]]
            if not (query[i] or query[j]) or len(views) < min_views:
                continue
            c = sum((int(codes[i, v, 0]) ^ int(codes[j, v, 0])).bit_count() for v in views)
            bits = sum((int(a) ^ int(b)).bit_count() for v in views for a, b in zip(codes[i, v], codes[j, v]))
            if c <= coarse * len(views) and bits <= threshold * len(views):
                found.append((i, j, bits, len(views)))
    return found


def as_tuples(pairs):
    return list(zip(*(x.tolist() for x in pairs)))


def test_near_pairs_equal_the_definition_on_random_hashes():
    for seed, threshold, coarse in ((0, 6, 4), (1, 3, 2), (2, 12, 6)):
        codes, present, query = random_codes(90, seed, planted=30, max_flips=4)
        expected = python_pairs(codes, present, query, threshold, coarse, dedup.MIN_SHARED_VIEWS)
        got = as_tuples(dedup.near_pairs(codes, present, query, threshold, coarse))
        assert got == expected and len(expected) >= 5, (seed, len(expected))
        assert got == as_tuples(dedup.brute_force_pairs(codes, present, query, threshold, coarse))


def test_near_pairs_equal_brute_force_at_a_larger_n_and_find_every_planted_copy():
    codes, present, query = random_codes(1500, 3, planted=300, max_flips=6, missing=0.05)
    fast = as_tuples(dedup.near_pairs(codes, present, query, threshold=10))
    assert fast == as_tuples(dedup.brute_force_pairs(codes, present, query, threshold=10))
    assert len(fast) > 100  # most planted copies are within the bounds; random pairs (~512 bits) never
    assert all(bits <= 10 * views and views >= 2 for _, _, bits, views in fast)


def test_a_pair_at_the_coarse_bound_is_found_and_one_bit_beyond_is_not():
    """Pigeonhole: COARSE_PER_VIEW flipped coarse bits in distinct bands leave one band equal; one more
    flip (one per band, in every view) leaves none, and the pair is beyond the bound."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 2**64, size=(2, 4, dedup.WORDS), dtype=np.uint64)
    codes[1] = codes[0]
    bands = dedup.band_edges(dedup.COARSE_PER_VIEW)
    for lo, _ in bands[:-1]:
        codes[1, :, 0] ^= np.uint64(1) << np.uint64(lo)
    present, query = np.ones((2, 4), bool), np.array([True, False])
    assert as_tuples(dedup.near_pairs(codes, present, query)) == [(0, 1, 4 * dedup.COARSE_PER_VIEW, 4)]
    codes[1, :, 0] ^= np.uint64(1) << np.uint64(bands[-1][0])  # every band of every view now differs
    assert as_tuples(dedup.near_pairs(codes, present, query)) == []
    assert as_tuples(dedup.brute_force_pairs(codes, present, query)) == []


def test_pairs_need_a_query_sample_and_enough_shared_views():
    codes = np.zeros((4, 4, dedup.WORDS), dtype=np.uint64)  # four identical samples
    present = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0], [0, 1, 1, 0]], dtype=bool)
    query = np.array([True, False, False, False])
    got = as_tuples(dedup.near_pairs(codes, present, query))
    assert got == [(0, 1, 0, 4), (0, 3, 0, 2)]  # 1~3 has no query sample; 0~2 shares one view only
    assert as_tuples(dedup.near_pairs(codes, present, np.ones(4, bool))) == [
        (0, 1, 0, 4),
        (0, 3, 0, 2),
        (1, 3, 0, 2),
    ]


def test_a_bucket_larger_than_a_chunk_gives_the_same_pairs(monkeypatch):
    codes, present, query = random_codes(300, 4, planted=60, max_flips=3)
    codes[:150, :, 0] &= ~np.uint64(0xFFFFFFFF)  # half the samples share their low coarse bands: big runs
    expected = as_tuples(dedup.near_pairs(codes, present, query, threshold=40))
    monkeypatch.setattr(dedup, "PAIR_CHUNK", 997)
    assert as_tuples(dedup.near_pairs(codes, present, query, threshold=40)) == expected
    assert expected == as_tuples(dedup.brute_force_pairs(codes, present, query, threshold=40))
    assert len(expected) >= 20


def test_nothing_to_match_gives_empty_arrays():
    codes, present = np.zeros((0, 4, dedup.WORDS), np.uint64), np.zeros((0, 4), bool)
    assert all(len(x) == 0 for x in dedup.near_pairs(codes, present, np.zeros(0, bool)))


# ---------------------------------------------------------------- the hash on generated views


def copy_bytes(img: Image.Image, kind: str) -> bytes:
    """A planted copy: q70/q90 re-encode; r240/r272 resized and back to 256 (q75); k240 kept at 240."""
    img, buf = img.convert("RGB"), io.BytesIO()
    if kind.startswith("q"):
        img.save(buf, format="JPEG", quality=int(kind[1:]))
    elif kind.startswith("r"):
        side = int(kind[1:])
        img.resize((side, side), Image.BICUBIC).resize(img.size, Image.BICUBIC).save(buf, "JPEG", quality=75)
    else:
        img.resize((240, 240), Image.BICUBIC).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def hash_file(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return dedup.view_hash(img)


def test_the_hash_survives_reencoding_and_resizing_while_distinct_generated_samples_stay_apart(tmp_path):
    """Over a generated set: every planted copy is found at the default threshold, no distinct pair is."""
    root = generate_dataset(tmp_path / "data", n_train=60, n_test=0, seed=1, num_states=6)
    ids = [f"{i:06d}" for i in range(60)]
    rows, sources = [], []
    for k, sid in enumerate(ids):
        data = [view_path(root, sid, v).read_bytes() for v in contract.VIEWS]
        rows.append(dedup.pack_sample([hash_file(d) for d in data]))
        if k < 20:  # copies of the first 20, one kind per sample (every kind 4 times)
            kind = KINDS[k % len(KINDS)]
            rows.append(
                dedup.pack_sample([hash_file(copy_bytes(Image.open(io.BytesIO(d)), kind)) for d in data])
            )
            sources.append(len(rows) - 2)
    codes, present = dedup.hash_matrix(rows)
    i, j, bits, views = dedup.near_pairs(codes, present, np.ones(len(rows), bool))
    assert sorted(zip(i.tolist(), j.tolist())) == [(s, s + 1) for s in sources]  # the copies, nothing else
    assert (bits / views).max() <= dedup.DEFAULT_THRESHOLD
    # the margin on the other side: distinct samples differ in far more bits than the threshold
    originals = [r for r in range(len(rows)) if r - 1 not in sources]
    x = np.bitwise_count(codes[originals][:, None] ^ codes[originals][None]).sum((-1, -2)) / 4  # (n, n)
    assert x[~np.eye(len(originals), dtype=bool)].min() > dedup.DEFAULT_THRESHOLD


def test_view_hash_reads_any_mode_and_is_1024_bits(tmp_path):
    root = generate_dataset(tmp_path / "data", n_train=2, n_test=0, seed=0, num_states=1, image_size=64)
    for kind in ("grayscale", "cmyk", "png"):
        path = corrupt_view(root, "000000", "north", kind)
        problem, code = shard_check.inspect_view(str(path), "north", hashing=True)
        assert problem is None and len(code) == dedup.VIEW_BYTES == 128


# ---------------------------------------------------------------- shard_dataset --dedup


def plant(root: Path, source: str, target: str, kind: str) -> None:
    """``target``'s four views become copies of ``source``'s (its labels and id stay its own)."""
    for view in contract.VIEWS:
        data = copy_bytes(Image.open(view_path(root, source, view)), kind)
        view_path(root, target, view).write_bytes(data)


def split_of(out: Path) -> dict[str, str]:
    table = pd.read_csv(out / "labels.csv", dtype={"sample_id": str})
    return dict(zip(table["sample_id"], table["split"]))


def shard_ids(out: Path, split: str) -> set[str]:
    ids = set()
    for shard in out.glob(f"{split}-*.tar"):
        with tarfile.open(shard) as tar:
            ids |= {
                json.loads(tar.extractfile(m).read())["sample_id"] for m in tar if m.name.endswith(".json")
            }
    return ids


KW = {"val_fraction": 0.2, "samples_per_shard": 8, "progress": False}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A generated root (40 train, 10 test, 256 px) with planted copies, and the expected pairs:
    test 000040 <- train 000001 (q70), test 000041 <- train 000002 (kept at 240 px, one view then
    unreadable), a train sample <- a val sample (r240), a train sample <- another train sample (q90)."""
    tmp = tmp_path_factory.mktemp("dedup")
    root = generate_dataset(tmp / "data", n_train=40, n_test=10, seed=0, num_states=5)
    shard_dataset(root, tmp / "probe", dedup="off", **KW)  # which ids the split puts in val
    split = split_of(tmp / "probe")
    val = sorted(s for s, v in split.items() if v == "val")
    train = sorted(s for s, v in split.items() if v == "train" and s not in ("000001", "000002"))
    plant(root, "000001", "000040", "q70")
    plant(root, "000002", "000041", "k240")
    corrupt_view(root, "000041", "west", "garbage")
    plant(root, val[0], train[0], "r240")
    plant(root, train[1], train[2], "q90")
    expected = {
        ("train_test", "000001", "000040"),
        ("train_test", "000002", "000041"),
        ("train_val", train[0], val[0]),
        ("train_train", train[1], train[2]),
    }
    return root, tmp, expected, {"dropped": {"000001", "000002", train[0]}, "val": val[0]}


def test_report_counts_and_lists_the_planted_pairs_and_changes_no_shard(planted, tmp_path, capsys):
    root, _, expected, _ = planted
    manifest = shard_dataset(root, tmp_path / "report", **KW)
    near = manifest["near_duplicates"]
    assert {(e["kind"], e["train"], e["other"]) for e in near["pairs"]} == expected
    assert (near["train_test"], near["train_val"], near["train_train"]) == (2, 1, 1)
    assert (near["mode"], near["threshold"], near["dropped"], near["not_compared"]) == ("report", 128, 0, 0)
    assert all(e["bits_per_view"] <= 128 for e in near["pairs"])
    assert {e["other"]: e["views"] for e in near["pairs"]}["000041"] == 3  # its west view is unreadable
    out = capsys.readouterr().out
    assert "near-duplicates (--dedup report, threshold 128): train-test 2, train-val 1, train-train 1" in out
    assert "  000001 (train) ~ 000040 (test): " in out
    assert manifest["skipped"] == []
    off = shard_dataset(root, tmp_path / "off", dedup="off", **KW)
    assert off["splits"] == manifest["splits"]  # report mode writes the same shards
    tars = sorted(p.name for p in (tmp_path / "off").glob("*.tar"))
    assert all((tmp_path / "off" / n).read_bytes() == (tmp_path / "report" / n).read_bytes() for n in tars)
    assert ShardSet.open(tmp_path / "report").count("test") == 10  # the trainer and infer read it


def test_drop_removes_the_train_copies_and_never_a_val_or_test_sample(planted, tmp_path, capsys):
    root, tmp, _, want = planted
    manifest = shard_dataset(root, tmp_path / "drop", dedup="drop", **KW)
    codes = {e["sample_id"]: e["reason"].split(":")[0] for e in manifest["skipped"]}
    assert codes == {
        "000001": "duplicate_of_test",
        "000002": "duplicate_of_test",
        min(want["dropped"] - {"000001", "000002"}): "duplicate_of_val",
    }
    assert all(e["split"] == "train" for e in manifest["skipped"])
    assert "near-duplicate of test sample '000040'" in next(
        e["reason"] for e in manifest["skipped"] if e["sample_id"] == "000001"
    )
    off = json.loads((tmp / "probe" / "manifest.json").read_text())
    counts = {s: manifest["splits"][s]["count"] for s in ("train", "val", "test")}
    assert counts == {
        "train": off["splits"]["train"]["count"] - 3,
        "val": off["splits"]["val"]["count"],
        "test": 10,
    }
    out = tmp_path / "drop"
    assert not shard_ids(out, "train") & want["dropped"] and want["val"] in shard_ids(out, "val")
    assert len(shard_ids(out, "test")) == 10
    assert not set(split_of(out)) & want["dropped"]
    assert manifest["near_duplicates"]["dropped"] == 3 and manifest["near_duplicates"]["train_train"] == 1
    printed = capsys.readouterr().out
    assert "3 skipped: duplicate_of_test 2, duplicate_of_val 1" in printed


def test_off_hashes_nothing(planted, tmp_path, monkeypatch, capsys):
    root, *_ = planted
    monkeypatch.setattr(shard_check, "view_hash", lambda img: pytest.fail("hashed with --dedup off"))
    manifest = shard_dataset(root, tmp_path / "off", dedup="off", workers=1, **KW)
    assert manifest["near_duplicates"] == {"mode": "off"} and manifest["skipped"] == []
    assert "near-duplicates" not in capsys.readouterr().out


def test_output_is_byte_identical_for_one_and_two_workers_with_dedup(planted, tmp_path):
    root, *_ = planted
    for mode in ("drop", "report"):
        one = shard_dataset(root, tmp_path / f"{mode}1", dedup=mode, workers=1, **KW)
        two = shard_dataset(root, tmp_path / f"{mode}2", dedup=mode, workers=2, **KW)
        assert one == two and one["near_duplicates"]["train_test"] == 2
        files = sorted(p.name for p in (tmp_path / f"{mode}1").iterdir())
        assert files == sorted(p.name for p in (tmp_path / f"{mode}2").iterdir())
        for name in files:
            assert (tmp_path / f"{mode}1" / name).read_bytes() == (tmp_path / f"{mode}2" / name).read_bytes()


def test_a_higher_threshold_finds_at_least_the_same_pairs_and_zero_only_exact_copies(planted, tmp_path):
    root, *_ = planted
    pairs = {
        t: {
            (e["train"], e["other"])
            for e in shard_dataset(root, tmp_path / str(t), dedup_threshold=t, **KW)["near_duplicates"][
                "pairs"
            ]
        }
        for t in (0, 60, 128)
    }
    assert pairs[0] == set() and pairs[60] <= pairs[128] and len(pairs[128]) == 4


# ---------------------------------------------------------------- drop rules and the CLI


def sample(sid, state):
    return Sample(sid, "train", (None,) * 4, state, 0.0, 0.0)


def test_drop_never_removes_a_states_last_training_sample():
    train = [sample("a", 1), sample("b", 2), sample("c", 2)]
    pairs = [
        {"kind": "train_test", "train": t, "other": f"t{t}", "bits_per_view": 10.0, "views": 4}
        for t in ("a", "b", "c")
    ]
    kept, skipped, kept_last = duplicates.drop_duplicates(train, pairs)
    assert [e["sample_id"] for e in skipped] == ["b"]
    assert [s.sample_id for s in kept] == ["a", "c"] and kept_last == ["a", "c"]
    lines = duplicates.summary_lines(
        {
            "mode": "drop",
            "threshold": 128,
            "train_test": 3,
            "train_val": 0,
            "train_train": 0,
            "pairs": pairs,
            "kept_last_of_state": kept_last,
        }
    )
    assert lines[-1] == "  kept (last training sample of their state): ['a', 'c']"


def test_a_test_sample_with_fewer_than_two_readable_views_is_counted_as_not_compared():
    test = [
        Sample(f"t{k}", "test", (None,) * 4, missing_views=contract.VIEWS[:k]) for k in range(5)
    ]  # 0..4 views missing
    assert duplicates.not_compared({"train": [sample("a", 1)], "val": [], "test": test}) == 2


def test_a_train_sample_copying_both_a_test_and_a_val_sample_is_dropped_as_a_test_duplicate():
    pairs = [
        {"kind": "train_test", "train": "x", "other": "t", "bits_per_view": 3.0, "views": 4},
        {"kind": "train_val", "train": "x", "other": "v", "bits_per_view": 1.0, "views": 4},
    ]
    assert duplicates.drop_reasons(pairs)["x"].startswith(
        "duplicate_of_test: near-duplicate of test sample 't'"
    )


def run_cli(*args):
    return subprocess.run(
        [sys.executable, str(REPO / "shard_dataset.py"), *args],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def test_cli_dedup_flags(tmp_path):
    result = run_cli("--help")
    assert "--dedup {report,drop,off}" in result.stdout and "--dedup-threshold" in result.stdout
    for bad in (("--dedup", "maybe"), ("--dedup-threshold", "2000"), ("--dedup-threshold", "-1")):
        result = run_cli("--data-root", str(tmp_path), "--out", str(tmp_path / "o"), *bad)
        assert result.returncode == 2 and "dedup" in result.stderr
