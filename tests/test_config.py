"""Config: YAML < preset < dotted overrides; unknown keys, wrong types and bad choices rejected by name."""

import pytest

from geoloc.config import Config, ConfigError, load_config, read_config, save_config


def test_defaults_are_pigeon_like():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.model.backbone == "geolocal/StreetCLIP"
    assert cfg.model.fusion == "average"
    assert cfg.loss.tau_km == 75.0
    assert (cfg.loss.cls_weight, cfg.loss.gps_weight) == (0.8, 0.2)
    assert (cfg.train.backbone_lr, cfg.train.head_lr) == (1e-5, 1e-3)


def test_precedence_file_then_preset_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  batch_size: 3\n  epochs_frozen: 9\nloss:\n  tau_km: 50\n")
    cfg = load_config(path, ["train.epochs_frozen=4"], preset="smoke")
    assert cfg.train.batch_size == 8  # the preset overrides the file
    assert cfg.train.epochs_frozen == 4  # the command line overrides both
    assert cfg.loss.tau_km == 50.0  # the file overrides the defaults


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.nope=1", ["train.nope", "nope"]),
        ("train.batch_size=abc", ["train.batch_size", "abc"]),
        ("loss.soft_labels=foo", ["loss.soft_labels", "state", "sample"]),
        ("model.fusion=max", ["model.fusion", "average"]),
        ("nosection=1", ["nosection"]),
    ],
)
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    for word in words:
        assert word in str(err.value)


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  backbon: x\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*model\.backbon"):
        load_config(path)


def test_missing_file_and_bad_preset_and_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(preset="huge")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["train.batch_size"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(overrides=["model.pooling=mean", "train.seed=7"], preset="smoke")
    save_config(cfg, tmp_path / "config.yaml")
    assert read_config(tmp_path / "config.yaml") == cfg
