"""Config: YAML < preset < dotted overrides; unknown keys, wrong types and bad choices rejected by name."""

import pytest

from geoloc.config import Config, ConfigError, load_config, read_config, save_config


def test_defaults_are_pigeon_like():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.model.backbone == "geolocal/StreetCLIP"
    assert cfg.model.fusion == "average"
    assert cfg.loss.tau_km == 200.0  # the ablation's best row (BENCHMARKS.md)
    assert cfg.model.heads == ["state", "gps"]
    assert cfg.loss.weights == {"state": 0.8, "gps": 0.2, "cell": 0.8, "metric": 0.2, "vae": 1.0}
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


# ---------------------------------------------------------------- bad input: files and ranges


@pytest.mark.parametrize(
    "text, match",
    [
        (b"- train\n- model\n", r"top level must be a mapping of sections.*got a list"),
        (b"42\n", r"top level must be a mapping of sections"),
        (b"train: 5\n", r"train: must be a mapping of keys"),
        (b"train: [1\n", r"not valid YAML.*line"),
        (b"train:\n  seed: \xff\n", r"not UTF-8"),
    ],
)
def test_a_config_file_that_is_not_a_mapping_of_sections_names_the_file(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_bytes(text)
    with pytest.raises(ConfigError, match=match) as err:
        load_config(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.log_every=0", ["train.log_every=0", ">= 1"]),
        ("train.keep_checkpoints=0", ["train.keep_checkpoints=0", ">= 1"]),
        ("model.dropout=2", ["model.dropout=2.0", "[0, 1)"]),
        ("train.warmup_ratio=5", ["train.warmup_ratio=5.0", "[0, 1)"]),
        ("train.ema_decay=1.5", ["train.ema_decay=1.5", "[0, 1)"]),
        ("data.num_workers=-1", ["data.num_workers=-1", ">= 0"]),
        ("train.epochs_frozen=-1", ["train.epochs_frozen=-1", ">= 0"]),
        ("train.head_lr=-1", ["train.head_lr=-1.0", ">= 0"]),
        ("train.unfreeze_last_n=-2", ["train.unfreeze_last_n=-2", ">= 0"]),
        ("train.backbone_lr=nan", ["train.backbone_lr=nan", "finite"]),
        ("loss.tau_km=inf", ["loss.tau_km=inf", "> 0"]),
        ("train.seed=-1", ["train.seed=-1"]),
        ("decode.knn_k=0", ["decode.knn_k=0", ">= 1"]),
        ("decode.knn_alpha=2", ["decode.knn_alpha=2.0", "[0, 1]"]),
        ("loss.weights.state=-0.5", ["loss.weights.state=-0.5", ">= 0"]),
        ("loss.weights.nohead=1", ["loss.weights.nohead", "not a head"]),
        ("model.heads=[state,state]", ["model.heads", "each head once"]),
        ("model.heads=[]", ["model.heads", "at least one"]),
        ("model.heads=[state,boat]", ["model.heads='boat'", "cell"]),
        ("model.cell_max_size=10", ["model.cell_max_size=10", "2 * model.cell_min_size - 1"]),
        ("decode.gps=nearest", ["decode.gps='nearest'", "bayes"]),
    ],
)
def test_out_of_range_values_are_refused_up_front_naming_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    for word in words:
        assert word in str(err.value)


def _numeric_fields():
    """``(section, key, type)`` of every int/float key of every section (bools are not numbers here)."""
    from dataclasses import fields

    from geoloc.config import InferConfig

    sections = {f.name: f.default_factory for f in fields(Config)} | {"infer": InferConfig}
    return [
        (section, f.name, f.type)
        for section, factory in sections.items()
        for f in fields(factory())
        if f.type in ("int", "float")
    ]


def _outside(interval: str, kind: str) -> list:
    """Values just outside an interval's ends (an open end is itself outside), plus NaN/inf for floats."""
    from geoloc.config import _bounds

    low, high, low_closed, high_closed = _bounds(interval)
    step = 1 if kind == "int" else 0.5
    values = [low - step if low_closed else low]
    if high != float("inf"):
        values.append(high + step if high_closed else high)
    values = [int(v) if kind == "int" else float(v) for v in values]
    return values + (["nan", "inf"] if kind == "float" else [])


def test_every_numeric_key_of_every_section_has_a_range_that_is_enforced():
    """A new numeric key without a declared range fails here; so does a range that is not checked."""
    from geoloc.config import RANGES, InferConfig, in_interval

    numeric = _numeric_fields()
    assert len(numeric) > 30  # the guard itself must see the sections
    assert {(s, k) for s, k, _ in numeric} == {(s, k) for s in RANGES for k in RANGES[s]}
    cfg = load_config()
    for section, key, kind in numeric:
        interval = RANGES[section][key]
        defaults = InferConfig() if section == "infer" else getattr(cfg, section)
        assert in_interval(getattr(defaults, key), interval), (section, key)  # defaults inside
        for value in _outside(interval, kind):
            with pytest.raises(ConfigError, match=rf"{section}\.{key}="):
                _set(section, key, value)


def _set(section: str, key: str, value):
    """A config with one value set: through load_config, or InferConfig (infer.py's own options)."""
    from geoloc.config import InferConfig

    if section == "infer":
        return InferConfig(**{key: float(value) if isinstance(value, str) else value})
    return load_config(overrides=[f"{section}.{key}={value}"])


def test_loss_weights_must_not_all_be_zero():
    zeros = [f"loss.weights.{h}=0" for h in ("state", "gps", "cell", "metric", "vae")]
    with pytest.raises(ConfigError, match=r"loss\.weights=.*their sum must be > 0"):
        load_config(overrides=zeros)
    cfg = load_config(overrides=zeros[:2])  # one alone is fine
    assert cfg.loss.weights == {"state": 0.0, "gps": 0.0, "cell": 0.8, "metric": 0.2, "vae": 1.0}


def test_boundary_values_that_mean_off_are_accepted():
    cfg = load_config(
        overrides=["train.head_lr=0", "train.backbone_lr=0", "train.ema_decay=0", "train.patience=0",
                   "train.clip_grad=0", "data.num_workers=0", "train.save_every_steps=0", "model.dropout=0"]
    )  # fmt: skip
    assert cfg.train.head_lr == 0 and cfg.train.ema_decay == 0 and cfg.data.num_workers == 0


def test_infer_config_is_validated_directly():
    from geoloc.config import InferConfig

    with pytest.raises(ConfigError, match=r"infer\.batch_size=0"):
        InferConfig(batch_size=0)
    with pytest.raises(ConfigError, match=r"infer\.num_workers=-1"):
        InferConfig(num_workers=-1)


def test_a_saved_config_with_a_bad_value_names_the_file(tmp_path):
    path = tmp_path / "config.yaml"
    save_config(load_config(), path)
    path.write_text(path.read_text().replace("log_every: 10", "log_every: 0"))
    with pytest.raises(ConfigError, match=rf"{path}: train\.log_every=0: must be >= 1"):
        read_config(path)
