"""ShardSet: the manifest is the source of truth; hostile manifests and damaged shards end in clear errors."""

import json
import logging
import shutil
import tarfile

import pytest

from geoloc.data import ShardSet, check_manifest, make_eval_loader, make_train_loader, resolve_shards
from geoloc.errors import ShardError


@pytest.fixture
def shards(tiny_shards, tmp_path):
    """A private copy of the tiny shards (tests here damage them)."""
    return shutil.copytree(tiny_shards, tmp_path / "shards")


def _manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def _write(folder, manifest):
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_urls_counts_labels_and_encoder_come_from_the_manifest(shards):
    data = ShardSet.open(str(shards))
    manifest = _manifest(shards)
    assert [u.rsplit("/", 1)[1] for u in data.urls("val")] == sorted(manifest["splits"]["val"]["shards"])
    assert data.count("train") == manifest["splits"]["train"]["count"] == len(data.labels("train")[0])
    assert list(data.encoder.state_indices) == manifest["label_encoder"]["state_indices"]


def test_a_stray_tar_is_ignored_with_a_warning_and_a_missing_one_is_an_error(shards, caplog):
    shutil.copy(shards / "val-000000.tar", shards / "train-000099.tar")  # a val shard copied in by mistake
    with caplog.at_level(logging.WARNING, logger="geoloc.data"):
        urls = ShardSet.open(str(shards)).urls("train")
    assert not any(u.endswith("train-000099.tar") for u in urls)
    assert "not listed in manifest.json" in caplog.text and "train-000099.tar" in caplog.text
    assert resolve_shards(str(shards), "train") == urls  # the plain resolver follows the manifest too
    (shards / "train-000001.tar").unlink()
    with pytest.raises(ShardError, match="train-000001.tar"):
        ShardSet.open(str(shards)).urls("train")


def test_a_shard_name_that_would_run_a_command_is_refused_before_expansion(shards, tmp_path):
    manifest = _manifest(shards)
    marker = tmp_path / "pwned"
    evil = f"train-000000.tar; touch {marker} #"
    manifest["splits"]["train"]["shards"][evil] = manifest["splits"]["train"]["shards"].pop(
        "train-000000.tar"
    )
    _write(shards, manifest)
    with pytest.raises(ShardError, match="is not a shard name shard_dataset.py writes"):
        ShardSet.open(f"pipe:cat {shards}/{{shard}}", str(shards / "manifest.json"))
    with pytest.raises(ValueError, match="not shard names"):  # the low-level resolver checks too
        resolve_shards("pipe:cat /x/{shard}", "train", manifest)
    assert not marker.exists()


@pytest.mark.parametrize(
    "damage, key",
    [
        (lambda m: m.pop("splits"), "splits"),
        (lambda m: m.update(version=7), "version"),
        (lambda m: m["splits"]["val"].update(count=99), "splits.val.count"),
        (
            lambda m: m["splits"]["val"]["shards"].update({"val-000001.tar": -1}),
            "splits.val.shards.val-000001.tar",
        ),
        (lambda m: m["label_encoder"].update(state_indices="x"), "label_encoder"),
        (lambda m: m.update(labels_file="../../etc/passwd"), "labels_file"),
    ],
)
def test_a_malformed_manifest_names_the_file_and_key(shards, damage, key):
    manifest = _manifest(shards)
    damage(manifest)
    _write(shards, manifest)
    with pytest.raises(ShardError, match=rf"manifest.json: {key}"):
        ShardSet.open(str(shards))


def test_unreadable_manifest_json_names_the_file(shards):
    (shards / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match="manifest.json: cannot read the shard manifest"):
        ShardSet.open(str(shards))
    with pytest.raises(ShardError, match="manifest.json: not valid JSON"):
        resolve_shards(str(shards), "train")
    with pytest.raises(ShardError, match="not a JSON object"):
        check_manifest([1, 2], "m.json")


def _cut(path, members: int | None = None, fraction: float | None = None):
    """Cut a tar at a member boundary (keep ``members`` members) or mid-member (keep ``fraction`` bytes)."""
    data = path.read_bytes()
    if fraction is not None:
        path.write_bytes(data[: int(len(data) * fraction)])
        return
    with tarfile.open(path) as tar:
        kept = tar.getmembers()[:members]
    src = path.with_suffix(".orig")
    path.rename(src)
    with tarfile.open(src) as old, tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as new:
        for m in kept:
            new.addfile(m, old.extractfile(m))
    src.unlink()


@pytest.mark.parametrize("cut", ["boundary", "mid-member"])
def test_a_truncated_shard_is_one_clear_error_naming_it(shards, cut):
    data = ShardSet.open(str(shards))
    victim = shards / "val-000000.tar"  # 7 samples of 5 members
    _cut(victim, members=17) if cut == "boundary" else _cut(victim, fraction=0.6)
    loader = make_eval_loader(data.urls("val"), batch_size=4, num_workers=1, encoder=data.encoder,
                              shard_counts=data.shard_counts("val"))  # fmt: skip
    with pytest.raises(ShardError, match=r"val-000000.tar: \d complete samples, the manifest says 7") as err:
        list(loader)
    assert "Traceback" not in str(err.value)  # the worker's message, not its traceback


def test_a_truncated_train_shard_is_a_counted_skip_when_asked(shards, caplog):
    data = ShardSet.open(str(shards))
    _cut(shards / "train-000000.tar", members=10)  # 2 of 7 samples left
    common = {"batch_size": 4, "num_samples": data.count("train"), "epoch": 0, "seed": 0, "num_workers": 0,
              "encoder": data.encoder, "shard_counts": data.shard_counts("train")}  # fmt: skip
    with pytest.raises(ShardError, match="train-000000.tar: 2 complete samples, the manifest says 7"):
        list(make_train_loader(data.urls("train"), **common))
    loader = make_train_loader(data.urls("train"), **common, on_short="skip")
    with caplog.at_level(logging.WARNING, logger="geoloc.data"):
        batches = list(loader)
    assert len(batches) == data.count("train") // 4  # the epoch is still full: other shards repeat
    assert loader.stats.as_dict()["short_shards"] == 1 and "data.on_short_shard=skip" in caplog.text


def test_fewer_filled_train_shards_than_ranks_is_refused_at_start(tiny_shards):
    from geoloc.errors import TrainingError
    from geoloc.train.context import check_train_shards

    data = ShardSet.open(str(tiny_shards))
    filled = sum(1 for n in data.shard_counts("train").values() if n)
    check_train_shards(data, "train", filled)  # one shard per rank is enough
    with pytest.raises(TrainingError, match=rf"{filled} non-empty train shard\(s\) for {filled + 1} ranks"):
        check_train_shards(data, "train", filled + 1)
