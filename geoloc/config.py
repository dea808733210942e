"""Typed configuration, one dataclass per concern, loaded with OmegaConf.

Precedence, lowest first: dataclass defaults < ``--config FILE`` (YAML) < ``--preset NAME`` <
dotted ``key=value`` overrides from the command line. Unknown keys and wrong types are rejected with a
message naming the key; allowed choices and the range of every numeric key (:data:`RANGES`) are
checked in ``__post_init__``, so a bad value fails at start-up, not at the first update. A config file
that is not YAML, not a mapping of sections, or not UTF-8 is an error naming the file. The resolved
config is saved beside every output with :func:`save_config`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from geoloc.errors import GeolocError

DIST_TIMEOUT_S = 1800.0  # 30 min: longer than any legitimate solo wait (a 3.5 GB checkpoint on slow storage)


# choice lists, defined once: the modules that implement them import these
POOLINGS = ("projection", "cls", "mean")
FUSIONS = ("average", "concat", "attention", "weighted")
HEADS = ("state", "gps", "cell", "metric", "vae")  # geoloc.heads.HEADS implements each (checked there)
SOFT_LABEL_MODES = ("state", "sample")
GPS_LOSSES = ("mse", "mae", "smooth_l1", "haversine")
METRIC_LOSSES = ("triplet", "multi_similarity", "infonce")  # geoloc.metric implements each
METRIC_BANDS = ("hard", "medium", "easy", "all")
STATE_DECODERS = ("auto", "head", "cells")
GPS_DECODERS = ("auto", "regression", "cell", "bayes", "knn")


class ConfigError(GeolocError, ValueError):
    """A config file or override is invalid; the message names the key."""


def _check_choice(section: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{section}.{name}={value!r}: choose one of {list(choices)}")


# The allowed interval of every numeric key, per section ("[" closed, "(" open; inf is never allowed).
RANGES: dict[str, dict[str, str]] = {
    "data": {
        "shuffle_buffer": "[0, inf)",  # 0 or 1 = no shuffle buffer
        "num_workers": "[0, inf)",
        "aug_min_scale": "(0, 1]",
        "aug_jitter": "[0, 1)",  # a factor of 0 or below would blank or invert an image
    },
    "model": {
        "head_hidden": "[2, inf)",
        "dropout": "[0, 1)",
        "cell_min_size": "[1, inf)",
        "cell_max_size": "[1, inf)",
    },
    "loss": {
        "tau_km": "(0, inf)",
        "metric_d_pos_km": "(0, inf)",
        "metric_neighbour_km": "[0, inf)",
        "metric_margin": "[0, inf)",
        "metric_temperature": "(0, inf)",
        "metric_ucb_c": "[0, inf)",  # 0 = always the best band so far (after one pull each)
        "vae_kl_weight": "[0, inf)",
    },
    "decode": {
        "bayes_top_k": "[1, inf)",
        "knn_k": "[1, inf)",
        "knn_temperature": "(0, inf)",
        "knn_alpha": "[0, 1]",
    },
    "train": {
        "batch_size": "[1, inf)",
        "grad_accum": "[1, inf)",
        "finetune_batch_size": "[1, inf)",
        "finetune_grad_accum": "[1, inf)",
        "eval_batch_size": "[1, inf)",
        "epochs_frozen": "[0, inf)",
        "epochs_finetune": "[0, inf)",
        "head_lr": "[0, inf)",  # 0 keeps the heads where they are
        "backbone_lr": "[0, inf)",
        "layer_decay": "(0, 1]",
        "unfreeze_last_n": "[0, inf)",  # above the backbone's block count: set_backbone_trainable refuses
        "weight_decay": "[0, inf)",
        "warmup_ratio": "[0, 1)",
        "clip_grad": "[0, inf)",  # 0 = no clipping
        "ema_decay": "[0, 1)",  # 0 = off
        "seed": "[0, 4294967296)",  # numpy seeds are 32-bit unsigned
        "frozen_batch_size": "[1, inf)",
        "save_every_steps": "[0, inf)",  # 0 = only at epoch ends
        "keep_checkpoints": "[1, inf)",
        "patience": "[0, inf)",  # 0 = no early stopping
        "log_every": "[1, inf)",
        "dist_timeout_s": "(0, inf)",
    },
    "infer": {"batch_size": "[1, inf)", "num_workers": "[0, inf)"},
}


def _bounds(interval: str) -> tuple[float, float, bool, bool]:
    """``"[0, 1)"`` -> ``(0.0, 1.0, True, False)``: low, high, low closed, high closed."""
    low, high = (float(x) for x in interval[1:-1].split(","))
    return low, high, interval[0] == "[", interval[-1] == "]"


def in_interval(value: float, interval: str) -> bool:
    """Whether ``value`` lies in ``interval`` (NaN never does)."""
    low, high, low_closed, high_closed = _bounds(interval)
    above = value >= low if low_closed else value > low
    below = value <= high if high_closed else value < high
    return above and below


def describe(interval: str) -> str:
    """``"[1, inf)"`` -> ``">= 1"``, ``"(0, inf)"`` -> ``"> 0"``, else ``"in [0, 1)"``."""
    low, high, low_closed, _ = _bounds(interval)
    if high == float("inf"):
        return f"{'>=' if low_closed else '>'} {low:g}"
    return f"in {interval}"


def _check_ranges(section: str, cfg) -> None:
    for name, interval in RANGES[section].items():
        value = getattr(cfg, name)
        if not in_interval(value, interval):
            finite = " (a finite number)" if isinstance(value, float) else ""
            raise ConfigError(f"{section}.{name}={value!r}: must be {describe(interval)}{finite}")


@dataclass
class DataConfig:
    shuffle_buffer: int = 1000  # samples held in the shuffle buffer (per worker)
    num_workers: int = 4  # DataLoader workers per rank (capped by shards per rank)
    train_split: str = "train"
    val_split: str = "val"
    augment: bool = False  # on-device random resized crop (no flip: a mirror flips the driving side)
    aug_min_scale: float = 0.8  # smallest crop area fraction when augmenting
    aug_jitter: float = 0.0  # brightness/contrast factors in [1 - j, 1 + j] when augmenting (0 = off)
    # a shard holding fewer samples than the manifest says (truncated, replaced): "error" stops naming it,
    # "skip" reads what is there, counts and reports it (training only: val/test must be complete)
    on_short_shard: str = "error"

    def __post_init__(self):
        _check_choice("data", "on_short_shard", self.on_short_shard, ("error", "skip"))
        _check_ranges("data", self)


@dataclass
class ModelConfig:
    backbone: str = "geolocal/StreetCLIP"  # hub id or local path of a CLIP, DINOv2 or SigLIP checkpoint
    # projection (CLIP's / SigLIP's image embedding) | cls (CLIP, DINOv2) | mean (of the patch tokens);
    # a pooling the backbone's family lacks is refused when it loads (geoloc.families)
    pooling: str = "projection"
    fusion: str = "average"  # average | concat | attention | weighted
    heads: list[str] = field(default_factory=lambda: ["state", "gps"])  # by name, see geoloc.heads
    head_hidden: int = 512
    dropout: float = 0.1
    # geocells (the "cell" head): built inside each state from the training points, each with
    # cell_min_size..cell_max_size of them (PIGEON: 30..60); a state with fewer points is one cell
    cell_min_size: int = 30
    cell_max_size: int = 60
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the backbone

    def __post_init__(self):
        _check_ranges("model", self)
        _check_choice("model", "pooling", self.pooling, POOLINGS)
        _check_choice("model", "fusion", self.fusion, FUSIONS)
        for head in self.heads:
            _check_choice("model", "heads", head, HEADS)
        if not self.heads or len(set(self.heads)) != len(self.heads):
            raise ConfigError(f"model.heads={list(self.heads)}: give each head once, at least one")
        if self.cell_max_size < 2 * self.cell_min_size - 1:
            raise ConfigError(
                f"model.cell_max_size={self.cell_max_size}: must be >= 2 * model.cell_min_size - 1 "
                f"({2 * self.cell_min_size - 1}), or an oversized cell could not be split"
            )


@dataclass
class LossConfig:
    # temperature of the haversine label smoothing (state and cell targets); 200 km won the ablation
    # (BENCHMARKS.md): state centroids lie hundreds of km apart, so PIGEON's 75 km is nearly one-hot
    tau_km: float = 200.0
    soft_labels: str = "sample"  # state | sample (PIGEON)
    gps_loss: str = "haversine"  # mse | mae | smooth_l1 | haversine
    # weight of each head's loss term, by head name (heads the model lacks are ignored)
    weights: dict[str, float] = field(
        default_factory=lambda: {"state": 0.8, "gps": 0.2, "cell": 0.8, "metric": 0.2, "vae": 1.0}
    )
    # the metric head (geoloc.metric): positives within metric_d_pos_km, negatives from the band a UCB
    # bandit picks per batch among metric_bands (hard: same state, medium: neighbouring states, those
    # whose training points come within metric_neighbour_km, easy: the others; all: any negative)
    metric_loss: str = "infonce"  # infonce | triplet | multi_similarity
    metric_d_pos_km: float = 250.0
    metric_neighbour_km: float = 100.0
    metric_margin: float = 0.2  # triplet margin (cosine)
    metric_temperature: float = 0.1  # infonce temperature
    metric_bands: list[str] = field(default_factory=lambda: ["hard", "medium", "easy"])  # one = no choice
    metric_ucb_c: float = 1.0  # exploration, in units of the mean absolute reward
    vae_kl_weight: float = 1e-3  # the vae head: its term is reconstruction + vae_kl_weight x KL

    def __post_init__(self):
        _check_choice("loss", "soft_labels", self.soft_labels, SOFT_LABEL_MODES)
        _check_choice("loss", "gps_loss", self.gps_loss, GPS_LOSSES)
        _check_choice("loss", "metric_loss", self.metric_loss, METRIC_LOSSES)
        for band in self.metric_bands:
            _check_choice("loss", "metric_bands", band, METRIC_BANDS)
        if not self.metric_bands or len(set(self.metric_bands)) != len(self.metric_bands):
            raise ConfigError(
                f"loss.metric_bands={list(self.metric_bands)}: give each band once, at least one"
            )
        _check_ranges("loss", self)
        for head, w in self.weights.items():
            if head not in HEADS:
                raise ConfigError(f"loss.weights.{head}: not a head; the heads are {list(HEADS)}")
            if not in_interval(w, "[0, inf)"):
                raise ConfigError(f"loss.weights.{head}={w!r}: must be >= 0 (a finite number)")
        if sum(self.weights.values()) <= 0:
            raise ConfigError(f"loss.weights={dict(self.weights)}: their sum must be > 0")


@dataclass
class DecodeConfig:
    """How head outputs become the top-5 states and the point (geoloc.decoders); infer.py flags override it.

    ``auto``: state probabilities from the cells when the model has a cell head, else from the state head;
    the point from the Bayes decoding of the cells when it has cells, else from the GPS head."""

    state: str = "auto"  # auto | head | cells
    gps: str = "auto"  # auto | regression | cell (argmax centroid) | bayes (cells) | knn (neighbours)
    bayes_top_k: int = 10  # cells the Bayes point is taken over
    knn_k: int = 5  # neighbours of the retrieval index (when the model has one)
    knn_temperature: float = 0.05  # softmax temperature over the neighbours' cosine similarities
    knn_alpha: float = 0.0  # weight of the neighbours' state vote blended into the state probabilities

    def __post_init__(self):
        _check_choice("decode", "state", self.state, STATE_DECODERS)
        _check_choice("decode", "gps", self.gps, GPS_DECODERS)
        _check_ranges("decode", self)


@dataclass
class TrainConfig:
    # Batch sizes count places (4 views each) per rank and forward; an optimiser update sees
    # batch x accumulation x ranks places. Phase 1 without the embedding cache (no-grad backbone):
    batch_size: int = 32
    grad_accum: int = 1  # phase 1, cached (frozen_batch_size) or not (batch_size)
    # Phase 2 gets its own, smaller batch: backward through ViT-L/14-336 under bf16 autocast keeps 0.69 GB
    # of activations per image (2.75 GB per place of 4 views; counted exactly on a CPU by
    # bench/activation_memory.py, not yet read off a GPU allocator: bench/gpu_check.py does that), beside
    # ~6.7 GB that do not grow with the batch (fp32 weights, grads, AdamW state, DDP buckets, bf16 weight
    # copies). 32 places would need ~95 GB; 8 places need ~29 GB, which fits a 40 GB A100 with room for
    # backward's transients (10 at most with 10% kept free), and accumulating 4 keeps 32 places per rank
    # and update. 80 GB cards fit 16 x 2 (~51 GB). Gradient checkpointing keeps 0.06 GB per image but
    # costs ~1/3 more compute.
    finetune_batch_size: int = 8
    finetune_grad_accum: int = 4
    eval_batch_size: int = 64
    epochs_frozen: int = 5  # phase 1: heads only, backbone frozen
    epochs_finetune: int = 2  # phase 2: backbone (or its last N blocks) unfrozen
    head_lr: float = 1e-3
    backbone_lr: float = 1e-5
    layer_decay: float = 1.0  # <1: earlier backbone blocks get lr * decay**depth
    unfreeze_last_n: int = 0  # 0 = unfreeze the whole backbone in phase 2
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05  # share of optimiser updates spent in linear warm-up
    clip_grad: float = 1.0
    ema_decay: float = 0.0  # 0 = off
    seed: int = 0
    cache_embeddings: bool = True  # phase 1 on cached backbone embeddings
    cache_dir: str = ""  # "" = ~/.cache/geoloc/embeddings
    frozen_batch_size: int = 256  # batch size on cached embeddings
    save_every_steps: int = 500
    keep_checkpoints: int = 2
    patience: int = 3  # early stopping, in epochs without val improvement (0 = off)
    log_every: int = 10
    # seconds a collective may wait for the other ranks before the job ends (a stopped or hung rank);
    # longer than any legitimate solo work of one rank (writing a checkpoint, exporting the model)
    dist_timeout_s: float = DIST_TIMEOUT_S
    # after training: index the best model's training embeddings (kNN decoding) and record the decoder
    # that scores best on val as the exported model's default (geoloc.train.index)
    build_index: bool = True

    def __post_init__(self):
        _check_ranges("train", self)


@dataclass
class InferConfig:
    """infer.py's options (its flags); checked like the training config, each key named by its flag."""

    batch_size: int = 64
    tta: str = "none"  # none | scales | crop fractions
    num_workers: int = 4

    def __post_init__(self):
        _check_ranges("infer", self)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)


