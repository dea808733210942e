"""The runs behind ``infer.py``: load the models on every rank, predict, write the outputs on the main rank.

Every rank builds the same ensemble and reads its own share of the data; ``geoloc.predict.predict``
gathers all rows once at the end. Only the main process writes; the other ranks end right after the
gather (no collective after it, so an error while writing cannot leave them waiting forever).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from geoloc.contract import SAMPLE_SUBMISSION, DataContractError, read_submission_template
from geoloc.data import make_eval_loader, read_manifest, resolve_shards
from geoloc.export import LoadedModel, load_model_dir
from geoloc.infer.calibrate import fit_temperature
from geoloc.infer.cli import InferError
from geoloc.infer.ensemble import Ensemble, check_same_labels, identity
from geoloc.infer.raw import make_raw_loader
from geoloc.infer.report import write_report
from geoloc.infer.submission import SubmissionError, blind_ids, build_submission, write_submission
from geoloc.infer.tta import parse_scales
from geoloc.metrics import Prior
from geoloc.predict import Predictions, predict
from geoloc.preprocess import Preprocessor

log = logging.getLogger(__name__)


def make_accelerator():
    """An Accelerator for inference; without a GPU, CPU processes (accelerate then picks gloo)."""
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def load_members(paths: list[Path], device) -> list[LoadedModel]:
    """Every ``--model`` directory on ``device`` (eval mode); they must share one label encoder."""
    try:
        members = [load_model_dir(p, device) for p in paths]
    except (FileNotFoundError, ValueError) as err:
        raise InferError(str(err)) from None
    try:
        check_same_labels([m.encoder for m in members], [str(p) for p in paths])
    except ValueError as err:
        raise InferError(str(err)) from None
    return members


def member_preprocessor(member: LoadedModel, device) -> Preprocessor:
    pre = member.preprocess
    return Preprocessor(int(pre["image_size"]), pre["mean"], pre["std"]).to(device).eval()


def prior_of(member: LoadedModel, path: Path) -> Prior:
    """The model's prior baseline (5 most frequent states, mean point): the answer for a blind sample."""
    try:
        return Prior.from_dict(member.prior)
    except (KeyError, TypeError, ValueError) as err:
        raise InferError(f"{path}: geoloc.json has no usable prior ({err!r}): {member.prior}") from None


def build_ensemble(members, accelerator, weights=None, temperatures=None) -> Ensemble:
    pres = [member_preprocessor(m, accelerator.device) for m in members]
    return Ensemble([m.model for m in members], pres, weights, temperatures).eval()


def shard_loader(args, split: str, accelerator, encoder):
    try:
        shards = resolve_shards(args.shards, split)
    except FileNotFoundError as err:
        raise InferError(str(err)) from None
    return make_eval_loader(
        shards, batch_size=args.batch_size, rank=accelerator.process_index,
        world_size=accelerator.num_processes, num_workers=args.num_workers, encoder=encoder,
    )  # fmt: skip


def find_template(args) -> Path:
    """``--template``, else beside the data: ROOT/sample_submission.csv or the manifest's data root."""
    if args.template:
        return args.template
    if args.data_root:
        return args.data_root / SAMPLE_SUBMISSION
    manifest = read_manifest(args.shards)
    if not manifest or not manifest.get("data_root"):
        raise InferError(f"{args.shards}: no manifest.json with a data_root; pass --template")
    return Path(manifest["data_root"]) / SAMPLE_SUBMISSION


def read_template(path: Path):
    try:
        return read_submission_template(path)
    except DataContractError as err:
        raise InferError(f"{err} (pass --template to point at sample_submission.csv)") from None


def calibrate(args, members, accelerator) -> list[float]:
    """One temperature per member, fitted on the val split of ``--shards`` (every rank gets the same)."""
    temps = []
    for path, member in zip(args.model, members):
        single = build_ensemble([member], accelerator)
        loader = shard_loader(args, "val", accelerator, member.encoder)
        val = predict(
            single, loader, identity, accelerator, progress=not args.no_progress, batch_size=args.batch_size
        )
        lab = val.take(val.labelled & val.has_views)
        temps.append(fit_temperature(lab.probs, lab.label))
        if accelerator.is_main_process:
            print(f"calibrated {path}: temperature {temps[-1]:.3f} on {len(lab)} val samples")
    return temps


