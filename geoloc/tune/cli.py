"""Command line of ``python -m geoloc.tune``: flags -> base config, study options -> the study -> best.yaml.

Only argparse and the config module load before the flags are parsed (``--help`` answers at once);
optuna, torch and the trainer load when the study starts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from geoloc.config import PRESETS, ConfigError, load_config
from geoloc.writable import OutputPathError, check_dir_writable

DESCRIPTION = """\
Hyper-parameter search over train.py's config with Optuna: each trial trains in this process (by
default the frozen phase only, on the shared embedding cache, so a trial costs seconds to minutes),
reports its val score after every epoch (median pruning stops the poor ones early) and records its run
directory and scores in the study. The study lives in --storage and resumes where it stopped when the
same command is run again; several workers may share it. The best trial's config is written as
OUT/<study>/best.yaml, which `train.py --config` takes.

Under `accelerate launch` (DDP or DeepSpeed, N ranks) every rank trains every trial together; rank 0
talks to the study. For cheap frozen-phase trials one single-process worker per GPU on a shared storage
gives more trials per hour."""

EPILOG = """\
Any further section.key=value argument overrides the base config (as in train.py) and holds that key
fixed: it is left out of the search. The search space (geoloc/tune/space.py) is:
{space}"""


def space_help() -> str:
    from geoloc.tune.space import SPACE

    def when(dim) -> str:
        parts = ([f"with the {dim.head} head"] if dim.head else []) + (["--finetune"] if dim.finetune else [])
        return f" ({', '.join(parts)})" if parts else ""

    return "\n".join(f"  {key}: {dim.describe()}{when(dim)}" for key, dim in SPACE.items())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m geoloc.tune", description=DESCRIPTION, epilog=EPILOG.format(space=space_help()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add = p.add_argument
    add("--shards", required=True, metavar="DIR", help="shard directory (or URL template), as in train.py")
    add("--manifest", metavar="PATH_OR_URL", help="the shards' manifest.json when not beside them")
    add("--output-dir", required=True, type=Path, metavar="OUT",
        help="OUT/study.db (the default storage) and OUT/<study>/: trial-NNNN/ run dirs, best.yaml, summary.json")  # fmt: skip
    add("--config", metavar="FILE", help="base YAML config (every trial starts from it)")
    add("--preset", choices=sorted(PRESETS), help="named overrides of the base config, as in train.py")
    add("--study-name", default="geoloc", metavar="NAME", help="the study in the storage (default: geoloc)")
    add("--storage", metavar="URL",
        help="SQLAlchemy URL of the study database, e.g. sqlite:///study.db or postgresql://host/db "
        "(default: sqlite:///OUT/study.db). Several processes may share it; sqlite needs a filesystem "
        "with working locks (local disk), a server database suits several machines")  # fmt: skip
    add("--n-trials", type=int, default=20, metavar="N",
        help="finished (complete or pruned) trials the study should hold; a rerun continues up to N")  # fmt: skip
    add("--timeout-s", type=float, metavar="S", help="start no new trial after S seconds")
    add("--finetune", action="store_true",
        help="trials train both phases (and search train.backbone_lr, train.layer_decay); default: the "
        "frozen phase only, on the embedding cache")  # fmt: skip
    add("--build-index", action="store_true",
        help="build each trial's retrieval index and decoder table; the objective is then the val score "
        "of the decoder that wins on val (default: the best epoch's val score with the config's decoding)")  # fmt: skip
    add("--params", nargs="+", metavar="KEY", help="search only these keys of the space")
    add("--sampler-seed", type=int, default=0, metavar="S",
        help="TPE sampler seed (give concurrent workers different seeds)")  # fmt: skip
    add("--prune-startup", type=int, default=5, metavar="N", help="no pruning until N trials finished")
    add("--prune-warmup", type=int, default=1, metavar="E", help="never prune in a trial's first E epochs")
    add("--prune-below", type=float, metavar="SCORE",
        help="also prune a trial whose epoch val score is below SCORE (after start-up and warm-up)")  # fmt: skip
    add("--heartbeat-s", type=int, default=60, metavar="S",
        help="trial heartbeat; a trial silent for 2 x S (its process died) is failed and retried once")  # fmt: skip
    add("--report-to", choices=("none", "wandb"), default="none",
        help="track each trial in wandb too, grouped by study name (WANDB_MODE=offline works)")  # fmt: skip
    add("overrides", nargs="*", metavar="section.key=value", help="base config overrides (held fixed)")
    return p


def check_args(args) -> None:
    """Numeric flags in range; raises ConfigError naming the flag."""
    for flag, value, low in (("--n-trials", args.n_trials, 1), ("--prune-startup", args.prune_startup, 0),
                             ("--prune-warmup", args.prune_warmup, 0), ("--heartbeat-s", args.heartbeat_s, 1)):  # fmt: skip
        if value < low:
            raise ConfigError(f"{flag} {value}: must be >= {low}")
    if args.timeout_s is not None and not args.timeout_s > 0:
        raise ConfigError(f"--timeout-s {args.timeout_s}: must be > 0")


def prepare(args):
    """-> (Setup, StudyOptions) from the flags; ConfigError / OutputPathError name the flag or key."""
    from geoloc.tune.space import override_keys, searched_keys
    from geoloc.tune.study import StudyOptions
    from geoloc.tune.trial import Setup

    check_args(args)
    base = load_config(args.config, args.overrides, args.preset)
    keys = searched_keys(base, args.finetune, override_keys(args.overrides), args.params)
    if not keys:
        raise ConfigError("nothing to search: every key of the space is fixed or unused by this model")
    check_dir_writable(args.output_dir, "--output-dir")
    out = args.output_dir.resolve()
    setup = Setup(base, args.shards, args.manifest, out / args.study_name, args.study_name, args.finetune,
                  args.build_index, args.report_to)  # fmt: skip
    opts = StudyOptions(
        storage=args.storage or f"sqlite:///{out / 'study.db'}", name=args.study_name, n_trials=args.n_trials,
        keys=tuple(keys), sampler_seed=args.sampler_seed, prune_startup=args.prune_startup,
        prune_warmup=args.prune_warmup, prune_below=args.prune_below, heartbeat_s=args.heartbeat_s,
        timeout_s=args.timeout_s,
    )  # fmt: skip
    return setup, opts


def conclude(study, setup, started: float) -> int:
    """best.yaml and summary.json, and the lines that say what the study found; the exit status."""
    from geoloc.tune.study import summary, write_best

    best = write_best(study, setup, setup.study_dir / "best.yaml")
    result = summary(study, setup) | {"wall_s_this_process": round(time.perf_counter() - started, 1)}
    (setup.study_dir / "summary.json").write_text(json.dumps(result, indent=2, default=str))
    c = result["counts"]
    print(f"tune: study {study.study_name!r}: {c['COMPLETE']} complete, {c['PRUNED']} pruned, {c['FAIL']} "
          f"failed trials; {result['wall_s_this_process']:.0f} s in this process")  # fmt: skip
    if best is None:
        print("tune: error: no trial completed, so no best config was written", file=sys.stderr)
        return 1
    if result["baseline"] is not None:
        print(f"tune: baseline (the base config) val score {result['baseline']['value']:.4f}")
    print(f"tune: best trial {best.number}: val score {best.value:.4f} ({setup.objective}) with "
          f"{best.params}\ntune: wrote {setup.study_dir / 'best.yaml'} (train.py --config) and summary.json")  # fmt: skip
    return 0


def run_study(setup, opts) -> int:
    """Rank 0 leads the study and writes its results; the other ranks follow. Returns the exit status."""
    from geoloc.tune.study import follow, lead, open_study
    from geoloc.tune.trial import start_ranks

    started = time.perf_counter()
    rank = start_ranks(setup)
    if rank != 0:
        follow(setup)
        return 0
    setup.study_dir.mkdir(parents=True, exist_ok=True)
    study = open_study(opts, setup)
    ran = lead(study, opts, setup)
    print(f"tune: this process ran {ran} trial(s)")
    return conclude(study, setup, started)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    try:
        setup, opts = prepare(args)
    except (ConfigError, OutputPathError) as err:
        parser.error(str(err))
    from geoloc.distributed import shutdown
    from geoloc.errors import GeolocError

    try:
        code = run_study(setup, opts)
    except GeolocError as err:
        print(f"tune: error: {err}", file=sys.stderr)
        return 1
    shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
