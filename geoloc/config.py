"""Typed configuration, one dataclass per concern, loaded with OmegaConf.

Precedence, lowest first: dataclass defaults < ``--config FILE`` (YAML) < ``--preset NAME`` <
dotted ``key=value`` overrides from the command line. Unknown keys and wrong types are rejected with a
message naming the key; allowed choices are checked in ``__post_init__``. The resolved config is saved
beside every output with :func:`save_config`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


def _check_choice(section: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{section}.{name}={value!r}: choose one of {list(choices)}")


@dataclass
class DataConfig:
    shuffle_buffer: int = 1000  # samples held in the shuffle buffer (per worker)
    num_workers: int = 4  # DataLoader workers per rank (capped by shards per rank)
    train_split: str = "train"
    val_split: str = "val"
    augment: bool = False  # on-device random resized crop (no flip: a mirror flips the driving side)
    aug_min_scale: float = 0.8  # smallest crop area fraction when augmenting
    aug_jitter: float = 0.0  # brightness/contrast factors in [1 - j, 1 + j] when augmenting (0 = off)

    def __post_init__(self):
        if not 0 < self.aug_min_scale <= 1:
            raise ConfigError(f"data.aug_min_scale={self.aug_min_scale}: must be in (0, 1]")
        if not 0 <= self.aug_jitter < 1:  # a factor of 0 or below would blank or invert an image
            raise ConfigError(f"data.aug_jitter={self.aug_jitter}: must be in [0, 1)")


@dataclass
class ModelConfig:
    backbone: str = "geolocal/StreetCLIP"  # hub id or local path of a CLIP (vision) checkpoint
    pooling: str = "projection"  # projection (CLIP image embedding) | cls | mean (of patch tokens)
    fusion: str = "average"  # average | concat | attention | weighted
    head_hidden: int = 512
    dropout: float = 0.1
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the backbone

    def __post_init__(self):
        _check_choice("model", "pooling", self.pooling, ("projection", "cls", "mean"))
        _check_choice("model", "fusion", self.fusion, ("average", "concat", "attention", "weighted"))


@dataclass
class LossConfig:
    tau_km: float = 75.0  # temperature of the haversine label smoothing
    soft_labels: str = "sample"  # state | sample (PIGEON)
    gps_loss: str = "haversine"  # mse | mae | smooth_l1 | haversine
    cls_weight: float = 0.8
    gps_weight: float = 0.2

    def __post_init__(self):
        _check_choice("loss", "soft_labels", self.soft_labels, ("state", "sample"))
        _check_choice("loss", "gps_loss", self.gps_loss, ("mse", "mae", "smooth_l1", "haversine"))
        if self.tau_km <= 0:
            raise ConfigError(f"loss.tau_km={self.tau_km}: must be > 0")


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

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "finetune_batch_size", "finetune_grad_accum",
                     "eval_batch_size", "frozen_batch_size"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)}: must be >= 1")


@dataclass
class InferConfig:
    batch_size: int = 64
    tta: str = "none"  # none | scales
    num_workers: int = 4

    def __post_init__(self):
        _check_choice("infer", "tta", self.tta, ("none", "scales"))


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)


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
        "infer.batch_size=16",
        "infer.num_workers=1",
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


def load_config(
    path: str | Path | None = None, overrides: list[str] = (), preset: str | None = None
) -> Config:
    """Defaults < YAML file < preset < dotted overrides; returns a validated :class:`Config`."""
    cfg = OmegaConf.structured(Config)
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        cfg = _merge(cfg, OmegaConf.load(path), str(path))
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        cfg = _merge(cfg, OmegaConf.from_dotlist(PRESETS[preset]), f"preset {preset}")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like section.key=value, got {bad}")
    cfg = _merge(cfg, OmegaConf.from_dotlist(list(overrides)), "command line")
    try:
        return OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except OmegaConfBaseException as err:
        raise ConfigError(str(err)) from None


def config_to_dict(cfg: Config) -> dict:
    return asdict(cfg)


def config_from_dict(d: dict) -> Config:
    """Rebuild (and validate) a config saved by :func:`save_config`."""
    return OmegaConf.to_object(_merge(OmegaConf.structured(Config), OmegaConf.create(d), "saved config"))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def read_config(path: str | Path) -> Config:
    return config_from_dict(OmegaConf.to_container(OmegaConf.load(path)))
