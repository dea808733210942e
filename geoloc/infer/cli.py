"""Command line of ``infer.py``: predict a submission, validate one, or write an evaluation report.

    accelerate launch infer.py --model RUN/model [--model RUN2/model ...] [--weights 0.7 0.3] \
        (--shards DIR [--split test] | --data-root ROOT) --out submission.csv [--template CSV] \
        [--tta 1.0,0.9] [--calibrate] [--batch-size N] [--num-workers N]
    python infer.py --validate submission.csv --template ROOT/sample_submission.csv
    accelerate launch infer.py --eval --model RUN/model --shards DIR [--split val] --out-dir REPORT_DIR

Only argparse and the config module load before the flags are parsed (``--help`` is instant); torch,
transformers and accelerate load when a run starts. Every rank loads the model directories itself (no
DeepSpeed needed) and predicts its share of the data; the main process writes the outputs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from geoloc.config import DIST_TIMEOUT_S, GPS_DECODERS, STATE_DECODERS, InferConfig
from geoloc.errors import GeolocError


class InferError(GeolocError):
    """A user-facing problem (bad flag combination, missing file); printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    defaults = InferConfig()
    p = argparse.ArgumentParser(
        prog="infer.py",
        description="Predict the top 5 US states and a GPS point for every test sample and write a validated "
        "submission; or validate an existing submission (--validate); or evaluate on a labelled split and "
        "write a report (--eval). Launch with `accelerate launch infer.py ...` to spread the data over all "
        "GPUs (or CPU processes); plain `python infer.py ...` runs one process.",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--validate",
        metavar="CSV",
        type=Path,
        help="only check an existing submission against --template and list every problem; "
        "exit status 1 if it is invalid",
    )
    mode.add_argument(
        "--eval",
        action="store_true",
        help="evaluate on a labelled split (default val) of --shards and write report.json, "
        "confusion.png, map.png and errors_km.png to --out-dir",
    )
    p.add_argument(
        "--model",
        action="append",
        type=Path,
        metavar="DIR",
        help="exported model directory (RUN/model from train.py); repeat for an ensemble whose "
        "probabilities and GPS points are averaged",
    )
    p.add_argument(
        "--weights",
        nargs="+",
        type=float,
        metavar="W",
        help="one weight per --model for the ensemble average (normalised to sum 1; default equal)",
    )
    data = p.add_mutually_exclusive_group()
    data.add_argument(
        "--shards",
        metavar="DIR",
        help="shard directory from shard_dataset.py (or a brace pattern / URL of shards)",
    )
    data.add_argument(
        "--data-root",
        type=Path,
        metavar="ROOT",
        help="raw competition folder: reads ROOT/test_images through the template, no shards",
    )
    p.add_argument(
        "--manifest",
        metavar="PATH_OR_URL",
        help="the shards' manifest.json when it is not beside them (any path or URL WebDataset opens); "
        "needed when --shards is a URL template with {shard}",
    )
    p.add_argument(
        "--split", metavar="NAME", help="which split of --shards to read (default: test; with --eval: val)"
    )
    p.add_argument(
        "--out",
        type=Path,
        metavar="CSV",
        help="submission file to write (written to a temporary name, validated, then renamed)",
    )
    p.add_argument(
        "--out-dir", type=Path, metavar="DIR", help="--eval: folder for report.json and the pictures"
    )
    p.add_argument(
        "--template",
        type=Path,
        metavar="CSV",
        help="sample_submission.csv giving the rows, their order and the image names; default: "
        "ROOT/sample_submission.csv, or the data root recorded in DIR/manifest.json",
    )
    p.add_argument(
        "--tta",
        default=defaults.tta,
        metavar="SCALES",
        help="test-time augmentation: 'none' (default), 'scales' (the full view and centre crops "
        "keeping 0.9 and 0.8 of each side) or your own crop fractions like '1.0,0.85'; outputs are averaged. "
        "No horizontal flip: a mirror swaps the driving side",
    )
    p.add_argument(
        "--decode-state",
        choices=STATE_DECODERS,
        help="state probabilities from the state head ('head') or summed over the geocells ('cells'); "
        "default: what the model recorded as best on val",
    )
    p.add_argument(
        "--decode-gps",
        choices=GPS_DECODERS,
        help="the point: 'regression' (GPS head), 'cell' (most likely cell's centroid), 'bayes' (least "
        "expected distance over the top cells), 'knn' (nearest training samples; needs the model's index); "
        "default: what the model recorded as best on val",
    )
    p.add_argument(
        "--knn-alpha",
        type=float,
        metavar="A",
        help="blend the nearest training samples' state vote into the state probabilities with weight A "
        "in [0, 1] (needs the model's retrieval index); default: the model's",
    )
    p.add_argument("--knn-k", type=int, metavar="K", help="neighbours for --decode-gps knn / --knn-alpha")
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="fit one temperature per model on the val split of --shards (by NLL) and apply it to "
        "the logits before averaging; changes an ensemble's ranking, never a single model's",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        metavar="N",
        help=f"samples per batch and process (default {defaults.batch_size})",
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=defaults.num_workers,
        metavar="N",
        help=f"data loading worker processes per rank (default {defaults.num_workers}; capped by the "
        "shards each rank reads)",
    )
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=DIST_TIMEOUT_S,
        metavar="SECONDS",
        help=f"with several processes: how long a rank waits for the others at a collective before the job "
        f"ends (a stopped, hung or dead rank); default {DIST_TIMEOUT_S:g}",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def check_args(args, parser: argparse.ArgumentParser) -> None:
    """Flag combinations argparse cannot express; exits with a usage message naming the flag."""
    if args.validate:
        if not args.template:
            parser.error("--validate needs --template")
        return
    if not args.model:
        parser.error("give at least one --model")
    if not (args.shards or args.data_root):
        parser.error("give --shards DIR or --data-root ROOT")
    if args.weights and len(args.weights) != len(args.model):
        parser.error(f"{len(args.weights)} --weights for {len(args.model)} --model")
    if args.eval:
        if not args.shards:
            parser.error("--eval needs labelled --shards (the raw test folder has no labels)")
        if not args.out_dir:
            parser.error("--eval needs --out-dir")
    elif not args.out:
        parser.error("give --out submission.csv")
    if args.calibrate and not args.shards:
        parser.error("--calibrate fits on the val split of --shards")
    if args.batch_size < 1 or args.num_workers < 0:
        parser.error("--batch-size must be >= 1 and --num-workers >= 0")
    if not args.dist_timeout > 0:
        parser.error("--dist-timeout must be > 0 seconds")


