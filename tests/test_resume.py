"""What a resume may change: another label set, shard set, world size or a kept config key is refused,
naming it; the keys a resume takes are reported."""

import copy

import pytest

from geoloc.config import config_to_dict, load_config
from geoloc.errors import CheckpointError
from geoloc.train.resume import TAKEN, check_resumable, config_changes, run_info

MANIFEST = {
    "label_encoder": {"state_indices": [3, 7, 12], "state_names": ["a", "b", "c"]},
    "splits": {"train": {"count": 5, "shards": {"train-000000.tar": 5}},
               "val": {"count": 2, "shards": {"val-000000.tar": 2}}},
}  # fmt: skip
SPLITS = {"train": "train", "val": "val"}


def _info(*overrides, manifest=MANIFEST, world=2, deepspeed=False):
    cfg = config_to_dict(load_config(None, list(overrides)))
    return run_info(cfg, manifest, SPLITS, world, deepspeed)


def test_the_same_run_resumes_without_notes():
    assert check_resumable("ckpt", _info(), _info()) == []


def test_another_label_set_is_refused():
    other = copy.deepcopy(MANIFEST)
    other["label_encoder"]["state_indices"] = [3, 7, 13]  # same class count, other states
    with pytest.raises(
        CheckpointError, match=r"ckpt: trained on states \[3, 7, 12\].*\[3, 7, 13\].*remapped"
    ):
        check_resumable("ckpt", _info(), _info(manifest=other))


def test_another_shard_set_is_refused_naming_the_shards():
    other = copy.deepcopy(MANIFEST)
    other["splits"]["train"]["shards"] = {"train-000000.tar": 4, "train-000001.tar": 1}
    with pytest.raises(CheckpointError, match=r"train: new \['train-000001.tar'\].*other sample counts"):
        check_resumable("ckpt", _info(), _info(manifest=other))


def test_a_kept_key_that_changed_is_refused_with_old_and_new_values():
    with pytest.raises(CheckpointError, match=r"train.head_lr: 0.001 -> 0.01.*--init-from"):
        check_resumable("ckpt", _info(), _info("train.head_lr=0.01"))


def test_taken_keys_are_reported_not_refused():
    notes = check_resumable("ckpt", _info(), _info("train.epochs_finetune=5", "train.log_every=3"))
    assert notes == [
        "resume takes the new train.epochs_finetune: 2 -> 5",
        "resume takes the new train.log_every: 10 -> 3",
    ]


def test_world_size_changes_under_ddp_warn_and_under_deepspeed_refuse():
    (note,) = check_resumable("ckpt", _info(world=2), _info(world=4))
    assert "on 4 ranks of a run of 2" in note
    with pytest.raises(CheckpointError, match="2 DeepSpeed ranks, this run has 4"):
        check_resumable("ckpt", _info(world=2, deepspeed=True), _info(world=4, deepspeed=True))


def test_every_taken_key_exists_in_the_config():
    taken, kept = config_changes(_info()["config"], {})  # every key changes, as "key: old -> None"
    names = {line.split(":")[0] for line in taken + kept}
    assert TAKEN <= names, TAKEN - names
