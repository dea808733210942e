"""Tests for geoloc.data: shard specs, decoding, each stage, train/eval loaders, and two real gloo ranks.

Shards are written here with the stdlib ``tarfile`` in the ARCHITECTURE.md format, so that odd shard
counts, uneven shard sizes, missing views and corrupt members are easy to make.
"""

import io
import json
import logging
import math
import os
import re
import struct
import subprocess
import sys
import tarfile
from collections import Counter
from functools import partial
from itertools import chain
from pathlib import Path

import pandas as pd
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from geoloc import data as D
from geoloc.contract import VIEWS, sample_key
from geoloc.labels import LabelEncoder

STATES = (3, 17, 42)  # non-consecutive original indices
ENCODER = LabelEncoder.fit(STATES)
ROOT = Path(__file__).resolve().parents[1]


def jpeg(color=(200, 30, 60), size=256, mode="RGB", fmt="JPEG") -> bytes:
    img = Image.new("RGB", (size, size), color)
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, quality=95)
    return buf.getvalue()


def make_sample(i: int, labelled=True, views=VIEWS, image=None) -> dict:
    """One sample's members: ``{suffix: bytes}`` as the sharder writes them."""
    sid = f"img_{i:06d}"
    meta = {
        "sample_id": sid,
        "state_idx": STATES[i % len(STATES)] if labelled else None,
        "lat": 30.0 + i / 100 if labelled else None,
        "lon": -100.0 + i / 100 if labelled else None,
        "missing_views": [v for v in VIEWS if v not in views],
    }
    members = {f"{v}.jpg": image or jpeg((i % 256, 10 * k, 100)) for k, v in enumerate(views)}
    members["json"] = json.dumps(meta).encode()
    return {"__key__": sample_key(sid), **members}


