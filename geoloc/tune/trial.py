"""One trial: its config and run directory, the trainer run in this process, and the score it reached.

The trainer runs in-process (``geoloc.train.phases.run``) so that the trial can report after every epoch
and be stopped there: :func:`reporter` is the run's ``on_epoch`` hook. Under a launcher every rank runs
every trial; rank 0 talks to the study and :func:`share` hands its trial and its pruning decisions to
the other ranks (one broadcast per trial and per epoch, the same on every rank).
"""

from __future__ import annotations

import gc
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from geoloc.config import Config
from geoloc.errors import GeolocError
from geoloc.tune.space import apply_params

SCORE_KEYS = ("score", "cls_score", "top1_acc", "top5_acc", "mean_km", "median_km")


class TuneError(GeolocError):
    """The study cannot go on (a study of other settings, a trial without a model); the message says why."""


@dataclass(frozen=True)
class Setup:
    """What every trial of this process shares (the same on every rank)."""

    base: Config  # defaults < --config < --preset < key=value: every trial starts from it
    shards: str
    manifest: str | None
    study_dir: Path  # OUT/<study name>: trial-NNNN/ run dirs, best.yaml, summary.json
    study_name: str
    finetune: bool  # both phases per trial, else the frozen phase only (on the embedding cache)
    build_index: bool  # the post-training index and decoder table per trial (the objective then)
    report_to: str = "none"

    @property
    def objective(self) -> str:
        """``decoders``: the val score of the decoder that won on val; ``epochs``: the best epoch's."""
        return "decoders" if self.build_index else "epochs"


def trial_config(setup: Setup, params: dict) -> Config:
    """The base config with the trial's values, and the index built only when the study asks for it."""
    cfg = apply_params(setup.base, params)
    return apply_params(cfg, {"train.build_index": setup.build_index}, "trial settings")


def run_dir(setup: Setup, number: int) -> Path:
    return setup.study_dir / f"trial-{number:04d}"


def epoch_step(cfg: Config, phase: str, epoch: int) -> int:
    """The step a trial reports at: the epoch counted over both phases (1-based)."""
    return epoch + (cfg.train.epochs_frozen if phase == "finetune" else 0)


# ----------------------------------------------------------------------------- ranks


def start_ranks(setup: Setup) -> int:
    """Under a launcher: the process group, built by an accelerator made as the trainer makes it (then
    dropped; the group stays for the trials), so that rank 0 can hand out the first trial. Returns this
    rank (0 in a single process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    from accelerate.state import AcceleratorState

    from geoloc.train.context import RunOptions
    from geoloc.train.engine import make_accelerator

    rank = make_accelerator(
        setup.base, RunOptions(shards=setup.shards, output_dir=setup.study_dir)
    ).process_index
    AcceleratorState._reset_state(True)
    return rank


def share(obj):
    """Rank 0's ``obj`` on every rank (one broadcast); ``obj`` itself in a single process."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    device = None
    if dist.get_backend() == "nccl":  # objects travel as tensors on the rank's own GPU
        device = torch.device("cuda", torch.cuda.current_device())
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]


# ----------------------------------------------------------------------------- one trial


def reporter(setup: Setup, trial):
    """The run's ``on_epoch``: rank 0 reports the val score to ``trial`` (None on the other ranks) and
    asks whether to prune; every rank gets the answer and raises ``optuna.TrialPruned`` together."""
    import optuna

    def on_epoch(phase: str, epoch: int, metrics: dict) -> None:
        prune = None
        if trial is not None:
            trial.report(float(metrics["score"]), epoch_step(setup.base, phase, epoch))
            prune = trial.should_prune()
        if share(prune):
            raise optuna.TrialPruned(f"pruned after {phase} epoch {epoch} (val score {metrics['score']:.4f})")

    return on_epoch


@contextmanager
def wandb_names(setup: Setup, number: int):
    """wandb runs of a study grouped under its name (wandb reads these variables at ``wandb.init``)."""
    if setup.report_to != "wandb":
        yield
        return
    names = {"WANDB_RUN_GROUP": setup.study_name, "WANDB_NAME": f"{setup.study_name}-trial-{number}"}
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update(names)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_trial(setup: Setup, number: int, params: dict, on_epoch) -> Path:
    """Train trial ``number`` with ``params`` in this process; returns its run directory.

    Whatever happens (pruned, failed), the accelerator state is reset so the next trial builds its own."""
    from accelerate.state import AcceleratorState

    from geoloc.train.context import RunOptions
    from geoloc.train.phases import run

    out = run_dir(setup, number)
    opts = RunOptions(
        shards=setup.shards, output_dir=out, phase="both" if setup.finetune else "frozen",
        report_to=setup.report_to, manifest=setup.manifest, on_epoch=on_epoch,
    )  # fmt: skip
    try:
        with wandb_names(setup, number):
            run(trial_config(setup, params), opts)
    finally:
        AcceleratorState._reset_state(True)  # the process group stays: the next trial reuses it
        gc.collect()  # the pruned run's model, optimiser and engine, held by the traceback until now
    return out


def trial_result(out: Path, objective: str) -> tuple[float, dict]:
    """The objective and the val figures of a finished trial, from its exported model's geoloc.json."""
    path = out / "model" / "geoloc.json"
    try:
        meta = json.loads(path.read_text())
        val = meta["extra"]["val"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise TuneError(f"{path}: no exported model with val metrics ({err}); did any epoch run?") from None
    attrs = {k: float(val[k]) for k in SCORE_KEYS if k in val}
    attrs |= {"best_phase": meta["extra"].get("phase"), "best_epoch": meta["extra"].get("epoch")}
    if objective != "decoders":
        return float(val["score"]), attrs
    table = meta.get("decoders_val") or []
    if not table:
        raise TuneError(f"{path}: no decoder table (decoders_val); was the index built?")
    best = max(table, key=lambda row: row["score"])
    return float(best["score"]), attrs | {"decoder": best["decoder"]}
