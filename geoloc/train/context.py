"""What a training run needs, built once: options, accelerator, shards, label tables (centroids, geocells),
the loss criterion, preprocessing, tracker and checkpoints.

:func:`prepare_context` is the only place that reads the shard manifest and the train labels; the phases
receive a :class:`RunContext` and never look at argv or global state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from geoloc.config import Config, config_to_dict, save_config
from geoloc.errors import RunInterrupted, TrainingError  # noqa: F401 - re-exported for the trainer
from geoloc.labels import LabelEncoder
from geoloc.train.engine import PHASE_NAMES, input_dtype, is_deepspeed, make_accelerator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    """The command-line choices that are not model/training hyper-parameters."""

    shards: str
    output_dir: Path
    phase: str = "both"  # both | frozen | finetune
    resume: str | None = None  # "latest" or a checkpoint directory
    init_from: Path | None = None  # an exported model directory to start from
    report_to: str = "none"  # none | wandb
    stop_after_steps: int = 0  # >0: stop abruptly after this many optimiser updates (tests)
    manifest: str | None = None  # manifest.json when the shards are URLs (default: beside the shards)
    # called on every rank after each epoch's validation and checkpoint as (phase, epoch (1-based, within
    # the phase), val metrics): the tuner reports there and may raise (optuna.TrialPruned) to end the run;
    # the exception leaves run() after the tracker is finished
    on_epoch: Callable[[str, int, dict], None] | None = None

    @property
    def phases(self) -> tuple[str, ...]:
        return PHASE_NAMES if self.phase == "both" else (self.phase,)


@dataclass(frozen=True)
class LabelTables:
    """Label encoder and what the losses, the decoders and the export need from the TRAIN split."""

    encoder: LabelEncoder
    centroids: torch.Tensor  # (C, 2) float32 mean lat/lon of each class's training points
    dist: torch.Tensor  # (C, C) float32 km between centroids
    prior: dict  # geoloc.metrics.Prior.to_dict(): most frequent states and mean point
    cells: object = None  # geoloc.geocells.GeoCells (a "cell" head), else None
    location: object = None  # geoloc.metric.LocationTables (a "metric" head), else None

    @property
    def sizes(self):
        from geoloc.heads import HeadSizes

        return HeadSizes(self.encoder.num_classes, 0 if self.cells is None else self.cells.num_cells)


@dataclass
class RunContext:
    """Everything the phases share, built once by :func:`prepare_context`."""

    cfg: Config
    opts: RunOptions
    accelerator: object  # accelerate.Accelerator
    run_dir: Path
    data: object  # geoloc.data.ShardSet: the shards and their validated manifest
    shards: dict[str, list[str]]  # split -> shard urls
    counts: dict[str, int]  # split -> samples (from the manifest)
    manifest: dict
    labels: LabelTables
    preprocess: dict  # image_size, mean, std (from the backbone checkpoint)
    preprocessor: torch.nn.Module  # uint8 views -> normalised float pixels, on the device
    tracker: object  # geoloc.train.tracking.MetricsLogger
    checkpoints: object  # geoloc.train.checkpoint.CheckpointManager
    criterion: object  # geoloc.losses.Criterion: named loss terms of the model's heads

    def decoder(self):
        """The decoder validation uses: ``decode`` of the config, without the retrieval index (it is built
        after training, geoloc.train.index; a knn choice falls back to ``auto`` until then)."""
        from dataclasses import replace

        from geoloc.decoders import Decoder

        spec = self.cfg.decode
        if spec.gps == "knn" or spec.knn_alpha > 0:
            spec = replace(spec, gps="auto" if spec.gps == "knn" else spec.gps, knn_alpha=0.0)
        cells = self.labels.cells
        return Decoder(spec, self.cfg.model.heads, self.labels.encoder, cells, None, self.accelerator.device)

    def split(self, role: str) -> str:
        """The split name of a role (``train`` -> ``cfg.data.train_split``)."""
        return {"train": self.cfg.data.train_split, "val": self.cfg.data.val_split}[role]

    def eval_loader(self, role: str, batch_size: int):
        """Every sample of ``role``'s shards once across the ranks; each shard's count checked against the
        manifest (val must be complete; train follows ``data.on_short_shard``)."""
        from geoloc.data import make_eval_loader

        acc, split = self.accelerator, self.split(role)
        return make_eval_loader(
            self.shards[role], batch_size=batch_size, rank=acc.process_index, world_size=acc.num_processes,
            num_workers=self.cfg.data.num_workers, encoder=self.labels.encoder,
            shard_counts=self.data.shard_counts(split),
            on_short=self.cfg.data.on_short_shard if role == "train" else "error",
        )  # fmt: skip

    @property
    def num_views(self) -> int:
        from geoloc.contract import VIEWS

        return len(VIEWS)

    @property
    def is_deepspeed(self) -> bool:
        return is_deepspeed(self.accelerator)

    @property
    def zero_stage(self) -> int:
        """DeepSpeed ZeRO stage, 0 without DeepSpeed."""
        return int(self.accelerator.state.deepspeed_plugin.zero_stage) if self.is_deepspeed else 0

    @property
    def input_dtype(self) -> torch.dtype:
        return input_dtype(self.accelerator)

    @property
    def eval_dtype(self) -> torch.dtype:
        """Autocast dtype for embedding and validation: bf16 on GPU or under DeepSpeed bf16, else fp32."""
        if self.input_dtype == torch.bfloat16 or self.accelerator.device.type == "cuda":
            return torch.bfloat16
        return torch.float32


# ----------------------------------------------------------------------------- labels


def label_tables(cfg: Config, encoder: LabelEncoder, states: np.ndarray, latlon: np.ndarray) -> LabelTables:
    """Centroids and their distance matrix from the train labels; the prior baseline; geocells when the
    model has a cell head (built from the same points on every rank: deterministic for the seed)."""
    from geoloc.geo import distance_matrix, state_centroids
    from geoloc.metrics import Prior

    classes = encoder.encode(states)
    try:
        centroids = state_centroids(latlon[:, 0], latlon[:, 1], classes, encoder.num_classes)  # (C, 2)
    except ValueError as err:
        raise TrainingError(f"train split: {err} (every class of the label encoder needs a sample)") from None
    centroids = torch.as_tensor(centroids, dtype=torch.float32)
    cells = None
    if "cell" in cfg.model.heads:
        from geoloc.geocells import build_geocells

        m = cfg.model
        cells, _ = build_geocells(latlon, states, m.cell_min_size, m.cell_max_size, cfg.train.seed)
    location = None
    if "metric" in cfg.model.heads:  # neighbouring states and the positive rate, from the same points
        from geoloc.metric import location_tables

        loss = cfg.loss
        location = location_tables(latlon, classes, encoder.num_classes, loss.metric_neighbour_km,
                                   loss.metric_d_pos_km)  # fmt: skip
    prior = Prior.fit(states, latlon).to_dict()
    return LabelTables(encoder, centroids, distance_matrix(centroids), prior, cells, location)


def make_criterion(cfg: Config, labels: LabelTables, device, accelerator=None):
    """The loss terms of the model's heads and what they need, on the training device. ``accelerator``:
    the metric head's batch gather on several ranks (None: mining within each rank's batch)."""
    from geoloc.heads import Targets
    from geoloc.losses import Criterion

    cells = None if labels.cells is None else torch.as_tensor(labels.cells.centroid, dtype=torch.float32)
    metric = None
    if labels.location is not None:
        from geoloc.metric import build_miner

        metric = build_miner(cfg, labels.location, device, accelerator)
    targets = Targets(
        centroids=labels.centroids.to(device), dist=labels.dist.to(device),
        cell_centroids=None if cells is None else cells.to(device), soft_labels=cfg.loss.soft_labels,
        tau_km=cfg.loss.tau_km, gps_loss=cfg.loss.gps_loss, metric=metric, vae_kl_weight=cfg.loss.vae_kl_weight,
    )  # fmt: skip
    return Criterion(cfg.model.heads, cfg.loss.weights, targets)


# ----------------------------------------------------------------------------- data


def shard_lists(cfg: Config, spec: str, manifest_url: str | None = None):
    """-> the ShardSet (manifest validated), train/val shard urls and sample counts by role."""
    from geoloc.data import ShardSet

    data = ShardSet.open(spec, manifest_url)  # beside local shards, or --manifest for remote ones
    splits = {"train": cfg.data.train_split, "val": cfg.data.val_split}
    return data, {r: data.urls(s) for r, s in splits.items()}, {r: data.count(s) for r, s in splits.items()}


def check_train_shards(data, split: str, world_size: int) -> None:
    """Every rank needs a non-empty train shard (phase 2 streams them); said before anything is built."""
    filled = sum(1 for n in data.shard_counts(split).values() if n > 0)
    if filled < world_size:
        raise TrainingError(
            f"{data.location}: {filled} non-empty {split} shard(s) for {world_size} ranks: some rank would "
            f"have none; reshard with a smaller --samples-per-shard (at least ranks x loader workers shards)"
        )


def device_preprocessor(cfg: Config, device, dtype: torch.dtype) -> tuple[dict, torch.nn.Module]:
    """Input size, mean and std from the backbone checkpoint, and the on-device Preprocessor."""
    from geoloc.preprocess import Preprocessor, preprocess_settings

    settings = preprocess_settings(cfg.model.backbone)
    module = Preprocessor(
        **settings, augment=cfg.data.augment, min_scale=cfg.data.aug_min_scale, jitter=cfg.data.aug_jitter,
        dtype=dtype,
    )  # fmt: skip
    return settings, module.to(device)


# ----------------------------------------------------------------------------- the context


def prepare_context(cfg: Config, opts: RunOptions) -> RunContext:
    """Accelerator, run directory (with config.yaml), shards, train-label tables, tracker, checkpoints."""
    from accelerate.utils import set_seed

    from geoloc.train.checkpoint import CheckpointManager
    from geoloc.train.resume import run_info
    from geoloc.train.tracking import MetricsLogger

    accelerator = make_accelerator(cfg, opts)
    set_seed(cfg.train.seed)  # same head initialisation on every rank
    run_dir = Path(opts.output_dir)
    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.yaml")
    data, shards, counts = shard_lists(cfg, opts.shards, opts.manifest)
    manifest = data.manifest
    if "finetune" in opts.phases or not cfg.train.cache_embeddings:  # these stream train shards per rank
        check_train_shards(data, cfg.data.train_split, accelerator.num_processes)
    labels = label_tables(cfg, data.encoder, *data.labels(cfg.data.train_split, accelerator))
    preprocess, preprocessor = device_preprocessor(cfg, accelerator.device, input_dtype(accelerator))
    tracker = MetricsLogger(run_dir, accelerator, opts.report_to, config=config_to_dict(cfg))
    splits = {"train": cfg.data.train_split, "val": cfg.data.val_split}
    info = run_info(
        config_to_dict(cfg), manifest, splits, accelerator.num_processes, is_deepspeed(accelerator)
    )
    criterion = make_criterion(cfg, labels, accelerator.device, accelerator)
    if labels.location is not None:
        from geoloc.metric import positives_note

        accelerator.print(positives_note(cfg, labels.location, accelerator.num_processes))
    # the criterion's state (the metric head's bandit) goes into every checkpoint as JSON
    checkpoints = CheckpointManager(
        run_dir, accelerator, cfg.train.keep_checkpoints, info, {"loss": criterion}
    )
    return RunContext(
        cfg, opts, accelerator, run_dir, data, shards, counts, manifest, labels, preprocess, preprocessor,
        tracker, checkpoints, criterion,
    )  # fmt: skip