def write_tar(path: Path, samples: list[dict]) -> Path:
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for suffix, data in s.items():
                if suffix.startswith("__"):
                    continue
                info = tarfile.TarInfo(f"{s['__key__']}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def write_shards(folder: Path, split: str, sizes: list[int], start=0, labelled=True) -> list[str]:
    """``folder/{split}-NNNNNN.tar`` with ``sizes[k]`` samples in shard k; sample ids run from ``start``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, i = [], start
    for k, n in enumerate(sizes):
        samples = [make_sample(j, labelled) for j in range(i, i + n)]
        paths.append(str(write_tar(folder / f"{split}-{k:06d}.tar", samples)))
        i += n
    return paths


def write_manifest(folder: Path, sizes: dict[str, list[int]]) -> dict:
    """A valid manifest.json for shards written by :func:`write_shards` with these sizes per split."""
    splits = {
        split: {"count": sum(n), "shards": {f"{split}-{k:06d}.tar": c for k, c in enumerate(n)}}
        for split, n in sizes.items()
    }
    manifest = {"version": 1, "splits": splits, "label_encoder": ENCODER.to_dict()}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def ids_of(batches) -> list[str]:
    return [sid for b in batches for sid in b["sample_id"]]


def run_stages(stages, num_workers=0):
    """Run a stage list as the Loader does (DataLoader workers when num_workers > 0)."""
    return list(DataLoader(wds.DataPipeline(stages), batch_size=None, num_workers=num_workers))


# ----------------------------------------------------------------------------- shard specs


def test_resolve_directory_sorted_and_split_filtered(tmp_path):
    train = write_shards(tmp_path, "train", [1, 1, 1])
    write_shards(tmp_path, "val", [1])
    assert D.resolve_shards(str(tmp_path), "train") == sorted(train)
    assert len(D.resolve_shards(tmp_path, "val")) == 1


def test_resolve_directory_without_split_names_both(tmp_path):
    write_shards(tmp_path, "train", [1])
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}.*test-\*\.tar"):
        D.resolve_shards(str(tmp_path), "test")


def test_resolve_brace_pattern_and_missing_file(tmp_path):
    train = write_shards(tmp_path, "train", [1, 1, 1])
    assert D.resolve_shards(f"{tmp_path}/train-{{000000..000002}}.tar", "train") == train
    with pytest.raises(FileNotFoundError, match="train-000003.tar"):
        D.resolve_shards(f"{tmp_path}/train-{{000000..000003}}.tar", "train")


def test_resolve_urls_and_lists_pass_through():
    assert D.resolve_shards("pipe:cat /data/a.tar", "train") == ["pipe:cat /data/a.tar"]
    assert D.resolve_shards("https://h/x/train-{0..2}.tar", "train") == [
        f"https://h/x/train-{i}.tar" for i in range(3)
    ]
    assert D.resolve_shards(["s3://b/a.tar", "/x/b.tar"], "train") == ["s3://b/a.tar", "/x/b.tar"]


def test_read_manifest(tmp_path):
    write_shards(tmp_path, "train", [1, 1])
    assert D.read_manifest(str(tmp_path)) is None
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 1}))
    assert D.read_manifest(str(tmp_path)) == {"version": 1}
    assert D.read_manifest(f"{tmp_path}/train-{{000000..000001}}.tar") == {"version": 1}
    assert D.read_manifest([f"{tmp_path}/train-000000.tar"]) == {"version": 1}
    assert D.read_manifest("https://h/train-{0..2}.tar") is None


# ----------------------------------------------------------------------------- decoding


def test_decode_rgb_jpeg():
    img = D.decode_image(jpeg((200, 30, 60)))
    assert img.shape == (3, 256, 256) and img.dtype == torch.uint8
    assert torch.allclose(img.float().mean((1, 2)), torch.tensor([200.0, 30.0, 60.0]), atol=3)


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_decode_other_modes_become_rgb(mode):
    img = D.decode_image(jpeg((120, 120, 120), mode=mode))
    assert img.shape == (3, 256, 256)
    assert torch.allclose(img.float().mean((1, 2)), torch.full((3,), 120.0), atol=4)


def test_decode_png_bytes_and_resize():
    png = D.decode_image(jpeg((10, 20, 30), size=100, fmt="PNG"))
    assert png.shape == (3, 256, 256)
    assert png[:, 128, 128].tolist() == [10, 20, 30]  # PNG is lossless, resize of a constant is exact


def test_decode_garbage_raises_clear_error():
    with pytest.raises(D.ImageDecodeError, match="cannot decode image"):
        D.decode_image(b"not a jpeg at all")


def dds_with_unknown_pixel_format() -> bytes:
    """A DDS whose pixel-format flags (bytes 80..83) are unknown: PIL raises NotImplementedError."""
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "DDS")
    data = bytearray(buf.getvalue())
    data[80:84] = struct.pack("<I", 128)
    return bytes(data)


def test_decode_non_oserror_from_pil_becomes_decode_error():
    with pytest.raises(D.ImageDecodeError, match="cannot decode image .*NotImplementedError"):
        D.decode_image(dds_with_unknown_pixel_format())


def test_decode_any_pil_exception_names_the_view(monkeypatch, caplog):
    def broken_open(_):
        raise struct.error("unpack requires a buffer of 4 bytes")

    s = make_sample(7)
    monkeypatch.setattr(Image, "open", broken_open)
    stats = D.LoadStats()
    with caplog.at_level(logging.WARNING, logger="geoloc.data"):
        out = D.decode_sample(s, ENCODER, stats)
    assert out["view_mask"].tolist() == [False] * 4 and stats.as_dict()["bad_views"] == 4
    assert re.search(r"img_000007 view west .*struct\.error: unpack requires", caplog.text)


def test_decode_sample_full():
    s = make_sample(4)
    out = D.decode_sample(s, ENCODER)
    assert out["images"].shape == (4, 3, 256, 256) and out["images"].dtype == torch.uint8
    assert out["view_mask"].tolist() == [True] * 4
    assert out["label"] == ENCODER.encode([STATES[4 % 3]])[0] == 1
    assert out["latlon"].tolist() == pytest.approx([30.04, -99.96])
    assert out["sample_id"] == "img_000004"
    # views keep the contract order north, east, south, west (green channel encodes the view index)
    greens = out["images"][:, 1].float().mean((1, 2))
    assert torch.allclose(greens, torch.tensor([0.0, 10.0, 20.0, 30.0]), atol=3)


def test_decode_sample_missing_and_bad_views_are_masked_and_counted():
    stats = D.LoadStats()
    s = make_sample(0, views=("north", "south", "west"))
    s["west.jpg"] = b"\xff\xd8 truncated"
    out = D.decode_sample(s, ENCODER, stats)
    assert out["view_mask"].tolist() == [True, False, True, False]
    assert out["images"][1].sum() == 0 and out["images"][3].sum() == 0
    assert out["images"][0].sum() > 0
    counts = stats.as_dict()
    assert (counts["missing_views"], counts["bad_views"], counts["samples"]) == (1, 1, 1)


def test_decode_sample_unlabelled():
    out = D.decode_sample(make_sample(1, labelled=False))
    assert out["label"] == -1 and torch.isnan(out["latlon"]).all()


def test_decode_sample_errors_name_the_sample():
    with pytest.raises(ValueError, match="img_000002.*no label encoder"):
        D.decode_sample(make_sample(2))
    bad = make_sample(2)
    bad["json"] = json.dumps({"sample_id": "x", "state_idx": 5, "lat": 1, "lon": 2}).encode()
    with pytest.raises(KeyError, match="img_000002.*state index 5"):
        D.decode_sample(bad, ENCODER)


def test_collate_matches_the_batch_contract():
    batch = D.collate([D.decode_sample(make_sample(i), ENCODER) for i in range(3)])
    assert batch["images"].shape == (3, 4, 3, 256, 256) and batch["images"].dtype == torch.uint8
    assert batch["view_mask"].shape == (3, 4) and batch["view_mask"].dtype == torch.bool
    assert batch["label"].dtype == torch.int64 and batch["label"].tolist() == [0, 1, 2]
    assert batch["latlon"].shape == (3, 2) and batch["latlon"].dtype == torch.float32
    assert batch["sample_id"] == ["img_000000", "img_000001", "img_000002"]
    planar = [D.decode_image(make_sample(i)[f"{v}.jpg"]) for i in range(3) for v in VIEWS]
    assert torch.equal(batch["images"].flatten(0, 1), torch.stack(planar))  # same pixels as decode_image


def test_collate_accepts_contiguous_images():
    """A raw-folder Dataset may build planar (4, 3, H, W) images itself."""
    samples = [D.decode_sample(make_sample(i), ENCODER) for i in range(2)]
    planar = [dict(s, images=s["images"].contiguous()) for s in samples]
    assert torch.equal(D.collate(planar)["images"], D.collate(samples)["images"])


def _collated_in_shared_memory(_):
    yield D.collate([D.decode_sample(make_sample(0), ENCODER)])["images"].is_shared()


def test_collate_allocates_in_shared_memory_only_in_workers():
    assert not D.collate([D.decode_sample(make_sample(0), ENCODER)])["images"].is_shared()
    assert run_stages([partial(D.shard_list, ["x"]), _collated_in_shared_memory], num_workers=1) == [True]


# ----------------------------------------------------------------------------- stages


def test_shuffle_shards_depends_on_seed_and_epoch_only():
    urls = [f"s{i}" for i in range(20)]
    e0 = list(D.shuffle_shards(iter(urls), seed=1, epoch=0))
    assert sorted(e0) == sorted(urls) and e0 != urls
    assert e0 == list(D.shuffle_shards(iter(urls), seed=1, epoch=0))
    assert e0 != list(D.shuffle_shards(iter(urls), seed=1, epoch=1))
    assert e0 != list(D.shuffle_shards(iter(urls), seed=2, epoch=0))


def test_split_by_rank_partitions():
    urls = [f"s{i}" for i in range(7)]
    parts = [list(D.split_by_rank(iter(urls), rank=r, world_size=3)) for r in range(3)]
    assert sorted(chain(*parts)) == sorted(urls)
    assert [len(p) for p in parts] == [3, 2, 2]


def test_split_by_worker_partitions_between_workers():
    urls = [f"s{i}" for i in range(5)]
    assert list(D.split_by_worker(iter(urls))) == urls  # main process: everything
    got = run_stages([partial(D.shard_list, urls), D.split_by_worker], num_workers=2)
    assert sorted(got) == urls
    assert got[:2] == ["s0", "s1"]  # worker 0 takes s0, worker 1 takes s1 (round robin)


def test_read_tars_counts_corrupt_shard_and_continues(tmp_path):
    good = write_shards(tmp_path, "train", [3, 2])
    bad = tmp_path / "train-000009.tar"
    raw = Path(write_tar(bad, [make_sample(i) for i in range(100, 104)])).read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])  # truncated mid-member
    stats = D.LoadStats()
    samples = list(D.read_tars(iter([good[0], str(bad), good[1]]), stats))
    keys = [s["__key__"] for s in samples]
    assert [k for k in keys if k < "img_000100"] == [f"img_{i:06d}" for i in range(5)]
    assert stats.as_dict()["tar_errors"] >= 1
    assert set(samples[0]) >= {"json", "north.jpg", "east.jpg", "south.jpg", "west.jpg"}


def test_read_tars_repeat_loops_and_ends_with_a_warning_on_unreadable(tmp_path, caplog):
    shards = write_shards(tmp_path, "train", [2])
    stream = D.read_tars(iter(shards), D.LoadStats(), repeat=True)
    keys = [next(stream)["__key__"] for _ in range(5)]
    assert keys == ["img_000000", "img_000001"] * 2 + ["img_000000"]
    empty = str(write_tar(tmp_path / "empty.tar", []))
    with caplog.at_level(logging.WARNING, logger="geoloc.data"):
        assert list(D.read_tars(iter([empty, str(tmp_path / "nope.tar")]), D.LoadStats(), repeat=True)) == []
    assert "no readable sample in a full pass" in caplog.text and "empty.tar" in caplog.text


def test_shuffle_samples_is_a_seeded_permutation():
    items = list(range(50))
    a = list(D.shuffle_samples(iter(items), bufsize=10, seed=0, epoch=0, rank=0))
    assert sorted(a) == items and a != items
    assert a == list(D.shuffle_samples(iter(items), bufsize=10, seed=0, epoch=0, rank=0))
    assert a != list(D.shuffle_samples(iter(items), bufsize=10, seed=0, epoch=1, rank=0))
    assert a != list(D.shuffle_samples(iter(items), bufsize=10, seed=0, epoch=0, rank=1))
    assert list(D.shuffle_samples(iter(items), bufsize=0, seed=0, epoch=0, rank=0)) == items


def test_decode_stage_and_to_batch():
    stats = D.LoadStats()
    decoded = D.decode((make_sample(i) for i in range(5)), ENCODER, stats)
    full = list(D.to_batch(decoded, batch_size=2, partial_last=False))
    assert [len(b["sample_id"]) for b in full] == [2, 2]
    assert stats.as_dict()["samples"] == 5
    decoded = D.decode((make_sample(i) for i in range(5)), ENCODER, stats)
    assert [len(b["sample_id"]) for b in D.to_batch(decoded, 2, partial_last=True)] == [2, 2, 1]


def test_stage_lists_are_declared_in_order():
    kw = {"batch_size": 2, "rank": 0, "world_size": 1, "encoder": ENCODER, "stats": D.LoadStats()}
    train = D.train_stages(["a"], epoch=0, seed=0, shuffle_buffer=4, **kw)
    names = [getattr(s, "func", s).__name__ for s in train]
    assert names == [
        "shard_list", "shuffle_shards", "split_by_rank", "split_by_worker",
        "read_tars", "shuffle_samples", "decode", "to_batch",
    ]  # fmt: skip
    names = [getattr(s, "func", s).__name__ for s in D.eval_stages(["a"], **kw)]
    assert names == ["shard_list", "split_by_rank", "split_by_worker", "read_tars", "decode", "to_batch"]


# ----------------------------------------------------------------------------- loaders


def train_loader(shards, **kw):
    args = {"batch_size": 3, "num_samples": 17, "epoch": 0, "seed": 0, "world_size": 1, "num_workers": 0}
    return D.make_train_loader(shards, shuffle_buffer=8, encoder=ENCODER, **{"rank": 0, **args, **kw})


def test_train_loader_full_batches_and_len(tmp_path):
    shards = write_shards(tmp_path, "train", [5, 2, 7, 3])  # 17 samples, uneven shards
    loader = train_loader(shards, num_workers=2)
    batches = list(loader)
    assert len(loader) == 17 // 3 == len(batches)
    assert all(b["images"].shape == (3, 4, 3, 256, 256) for b in batches)
    assert all(b["label"].min() >= 0 for b in batches)


def test_train_loader_is_deterministic_and_changes_with_epoch(tmp_path):
    shards = write_shards(tmp_path, "train", [5, 2, 7, 3])
    first = ids_of(train_loader(shards, num_workers=2))
    assert first == ids_of(train_loader(shards, num_workers=2))
    assert first != ids_of(train_loader(shards, num_workers=2, epoch=1))
    assert len(set(first)) > 10  # a shuffle of many samples, not one repeated shard


def test_train_loader_equal_batches_per_rank_with_uneven_shards(tmp_path):
    shards = write_shards(tmp_path, "train", [1, 9, 1])  # rank 0 gets 2 shards, rank 1 gets 1
    counts = [len(list(train_loader(shards, rank=r, world_size=2, num_samples=11))) for r in range(2)]
    assert counts == [11 // 6] * 2


def test_train_loader_errors(tmp_path):
    shards = write_shards(tmp_path, "train", [2])
    with pytest.raises(ValueError, match="no full batch"):
        train_loader(shards, num_samples=2)
    with pytest.raises(ValueError, match="rank 1 has none"):
        train_loader(shards, rank=1, world_size=2, num_samples=12)


def test_train_loader_caps_workers_to_rank_shards(tmp_path):
    shards = write_shards(tmp_path, "train", [4, 4, 4])
    assert train_loader(shards, world_size=2, rank=1, num_workers=4).num_workers == 1
    assert train_loader(shards, num_workers=8).num_workers == 3


def test_worker_with_only_empty_shards_ends_and_the_others_fill_the_epoch(tmp_path):
    shards = write_shards(tmp_path, "train", [0, 6])  # 2 workers: one of them gets only the empty shard
    loader = train_loader(shards, num_samples=6, num_workers=2)
    assert loader.num_workers == 2
    batches = list(loader)
    assert len(batches) == 2 and set(ids_of(batches)) <= {f"img_{i:06d}" for i in range(6)}


def test_rank_without_a_readable_sample_raises_naming_its_shards(tmp_path):
    shards = write_shards(tmp_path, "train", [0, 0])
    with pytest.raises(RuntimeError, match="ran dry after 0 of 2 batches") as err:
        list(train_loader(shards, num_samples=6, num_workers=2))
    assert all(shard in str(err.value) for shard in shards)


def test_train_loader_drops_shards_the_manifest_counts_empty(tmp_path, caplog):
    shards = write_shards(tmp_path, "train", [0, 6, 0])
    counts = {"train-000000.tar": 0, "train-000001.tar": 6, "train-000002.tar": 0}
    with caplog.at_level(logging.WARNING, logger="geoloc.data"):
        loader = train_loader(shards, num_samples=6, num_workers=2, shard_counts=counts)
    assert loader.shards == [shards[1]] and loader.num_workers == 1
    assert "2 train shard(s) with 0 samples" in caplog.text and "train-000002.tar" in caplog.text
    assert len(list(loader)) == 2
    unknown = train_loader(shards, num_samples=6, num_workers=2, shard_counts={"other.tar": 0})
    assert sorted(unknown.shards) == shards  # names the manifest does not know are kept
    with pytest.raises(ValueError, match="rank 0 has none"):
        train_loader(shards, num_samples=6, shard_counts=dict.fromkeys(counts, 0))


def test_uneven_shards_per_worker_warn_with_a_samples_per_shard_that_fixes_it(tmp_path, caplog):
    shards = write_shards(tmp_path, "train", [4, 4, 4])
    with caplog.at_level(logging.WARNING, logger="geoloc.data"):
        train_loader(shards, num_samples=12, num_workers=2)
    assert "rank 0: 3 train shards for 2 DataLoader workers, not a multiple" in caplog.text
    per_shard = int(re.search(r"--samples-per-shard (\d+) for 12 samples", caplog.text).group(1))
    assert math.ceil(12 / per_shard) % 2 == 0
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="geoloc.data"):
        train_loader(shards, num_samples=12, num_workers=3)
        train_loader(shards, num_samples=12, num_workers=0)  # the main process reads all 3
        train_loader(shards[:2], num_samples=8, num_workers=2)
    assert "not a multiple" not in caplog.text


@pytest.mark.parametrize("num_samples", [17, 100, 1001, 123_457])
@pytest.mark.parametrize("parts", [1, 2, 3, 8, 16])
def test_suggest_samples_per_shard_gives_the_fewest_shards_that_are_a_multiple(num_samples, parts):
    counts = {s: math.ceil(num_samples / s) for s in range(1, num_samples + 1)}  # the sharder's count
    fits = {s: c for s, c in counts.items() if c % parts == 0 and c >= 5}
    per_shard = D.suggest_samples_per_shard(num_samples, num_shards=5, parts=parts)
    if not fits:
        assert per_shard is None
    else:
        assert per_shard in fits and fits[per_shard] == min(fits.values())


def test_suggest_samples_per_shard_none_when_too_few_samples():
    assert D.suggest_samples_per_shard(3, num_shards=1, parts=4) is None


@pytest.mark.parametrize(
    ("make", "kw"),
    [(D.make_train_loader, {"num_samples": 4, "epoch": 0, "seed": 0}), (D.make_eval_loader, {})],
)
@pytest.mark.parametrize("spec", ["/some/dir", Path("/some/dir")])
def test_loaders_refuse_one_string_or_path(make, kw, spec):
    with pytest.raises(TypeError, match=r"'/some/dir'.*pass resolve_shards\(spec, split\)"):
        make(spec, batch_size=2, **kw)


def test_pin_memory_reaches_the_dataloader(tmp_path):
    shards = write_shards(tmp_path, "train", [4])
    for pin in (True, False):
        assert train_loader(shards, num_samples=4, pin_memory=pin).dataloader().pin_memory is pin
        assert D.make_eval_loader(shards, batch_size=2, pin_memory=pin).dataloader().pin_memory is pin
    default = train_loader(shards, num_samples=4).dataloader().pin_memory
    assert default is torch.cuda.is_available()


def test_pinning_keeps_the_batch_dict(monkeypatch):
    """torch's pin step (no CUDA here: Tensor.pin_memory records) pins every tensor, keeps ids and strides."""
    pinned = []

    def fake_pin(t, device=None):
        pinned.append(t)
        return t.clone(memory_format=torch.preserve_format)

    batch = D.collate([D.decode_sample(make_sample(i), ENCODER) for i in range(2)])
    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    out = torch.utils.data._utils.pin_memory.pin_memory(batch)
    assert out["sample_id"] == ["img_000000", "img_000001"]
    assert len(pinned) == 4 and all(
        out[k] is not batch[k] for k in ("images", "view_mask", "label", "latlon")
    )
    assert out["images"].stride() == batch["images"].stride()  # still channels-last


def test_eval_loader_every_sample_once_across_ranks_and_workers(tmp_path):
    shards = write_shards(tmp_path, "val", [4, 1, 6, 2, 3], labelled=False)  # 16 samples, 5 shards
    for world_size in (1, 2, 3):
        seen = Counter()
        for rank in range(world_size):
            loader = D.make_eval_loader(shards, batch_size=4, rank=rank, world_size=world_size, num_workers=2)
            seen.update(ids_of(loader))
        assert seen == Counter(f"img_{i:06d}" for i in range(16)), world_size


def test_eval_loader_short_last_batch_and_empty_rank(tmp_path):
    shards = write_shards(tmp_path, "val", [5])
    sizes = [len(b["sample_id"]) for b in D.make_eval_loader(shards, batch_size=2, encoder=ENCODER)]
    assert sizes == [2, 2, 1]
    assert list(D.make_eval_loader(shards, batch_size=2, rank=1, world_size=2, encoder=ENCODER)) == []


def test_loader_stats_count_errors_from_workers(tmp_path):
    write_shards(tmp_path, "val", [2, 2])
    broken = make_sample(50)
    broken["east.jpg"] = b"garbage"
    write_tar(tmp_path / "val-000002.tar", [broken])
    loader = D.make_eval_loader(
        D.resolve_shards(tmp_path, "val"), batch_size=8, num_workers=2, encoder=ENCODER
    )
    batches = list(loader)
    assert len(ids_of(batches)) == 5  # the sample with a bad view is kept
    assert loader.stats.as_dict() == {"samples": 5, "tar_errors": 0, "missing_views": 0, "bad_views": 1,
                                      "incomplete_samples": 0, "short_shards": 0}  # fmt: skip


def test_loader_on_generated_shards(tiny_shards):
    manifest = D.read_manifest(str(tiny_shards))
    encoder = LabelEncoder.from_dict(manifest["label_encoder"])
    val = D.resolve_shards(str(tiny_shards), "val")
    ids = ids_of(D.make_eval_loader(val, batch_size=5, num_workers=2, encoder=encoder))
    assert len(ids) == len(set(ids)) == manifest["splits"]["val"]["count"]
    n_train = manifest["splits"]["train"]["count"]
    train = D.make_train_loader(
        D.resolve_shards(str(tiny_shards), "train"), batch_size=4, num_samples=n_train, epoch=0, seed=0,
        num_workers=2, shuffle_buffer=16, encoder=encoder,
    )  # fmt: skip
    batches = list(train)
    assert len(batches) == n_train // 4
    assert all(((b["label"] >= 0) & (b["label"] < encoder.num_classes)).all() for b in batches)


# ----------------------------------------------------------------------------- two real ranks


def test_two_gloo_ranks_odd_uneven_shards(tmp_path):
    """torchrun, 2 processes: val seen exactly once across ranks, equal train batches over 2 epochs."""
    shards = tmp_path / "shards"
    write_shards(shards, "train", [7, 1, 4, 9, 2])  # 23 samples, odd shard count, uneven sizes
    write_shards(shards, "val", [5, 1, 3], start=1000)  # 9 samples, 3 shards
    write_manifest(shards, {"train": [7, 1, 4, 9, 2], "val": [5, 1, 3]})
    out = tmp_path / "out"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(ROOT / "tests/_loader_worker.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*cmd, "--shards", str(shards), "--out", str(out), "--batch-size", "3", "--epochs", "2"],
        check=False, capture_output=True, text=True, timeout=240, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    val = Counter(ranks[0]["val_ids"] + ranks[1]["val_ids"])
    assert val == Counter(f"img_{i:06d}" for i in range(1000, 1009))
    for epoch in range(2):
        counts = [len(r["train_ids"][epoch]) for r in ranks]
        assert counts == [23 // 6 * 3] * 2, epoch  # 3 full batches of 3 on each rank
    shard_of = {f"img_{i:06d}": k for k, (lo, hi) in enumerate([(0, 7), (7, 8), (8, 12), (12, 21), (21, 23)])
                for i in range(lo, hi)}  # fmt: skip
    for epoch in range(2):  # no shard is read by both ranks
        read = [{shard_of[i] for i in r["train_ids"][epoch]} for r in ranks]
        assert not read[0] & read[1], epoch
    assert ranks[0]["shard_order"][0] != ranks[0]["shard_order"][1]  # reshuffled per epoch
    assert ranks[0]["train_ids"][0] != ranks[0]["train_ids"][1]


def test_generated_odd_views_end_to_end(tmp_path):
    """Grayscale, CMYK and PNG-in-.jpg views decode; an unreadable test view is masked, the sample kept."""
    from geoloc.sharding import shard_dataset
    from geoloc.synth import corrupt_view, generate_dataset

    root = generate_dataset(tmp_path / "data", n_train=6, n_test=4, seed=1)
    test_ids = list(pd.read_csv(root / "sample_submission.csv", dtype={"sample_id": str})["sample_id"])
    for sid, view, kind in zip(test_ids, VIEWS, ("grayscale", "cmyk", "png", "garbage")):
        corrupt_view(root, sid, view, kind)
    shard_dataset(root, tmp_path / "shards", val_fraction=0.2, seed=0, samples_per_shard=3, workers=1)
    loader = D.make_eval_loader(D.resolve_shards(str(tmp_path / "shards"), "test"), batch_size=8)
    batch = D.collate([s for b in loader for s in unbatch(b)])
    masks = dict(zip(batch["sample_id"], batch["view_mask"].tolist()))
    assert sorted(masks) == sorted(test_ids)
    assert masks[test_ids[3]] == [True, True, True, False]  # its west view was garbage
    assert all(all(masks[sid]) for sid in test_ids[:3])
    assert (batch["label"] == -1).all() and torch.isnan(batch["latlon"]).all()


def unbatch(batch: dict) -> list[dict]:
    keys = ("images", "view_mask", "label", "latlon", "sample_id")
    return [{k: batch[k][i] for k in keys} for i in range(len(batch["sample_id"]))]


def test_remote_shard_templates_take_the_split_and_the_manifest_names():
    """'{shard}' expands to the manifest's shard names of the split; '{split}' to the split name."""
    from geoloc.data import resolve_shards

    manifest = {"splits": {"train": {"shards": {"train-000001.tar": 5, "train-000000.tar": 7}},
                           "val": {"shards": {"val-000000.tar": 3}}}}  # fmt: skip
    spec = "pipe:aws s3 cp s3://bucket/shards/{shard} -"
    assert resolve_shards(spec, "train", manifest) == [
        "pipe:aws s3 cp s3://bucket/shards/train-000000.tar -",
        "pipe:aws s3 cp s3://bucket/shards/train-000001.tar -",
    ]
    assert resolve_shards(spec, "val", manifest) == ["pipe:aws s3 cp s3://bucket/shards/val-000000.tar -"]
    with pytest.raises(ValueError, match="manifest"):
        resolve_shards(spec, "train")
    assert resolve_shards("https://h/{split}-{000000..000001}.tar", "val") == [
        "https://h/val-000000.tar",
        "https://h/val-000001.tar",
    ]
