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
from geoloc.data import ShardSet, make_eval_loader
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


def make_accelerator(args):
    """An Accelerator for inference (without a GPU: CPU processes on gloo), its collective timeout from
    ``--dist-timeout``; a rank whose launcher dies stops (see geoloc.distributed)."""
    from accelerate import Accelerator

    from geoloc.distributed import maybe_trace_collectives, process_group_kwargs, start_parent_watchdog

    start_parent_watchdog()
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), kwargs_handlers=process_group_kwargs(args.dist_timeout)
    )
    maybe_trace_collectives(accelerator.process_index)
    return accelerator


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


def decode_overrides(args) -> dict:
    """The ``--decode-*`` / ``--knn-*`` flags given (each overrides the model's recorded default)."""
    flags = {
        "state": args.decode_state,
        "gps": args.decode_gps,
        "knn_alpha": args.knn_alpha,
        "knn_k": args.knn_k,
    }
    return {k: v for k, v in flags.items() if v is not None}


def member_decoder(member: LoadedModel, args, device, passthrough: tuple[str, ...] = ()):
    """The member's decoder: its recorded default (the one that won on val), with the flags' overrides;
    ``passthrough``: raw outputs it hands on too (``("embedding",)`` for --eval's picture)."""
    from geoloc.config import ConfigError

    try:
        spec = member.decode_config(**decode_overrides(args))
    except ConfigError as err:
        raise InferError(str(err)) from None
    # a DecoderError (no cell head, no index) names the option
    return member.decoder(spec, device, passthrough)


def build_ensemble(members, accelerator, args, weights=None, temperatures=None, embeddings=False) -> Ensemble:
    """The members as one module; ``embeddings``: the first member's fused embedding comes out too."""
    device = accelerator.device
    pres = [member_preprocessor(m, device) for m in members]
    keep = [("embedding",) if embeddings and i == 0 else () for i in range(len(members))]
    decoders = [member_decoder(m, args, device, k) for m, k in zip(members, keep)]
    return Ensemble([m.model for m in members], pres, decoders, weights, temperatures).eval()


def shard_set(args) -> ShardSet:
    """``--shards`` (a directory, pattern or ``{shard}`` template) and its validated manifest."""
    return ShardSet.open(args.shards, args.manifest)


def check_labels(data: ShardSet, split: str, encoder, labelled: bool) -> None:
    """The model must know every state of a labelled split; predicting data of another label set only
    warns (a model may know more states than the data has)."""
    if data.manifest["label_encoder"]["state_indices"] == list(encoder.state_indices):
        return
    unknown = sorted(set(data.encoder.state_indices) - set(encoder.state_indices))
    what = (f"{data.location}: the shards' states {list(data.encoder.state_indices)} differ from the model's "
            f"{list(encoder.state_indices)}")  # fmt: skip
    if labelled and unknown:
        raise InferError(f"{what}: the model cannot score states {unknown} of split {split!r}")
    log.warning("%s", what)


def shard_loader(args, data: ShardSet, split: str, accelerator, encoder):
    """This rank's share of ``split``; every shard's sample count is checked against the manifest (a
    truncated shard is an error naming it: no test sample may go missing)."""
    return make_eval_loader(
        data.urls(split), batch_size=args.batch_size, rank=accelerator.process_index,
        world_size=accelerator.num_processes, num_workers=args.num_workers, encoder=encoder,
        shard_counts=data.shard_counts(split),
    )  # fmt: skip


def find_template(args, data: ShardSet | None) -> Path:
    """``--template``, else beside the data: ROOT/sample_submission.csv or the manifest's data root."""
    if args.template:
        return args.template
    if args.data_root:
        return args.data_root / SAMPLE_SUBMISSION
    root = data.manifest.get("data_root")
    if not isinstance(root, str) or not root:
        raise InferError(f"{data.location}: no data_root; pass --template")
    return Path(root) / SAMPLE_SUBMISSION


def read_template(path: Path):
    try:
        return read_submission_template(path)
    except DataContractError as err:
        raise InferError(f"{err} (pass --template to point at sample_submission.csv)") from None


def calibrate(args, members, accelerator) -> list[float]:
    """One temperature per member, fitted on the val split of ``--shards`` (every rank gets the same)."""
    temps, data = [], shard_set(args)
    for path, member in zip(args.model, members):
        single = build_ensemble([member], accelerator, args)
        check_labels(data, "val", member.encoder, labelled=True)
        loader = shard_loader(args, data, "val", accelerator, member.encoder)
        val = predict(
            single, loader, identity, accelerator, progress=not args.no_progress, batch_size=args.batch_size
        )
        lab = val.take(val.labelled & val.has_views)
        temps.append(fit_temperature(lab.probs, lab.label))
        if accelerator.is_main_process:
            print(f"calibrated {path}: temperature {temps[-1]:.3f} on {len(lab)} val samples")
    return temps


def run_models(args, members, loader, accelerator, temperatures=None, embeddings=False) -> Predictions:
    """Predict ``loader`` with the ensemble; ``embeddings`` adds ``values["embedding"]`` (N, D') (--eval
    only: ~3 KB a sample gathered on every rank)."""
    model = build_ensemble(members, accelerator, args, args.weights, temperatures, embeddings)
    # every forward padded to --batch-size: a sample's outputs then do not depend on the batch or rank it
    # fell in (CPU kernels round per shape), so any number of processes gives bit-identical results
    return predict(
        model, loader, identity, accelerator, tta_scales=parse_scales(args.tta), progress=not args.no_progress,
        batch_size=args.batch_size,
    )  # fmt: skip


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
    accelerator = make_accelerator(args)
    data = None if args.data_root else shard_set(args)
    template_path = find_template(args, data)
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
        check_labels(data, args.split or "test", encoder, labelled=False)
        loader = shard_loader(args, data, args.split or "test", accelerator, encoder)
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
    accelerator = make_accelerator(args)
    data = shard_set(args)
    members = load_members(args.model, accelerator.device)
    temps = calibrate(args, members, accelerator) if args.calibrate else None
    encoder = members[0].encoder
    split = args.split or "val"
    check_labels(data, split, encoder, labelled=True)  # up front, not deep in a DataLoader worker
    loader = shard_loader(args, data, split, accelerator, encoder)
    preds = run_models(args, members, loader, accelerator, temps, embeddings=True)  # for embeddings.png
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