def run_models(args, members, loader, accelerator, temperatures=None) -> Predictions:
    model = build_ensemble(members, accelerator, args.weights, temperatures)
    return predict(
        model, loader, identity, accelerator, tta_scales=parse_scales(args.tta), progress=not args.no_progress
    )


def gathered_stats(loader, accelerator) -> dict[str, int]:
    """Bad/missing view counts summed over ranks (one more gather, on every rank)."""
    from accelerate.utils import gather_object

    stats = (
        loader.stats if hasattr(loader, "stats") else loader.dataset.stats
    )  # shard Loader | raw DataLoader
    parts = gather_object([stats.as_dict()])
    return {k: sum(p[k] for p in parts) for k in parts[0]}


def run_predict(args) -> int:
    """Predict ``--split`` (test) of ``--shards`` or the raw ``--data-root`` and write ``--out``."""
    accelerator = make_accelerator()
    template_path = find_template(args)
    template = read_template(template_path)
    members = load_members(args.model, accelerator.device)
    temps = calibrate(args, members, accelerator) if args.calibrate else None
    encoder = members[0].encoder
    if args.data_root:
        loader = make_raw_loader(
            args.data_root, template, batch_size=args.batch_size, rank=accelerator.process_index,
            world_size=accelerator.num_processes, num_workers=args.num_workers,
        )  # fmt: skip
    else:
        loader = shard_loader(args, args.split or "test", accelerator, encoder)
    preds = run_models(args, members, loader, accelerator, temps)
    stats = gathered_stats(loader, accelerator)
    if not accelerator.is_main_process:
        return 0
    try:
        sub = build_submission(template, preds, encoder, prior_of(members[0], args.model[0]))
        write_submission(sub, args.out, template)
    except (ValueError, SubmissionError) as err:
        raise InferError(str(err)) from None
    summary = {
        "submission": str(args.out), "rows": len(sub), "template": str(template_path),
        "processes": accelerator.num_processes, "models": [str(m) for m in args.model],
        "weights": args.weights, "temperatures": temps, "tta_scales": list(parse_scales(args.tta)),
        "from_prior": blind_ids(preds), "views": stats,
    }  # fmt: skip
    print(f"wrote {args.out}: {len(sub)} rows, predicted on {accelerator.num_processes} process(es)")
    print(json.dumps(summary))
    return 0


def run_eval(args) -> int:
    """Evaluate on a labelled split (default val) and write the report to ``--out-dir``."""
    accelerator = make_accelerator()
    members = load_members(args.model, accelerator.device)
    temps = calibrate(args, members, accelerator) if args.calibrate else None
    encoder = members[0].encoder
    split = args.split or "val"
    try:
        loader = shard_loader(args, split, accelerator, encoder)
        preds = run_models(args, members, loader, accelerator, temps)
    except KeyError as err:  # a val state the model does not know
        raise InferError(f"{args.shards} ({split}): {err.args[0]}") from None
    if not accelerator.is_main_process:
        return 0
    context = {
        "split": split, "shards": str(args.shards), "models": [str(m) for m in args.model],
        "weights": args.weights, "temperatures": temps, "tta_scales": list(parse_scales(args.tta)),
        "processes": accelerator.num_processes, "from_prior": blind_ids(preds.take(preds.labelled)),
    }  # fmt: skip
    try:
        report = write_report(
            args.out_dir, preds, encoder, members[0].centroids, prior_of(members[0], args.model[0]), context
        )
    except ValueError as err:
        raise InferError(str(err)) from None
    print(
        f"{split}: score {report['score']:.4f} (cls {report['cls_score']:.4f}, gps {report['gps_score']:.4f}, "
        f"mean {report['mean_km']:.0f} km) on {int(report['n'])} samples, {accelerator.num_processes} process(es); "
        f"report in {args.out_dir}"
    )
    return 0
