"""Command line of ``train.py``: flags -> typed config -> :func:`geoloc.train.phases.run`.

    accelerate launch --config_file accelerate_configs/4xa100.yaml train.py --config cfg.yaml \
        --shards shards/ --output-dir runs/exp1 [--preset smoke] [--phase both] [--resume latest] \
        [--report-to wandb] [--push-to-hub OWNER/NAME] [model.backbone=/path/to/clip train.epochs_frozen=3 ...]

Only argparse and the config module are imported before the flags are parsed, so ``--help`` answers at
once; torch, transformers and DeepSpeed load when the run starts.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from geoloc.config import PRESETS, ConfigError, load_config
from geoloc.hub import HubError, check_push_target
from geoloc.writable import OutputPathError, check_dir_writable

PHASES = ("both", "frozen", "finetune")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train the multi-view geolocation model: phase 1 trains fusion and heads on a frozen "
        "backbone (on cached embeddings by default), phase 2 fine-tunes the backbone. Launch with "
        "`accelerate launch [--config_file accelerate_configs/X.yaml] train.py ...` for several GPUs or "
        "DeepSpeed; plain `python train.py ...` runs one process.",
        epilog="Any further argument of the form section.key=value overrides the config, e.g. "
        "model.backbone=/path/to/clip train.batch_size=16 loss.soft_labels=state train.cache_embeddings=false. "
        "Precedence: defaults < --config < --preset < key=value.",
    )
    p.add_argument(
        "--config", metavar="FILE", help="YAML config file (sections data, model, loss, train, infer)"
    )
    p.add_argument(
        "--shards",
        required=True,
        metavar="DIR",
        help="shard directory written by shard_dataset.py (holds manifest.json, labels.csv and the "
        "train-/val- tar shards); for remote shards a template WebDataset can open, where {shard} "
        "becomes each shard name the manifest lists, e.g. 'pipe:aws s3 cp s3://bucket/shards/{shard} -' "
        "(with --manifest)",
    )
    p.add_argument(
        "--manifest",
        metavar="PATH_OR_URL",
        help="the shards' manifest.json when it is not beside them (any path or URL WebDataset opens)",
    )
    p.add_argument(
        "--output-dir",
        required=True,
        type=Path,
        metavar="RUN",
        help="run directory: config.yaml, metrics.jsonl, curves.png, checkpoints/ and the best "
        "model in RUN/model/ (what infer.py loads)",
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="named overrides; 'smoke' shrinks everything for a quick CPU check",
    )
    p.add_argument(
        "--phase",
        choices=PHASES,
        default="both",
        help="both (default): frozen then finetune; frozen: phase 1 only; finetune: phase 2 only "
        "(starting from --init-from if given, else from the pretrained backbone and fresh heads)",
    )
    p.add_argument(
        "--init-from",
        type=Path,
        metavar="MODEL_DIR",
        help="an exported model directory (RUN/model) whose weights start the run, e.g. phase 2 "
        "after a separate phase-1 run",
    )
    p.add_argument(
        "--resume",
        metavar="latest|PATH",
        help="continue from a checkpoint: 'latest' takes the newest one in RUN/checkpoints "
        "(starting fresh if there is none); a path names one checkpoint directory",
    )
    p.add_argument(
        "--report-to",
        choices=("none", "wandb"),
        default="none",
        help="extra experiment tracker besides RUN/metrics.jsonl (wandb honours WANDB_MODE=offline)",
    )
    p.add_argument(
        "--stop-after-steps",
        type=int,
        default=0,
        metavar="K",
        help="debugging/tests: end the run abruptly after K optimiser updates in total, as a "
        "crash would (no extra checkpoint is written); 0 = off",
    )
    p.add_argument(
        "--push-to-hub",
        metavar="OWNER/NAME",
        help="after training, upload RUN/model (weights, config.json, model card README.md, index) to this "
        "Hugging Face model repository (geoloc.hub); checked at start-up: needs a token and no offline mode",
    )
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse flags, validate the config, run; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # overrides may sit before and after the flags
    try:
        cfg = load_config(args.config, args.overrides, args.preset)
        check_dir_writable(args.output_dir, "--output-dir")  # before hours of work, not at the first save
        token = check_push_target(args.push_to_hub) if args.push_to_hub else None  # idem: not after training
    except (ConfigError, OutputPathError, HubError) as err:
        parser.error(str(err))
    from geoloc.distributed import is_timeout, shutdown, timeout_message
    from geoloc.errors import GeolocError, RunInterrupted
    from geoloc.train.context import RunOptions  # heavy imports start here
    from geoloc.train.phases import run

    opts = RunOptions(
        shards=args.shards,
        output_dir=args.output_dir,
        phase=args.phase,
        resume=args.resume,
        init_from=args.init_from,
        report_to=args.report_to,
        stop_after_steps=args.stop_after_steps,
        manifest=args.manifest,
    )
    try:
        run(cfg, opts)
    except RunInterrupted as err:
        print(f"train.py: {err}", file=sys.stderr)
        return 3
    except GeolocError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 1
    except RuntimeError as err:
        if not is_timeout(err):
            raise
        rank = int(os.environ.get("RANK", "0"))
        print(f"train.py: error: {timeout_message(rank, cfg.train.dist_timeout_s, 'train.dist_timeout_s')}\n"
              f"  ({str(err).splitlines()[0][:300]})", file=sys.stderr)  # fmt: skip
        return 1
    shutdown()
    if args.push_to_hub and int(os.environ.get("RANK", "0")) == 0:
        return push_after_training(args.output_dir / "model", args.push_to_hub, token)
    return 0


def push_after_training(model_dir: Path, repo_id: str, token: str) -> int:
    """Upload the exported model (main process only, after every collective); 1 with a message on failure."""
    from geoloc.hub import push_model_dir

    if not model_dir.is_dir():
        print(f"train.py: error: --push-to-hub: no model was exported to {model_dir}", file=sys.stderr)
        return 1
    try:
        url = push_model_dir(model_dir, repo_id, token=token)
    except HubError as err:
        print(f"train.py: error: --push-to-hub: {err}", file=sys.stderr)
        return 1
    print(f"pushed {model_dir} to {repo_id}: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
