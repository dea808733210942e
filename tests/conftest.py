"""Shared fixtures: tiny CLIP, DINOv2 and SigLIP checkpoints built offline (session-scoped; building takes
seconds), generated data and its shards."""

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    from geoloc.tiny_clip import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def tiny_dinov2_dir(tmp_path_factory):
    """A tiny DINOv2 laid out like facebook/dinov2-*: fed 56 px crops, position table for 126 px."""
    from geoloc.tiny_backbones import build_tiny_dinov2

    return build_tiny_dinov2(tmp_path_factory.mktemp("tiny_dinov2"))


@pytest.fixture(scope="session")
def tiny_siglip_dir(tmp_path_factory):
    """A tiny full SigLIP checkpoint laid out like google/siglip-* (56 px, mean = std = 0.5)."""
    from geoloc.tiny_backbones import build_tiny_siglip

    return build_tiny_siglip(tmp_path_factory.mktemp("tiny_siglip"))


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory):
    """A generated data root in the competition layout (48 train, 12 test samples)."""
    from geoloc.synth import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("data"), n_train=48, n_test=12, seed=0)


@pytest.fixture(scope="session")
def tiny_shards(tiny_data_root, tmp_path_factory):
    """Shards of ``tiny_data_root``: train/val/test, 7 samples per shard (several shards a split)."""
    from geoloc.sharding import shard_dataset

    out = tmp_path_factory.mktemp("shards")
    shard_dataset(tiny_data_root, out, val_fraction=0.25, seed=0, samples_per_shard=7, workers=1)
    return out


@pytest.fixture(scope="session")
def layouts(tiny_shards, tmp_path_factory):
    """``{name: shard dir}``: tiny_shards with val and test re-cut as one shard, 7+5, and 7+4+1 samples."""
    from _layouts import layout_dirs

    return layout_dirs(tiny_shards, tmp_path_factory.mktemp("layouts"))


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder in which no file can be created: chmod 555 for a normal user; for root (whom modes do not
    bind) the /proc pseudo file system."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if not _can_create_in(folder):
            yield folder
        elif os.path.isdir("/proc") and not _can_create_in("/proc"):
            yield Path("/proc")
        else:
            pytest.skip("no read-only folder available")
    finally:
        folder.chmod(0o755)


def _can_create_in(folder) -> bool:
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False
