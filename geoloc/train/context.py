"""What a training run needs, built once: options, accelerator, shard lists, label tables, preprocessing.

:func:`prepare_context` is the only place that reads the shard manifest and the train labels; the phases
receive a :class:`RunContext` and never look at argv or global state.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from geoloc.config import Config, config_to_dict, save_config
from geoloc.labels import LabelEncoder

PHASE_NAMES = ("frozen", "finetune")

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """A run cannot go on (bad input, non-finite loss, ...); the message says what and where."""


class RunInterrupted(TrainingError):
    """``--stop-after-steps`` ended the run early, as a crash would (tests of ``--resume``)."""


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

    @property
    def phases(self) -> tuple[str, ...]:
        return PHASE_NAMES if self.phase == "both" else (self.phase,)


@dataclass(frozen=True)
class LabelTables:
    """Label encoder and what the losses and the export need from the TRAIN split."""

    encoder: LabelEncoder
    centroids: torch.Tensor  # (C, 2) float32 mean lat/lon of each class's training points
    dist: torch.Tensor  # (C, C) float32 km between centroids
    prior: dict  # geoloc.metrics.Prior.to_dict(): most frequent states and mean point


class PhaseObjects:
    """The current phase's scheduler and EMA as ONE checkpointed object.

    Registered once per run, so a checkpoint's layout never depends on which phases ran before it (a
    resumed phase-2 run registers the same single object as the uninterrupted one).
    """

    def __init__(self):
        self.scheduler = None
        self.ema = None

    def state_dict(self) -> dict:
        return {
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if (self.ema is None) != (state["ema"] is None):
            raise TrainingError(
                "checkpoint and run disagree on EMA (train.ema_decay): resume with the same config"
            )
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])


@dataclass
class RunContext:
    """Everything the phases share, built once by :func:`prepare_context`."""

    cfg: Config
    opts: RunOptions
    accelerator: object  # accelerate.Accelerator
    run_dir: Path
    shards: dict[str, list[str]]  # split -> shard urls
    counts: dict[str, int]  # split -> samples (from the manifest)
    manifest: dict
    labels: LabelTables
    preprocess: dict  # image_size, mean, std (from the backbone checkpoint)
    preprocessor: torch.nn.Module  # uint8 views -> normalised float pixels, on the device
    tracker: object  # geoloc.train.tracking.MetricsLogger
    checkpoints: object  # geoloc.train.checkpoint.CheckpointManager
    phase_objects: PhaseObjects  # registered for checkpointing once per run

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


# ----------------------------------------------------------------------------- accelerator


def make_accelerator(cfg: Config, opts: RunOptions):
    """An Accelerator from the launch config (env); gloo on CPU, where the NCCL default cannot work."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration

    from geoloc.train.tracking import log_with

    # NCCL cannot run on CPU; a single plain process must get no backend at all (no process group)
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers = [InitProcessGroupKwargs(backend="gloo")] if several and not torch.cuda.is_available() else []
    accelerator = Accelerator(  # gradient accumulation is set per phase (geoloc.train.engine.prepare)
        log_with=log_with(opts.report_to),
        project_config=ProjectConfiguration(
            project_dir=str(opts.output_dir), automatic_checkpoint_naming=False
        ),
        kwargs_handlers=handlers,
    )
    if accelerator.num_processes > 1 and accelerator.distributed_type == DistributedType.NO:
        # e.g. `accelerate launch --multi_gpu` without GPUs: N processes that never talk to each other
        raise TrainingError(
            f"{accelerator.num_processes} processes were launched but accelerate set up no distributed "
            "backend (no GPU?); on CPU launch with ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu ..."
        )
    if accelerator.is_main_process:
        for warning in launch_warnings(cfg, accelerator):
            log.warning(warning)
    return accelerator