# Named presets: dotted overrides applied after the config file.
PRESETS: dict[str, list[str]] = {
    # a CPU check in a minute or two: tiny batches, few epochs, few workers
    "smoke": [
        "data.shuffle_buffer=64",
        "data.num_workers=1",
        "train.batch_size=8",
        "train.finetune_batch_size=4",
        "train.finetune_grad_accum=1",
        "train.eval_batch_size=16",
        "train.frozen_batch_size=32",
        "train.epochs_frozen=2",
        "train.epochs_finetune=1",
        "train.save_every_steps=50",
        "train.log_every=1",
    ],
}


def _merge(base, overrides, source: str):
    try:
        return OmegaConf.merge(base, overrides)
    except OmegaConfBaseException as err:
        # OmegaConf messages carry a multi-line trailer (reference_type=...); keep the first line
        key = getattr(err, "full_key", None)
        reason = str(err).splitlines()[0]
        raise ConfigError(f"{source}: {key}: {reason}") from None


SECTIONS_HINT = "the top level must be a mapping of sections (data, model, loss, train, decode)"


def load_yaml(path: str | Path) -> DictConfig:
    """A YAML config file as a mapping; an error naming the file if it is missing, unreadable or not one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as err:  # the message carries line and column
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except (OSError, OmegaConfBaseException) as err:  # OSError: a scalar top level ("Invalid loaded object")
        raise ConfigError(f"{path}: {SECTIONS_HINT} ({str(err).splitlines()[0]})") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(
            f"{path}: {SECTIONS_HINT}, got a {type(loaded).__name__.removesuffix('Config').lower()}"
        )
    for key, section in OmegaConf.to_container(loaded, resolve=False).items():
        if not isinstance(section, dict):
            raise ConfigError(
                f"{path}: {key}: must be a mapping of keys (e.g. '{key}:' then indented 'key: value')"
            )
    return loaded


def load_config(
    path: str | Path | None = None, overrides: list[str] = (), preset: str | None = None
) -> Config:
    """Defaults < YAML file < preset < dotted overrides; returns a validated :class:`Config`."""
    cfg = OmegaConf.structured(Config)
    if path:
        cfg = _merge(cfg, load_yaml(path), str(path))
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        cfg = _merge(cfg, OmegaConf.from_dotlist(PRESETS[preset]), f"preset {preset}")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like section.key=value, got {bad}")
    cfg = _merge(cfg, OmegaConf.from_dotlist(list(overrides)), "command line")
    return _to_object(cfg, "")


def _to_object(cfg, source: str) -> Config:
    """The validated dataclasses; a failed check names ``source`` (a file) when given."""
    prefix = f"{source}: " if source else ""
    try:
        return OmegaConf.to_object(cfg)
    except ConfigError as err:
        raise ConfigError(f"{prefix}{err}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{prefix}{str(err).splitlines()[0]}") from None


def config_to_dict(cfg: Config) -> dict:
    return asdict(cfg)


def config_from_dict(d: dict, source: str = "saved config") -> Config:
    """Rebuild (and validate) a config saved by :func:`save_config`; errors name ``source``."""
    return _to_object(_merge(OmegaConf.structured(Config), OmegaConf.create(d), source), source)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def read_config(path: str | Path) -> Config:
    """A config saved by :func:`save_config` (e.g. a model directory's ``config.yaml``); errors name the file."""
    return _to_object(_merge(OmegaConf.structured(Config), load_yaml(path), str(path)), str(path))