def main(argv: list[str] | None = None) -> int:
    """Parse flags and run the chosen mode; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args, parser)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.validate:
            return validate_file(args.validate, args.template)
        check_outputs(args)  # before the models load: an unwritable output must not cost a whole run
        from geoloc.distributed import shutdown
        from geoloc.infer.run import run_eval, run_predict  # heavy imports start here

        code = run_eval(args) if args.eval else run_predict(args)
        shutdown()
        return code
    except GeolocError as err:
        print(f"infer.py: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from geoloc.distributed import is_timeout, timeout_message

        if not is_timeout(err):
            raise
        rank = int(os.environ.get("RANK", "0"))
        print(
            f"infer.py: error: {timeout_message(rank, args.dist_timeout, '--dist-timeout')}", file=sys.stderr
        )
        return 2


def check_outputs(args) -> None:
    """``--out`` is a writable file path (not a folder), ``--out-dir`` a writable folder."""
    from geoloc.writable import OutputPathError, check_dir_writable, check_file_writable

    try:
        if args.eval:
            check_dir_writable(args.out_dir, "--out-dir")
        else:
            check_file_writable(args.out, "--out")
    except OutputPathError as err:
        raise InferError(str(err)) from None


def validate_file(path: Path, template_path: Path) -> int:
    """``--validate``: print every problem (and warning) of ``path``; 0 when valid, 1 otherwise."""
    from geoloc.contract import DataContractError, read_submission_template
    from geoloc.infer.submission import check_submission

    try:
        template = read_submission_template(template_path)
    except DataContractError as err:
        raise InferError(str(err)) from None
    errors, warnings = check_submission(path, template)
    for w in warnings:
        print(f"{path}: warning: {w}")
    for e in errors:
        print(f"{path}: error: {e}")
    print(
        json.dumps({"file": str(path), "valid": not errors, "errors": len(errors), "warnings": len(warnings)})
    )
    return 1 if errors else 0