def launch_warnings(cfg: Config, accelerator) -> list[str]:
    """Launch settings that run, but not as the config or the user most likely meant."""
    warnings = [precision_warning(str(accelerator.distributed_type), accelerator.device.type,
                                  accelerator.mixed_precision)]  # fmt: skip
    if is_deepspeed(accelerator):
        ds_clip = accelerator.state.deepspeed_plugin.deepspeed_config.get("gradient_clipping", 0.0)
        warnings.append(clip_warning(cfg.train.clip_grad, ds_clip))
    return [w for w in warnings if w is not None]


def precision_warning(distributed_type: str, device_type: str, mixed_precision: str) -> str | None:
    """A warning when DeepSpeed on GPU would train in fp32 (the shipped ZeRO configs need the flag)."""
    if distributed_type.endswith("DEEPSPEED") and device_type == "cuda" and mixed_precision == "no":
        return (
            "DeepSpeed is training in fp32 (mixed_precision 'no'): about twice the memory and several times "
            "slower than bf16. The ZeRO configs take their precision from the launcher: "
            "accelerate launch --config_file accelerate_configs/4xa100_zero2.yaml --mixed_precision bf16 ..."
        )
    return None


def clip_warning(clip_grad: float, ds_clipping) -> str | None:
    """A warning when ``train.clip_grad`` differs from the DeepSpeed JSON's ``gradient_clipping``.

    Under DeepSpeed the engine clips (``"auto"`` becomes accelerate's 1.0, absent means no clipping).
    """
    effective = 1.0 if ds_clipping == "auto" else float(ds_clipping or 0.0)
    if effective == float(clip_grad):
        return None
    return (
        f"train.clip_grad={clip_grad} is not used under DeepSpeed: the engine clips gradients to the JSON's "
        f"gradient_clipping={effective} (0 = off); set the two alike to silence this"
    )


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def input_dtype(accelerator) -> torch.dtype:
    """The dtype model inputs must have: DeepSpeed bf16 runs the module itself in bf16 (no autocast)."""
    if is_deepspeed(accelerator) and accelerator.mixed_precision == "bf16":
        return torch.bfloat16
    return torch.float32


# ----------------------------------------------------------------------------- labels


def _json_members(url: str):
    """The parsed ``.json`` members of one shard, streamed (local path or any URL WebDataset opens)."""
    import webdataset as wds

    with wds.gopen(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".json"):
                yield json.loads(tar.extractfile(member).read())


def scan_labels(urls: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Original state index ``(N,)`` and lat/lon ``(N, 2)`` of every labelled sample in ``urls``."""
    states, latlon = [], []
    for url in urls:
        for meta in _json_members(url):
            if meta.get("state_idx") is None:
                raise TrainingError(f"{url}: training sample {meta.get('sample_id')!r} has no state_idx")
            states.append(int(meta["state_idx"]))
            latlon.append((float(meta["lat"]), float(meta["lon"])))
    return np.asarray(states, dtype=np.int64), np.asarray(latlon, dtype=np.float64).reshape(-1, 2)


def sidecar_labels(manifest: dict, location: str, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The split's labels from ``labels.csv`` beside a local manifest (written by shard_dataset.py)."""
    name = manifest.get("labels_file")
    path = Path(location).parent / name if name and Path(location).is_file() else None
    if path is None or not path.is_file():
        return None
    table = pd.read_csv(path, dtype={"sample_id": str})
    table = table[table["split"] == split]
    return table["state_idx"].to_numpy(np.int64), table[["lat", "lon"]].to_numpy(np.float64)


def train_labels(accelerator, manifest: dict, location: str, split: str, urls: list[str]):
    """Train labels ``(N,)``, ``(N, 2)``: from labels.csv when it is there (cheap), else streamed from the
    shards' JSON members (every train tar read once, spread over the ranks)."""
    found = sidecar_labels(manifest, location, split)
    expected = manifest["splits"][split]["count"]
    if found is not None and len(found[0]) == expected:
        return found
    return gathered_train_labels(accelerator, urls)


def gathered_train_labels(accelerator, urls: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`scan_labels` with the shards spread over the ranks, gathered on every rank."""
    from accelerate.utils import gather_object

    rank, world = accelerator.process_index, accelerator.num_processes
    parts = gather_object([scan_labels(urls[rank::world])])
    return np.concatenate([s for s, _ in parts]), np.concatenate([ll for _, ll in parts])


def label_tables(encoder: LabelEncoder, states: np.ndarray, latlon: np.ndarray) -> LabelTables:
    """Centroids and their distance matrix from the train labels; the prior baseline."""
    from geoloc.geo import distance_matrix, state_centroids
    from geoloc.metrics import Prior

    classes = encoder.encode(states)
    try:
        centroids = state_centroids(latlon[:, 0], latlon[:, 1], classes, encoder.num_classes)  # (C, 2)
    except ValueError as err:
        raise TrainingError(f"train split: {err} (every class of the label encoder needs a sample)") from None
    centroids = torch.as_tensor(centroids, dtype=torch.float32)
    return LabelTables(encoder, centroids, distance_matrix(centroids), Prior.fit(states, latlon).to_dict())


# ----------------------------------------------------------------------------- data


def manifest_location(spec: str, manifest: str | None) -> str | None:
    """Where manifest.json is: given explicitly (any path or URL), else beside local shards."""
    if manifest:
        return manifest
    folder = Path(spec) if Path(spec).is_dir() else Path(spec).parent
    return str(folder / "manifest.json") if (folder / "manifest.json").is_file() else None


def read_json_url(url: str) -> dict:
    """A JSON file from a local path or any URL WebDataset opens (``pipe:``, ``https://``)."""
    import webdataset as wds

    try:
        with wds.gopen(url) as stream:
            return json.loads(stream.read())
    except Exception as err:  # noqa: BLE001 - every failure is reported with the URL
        raise TrainingError(f"{url}: cannot read the shard manifest ({type(err).__name__}: {err})") from None


def shard_lists(cfg: Config, spec: str, manifest_url: str | None = None):
    """-> train/val shard urls, sample counts, the manifest and where it was read from."""
    # the manifest sits beside local shards, or comes from --manifest (a path or URL) for remote shards
    from geoloc.data import resolve_shards

    location = manifest_location(spec, manifest_url)
    if location is None:
        raise TrainingError(
            f"{spec}: no manifest.json beside the shards; write them with shard_dataset.py, or pass "
            "--manifest PATH_OR_URL when the shards are URLs"
        )
    manifest = read_json_url(location)
    splits = {"train": cfg.data.train_split, "val": cfg.data.val_split}
    shards, counts = {}, {}
    for role, split in splits.items():
        try:
            shards[role] = resolve_shards(spec, split, manifest)
        except (FileNotFoundError, ValueError) as err:
            raise TrainingError(str(err)) from None
        counts[role] = int(manifest["splits"][split]["count"])
    return shards, counts, manifest, location


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
    from geoloc.train.tracking import MetricsLogger

    accelerator = make_accelerator(cfg, opts)
    set_seed(cfg.train.seed)  # same head initialisation on every rank
    run_dir = Path(opts.output_dir)
    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.yaml")
    shards, counts, manifest, location = shard_lists(cfg, opts.shards, opts.manifest)
    encoder = LabelEncoder.from_dict(manifest["label_encoder"])
    states, latlon = train_labels(accelerator, manifest, location, cfg.data.train_split, shards["train"])
    labels = label_tables(encoder, states, latlon)
    preprocess, preprocessor = device_preprocessor(cfg, accelerator.device, input_dtype(accelerator))
    tracker = MetricsLogger(run_dir, accelerator, opts.report_to, config=config_to_dict(cfg))
    checkpoints = CheckpointManager(run_dir, accelerator, cfg.train.keep_checkpoints)
    phase_objects = PhaseObjects()
    accelerator.register_for_checkpointing(phase_objects)
    return RunContext(
        cfg, opts, accelerator, run_dir, shards, counts, manifest, labels, preprocess, preprocessor,
        tracker, checkpoints, phase_objects,
    )  # fmt: skip
