"""Run a model over an evaluation loader on every rank and gather the predictions by sample id.

Shared by the trainer's validation and by ``infer.py``, so both report identical numbers. Each rank
predicts the samples its loader yields and keeps them locally; ranks may see different numbers of
batches, so the loop holds no collective: the forwards go through :func:`geoloc.distributed.eval_module`
(no DDP wrapper, whose every forward broadcasts buffers) and the only collective is ONE ``gather_object``
at the very end. ZeRO-3 partitioned parameters are the exception (every forward gathers them): then the
ranks run in :func:`geoloc.distributed.lockstep`, idle ranks forwarding a padding sample that is dropped.
The gathered rows are sorted by sample id and de-duplicated (a sample seen twice must have the same
prediction; none is ever lost).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from geoloc.contract import VIEWS
from geoloc.data.decoding import IMAGE_SIZE
from geoloc.faults import fault_point
from geoloc.preprocess import crop_views

PROB_ATOL = 1e-3  # two copies of one sample may differ by batch-dependent rounding (bf16), not more
PAD_ID = "__lockstep_padding__"  # the filler sample of an idle rank under lockstep: never kept


@dataclass
class Predictions:
    """Per-sample outputs, numpy arrays aligned on ``sample_id`` (sorted after gathering).

    ``values`` holds the decoded predictions by name: ``state_probs`` (N, C) float32 over contiguous
    classes and ``gps`` (N, 2) float32 degrees (see :mod:`geoloc.decoders`), and any further per-sample
    array a caller asked for (e.g. ``embedding``). Rows whose sample had no readable view
    (``n_views == 0``) carry NaN values: the model saw nothing, so the caller must predict them from the
    prior (see ``geoloc.infer.submission``).
    """

    sample_id: np.ndarray  # (N,) str
    label: np.ndarray  # (N,) int64 contiguous class, -1 when unlabelled
    latlon: np.ndarray  # (N, 2) float32 true (lat, lon), NaN when unlabelled
    n_views: np.ndarray  # (N,) int64 readable views the model saw
    values: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (N, ...) float32

    def __len__(self) -> int:
        return len(self.sample_id)

    @property
    def probs(self) -> np.ndarray:
        """(N, C) state probabilities."""
        return self.values["state_probs"]

    @property
    def gps(self) -> np.ndarray:
        """(N, 2) predicted (lat, lon) in degrees."""
        return self.values["gps"]

    def take(self, index) -> Predictions:
        """Rows ``index`` (an integer array or a boolean mask) of every field and value."""
        rows = {k: getattr(self, k)[index] for k in ROW_FIELDS}
        return Predictions(**rows, values={k: v[index] for k, v in self.values.items()})

    def to_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in ROW_FIELDS}, "values": dict(self.values)}

    @property
    def has_views(self) -> np.ndarray:
        """(N,) bool: the model saw at least one view of the sample."""
        return self.n_views > 0

    @property
    def labelled(self) -> np.ndarray:
        """(N,) bool: the sample has a true state (val/train splits)."""
        return self.label >= 0


ROW_FIELDS = ("sample_id", "label", "latlon", "n_views")


def empty_predictions() -> Predictions:
    """Zero rows and no values (a rank whose loader yielded nothing)."""
    return Predictions(
        sample_id=np.array([], dtype=object),
        label=np.zeros((0,), np.int64),
        latlon=np.zeros((0, 2), np.float32),
        n_views=np.zeros((0,), np.int64),
    )


def concat_predictions(parts: list[Predictions]) -> Predictions:
    """Stack rows of several parts, field by field (order kept; no sorting, no de-duplication)."""
    if not parts:
        raise ValueError("concat_predictions needs at least one part")
    filled = [p for p in parts if len(p)] or parts[:1]  # an empty rank's part has no values
    keys = {tuple(sorted(p.values)) for p in filled}
    widths = {tuple(v.shape[1:] for _, v in sorted(p.values.items())) for p in filled}
    if len(keys) > 1 or len(widths) > 1:
        raise ValueError(f"parts disagree on their values or their widths: {sorted(keys)}, {sorted(widths)}")
    rows = {k: np.concatenate([getattr(p, k) for p in filled]) for k in ROW_FIELDS}
    values = {k: np.concatenate([p.values[k] for p in filled]) for k in filled[0].values}
    return Predictions(**rows, values=values)


def dedupe_by_id(preds: Predictions, atol: float = PROB_ATOL) -> Predictions:
    """Sort rows by sample id and keep one row per id.

    Raises ``ValueError`` naming the sample when two rows share an id but differ (a loader or gather
    bug must never silently pick one of two answers).
    """
    ids = preds.sample_id.astype(str)
    order = np.argsort(ids, kind="stable")
    preds = preds.take(order)
    ids = ids[order]
    first = np.ones(len(ids), dtype=bool)
    first[1:] = ids[1:] != ids[:-1]
    for i in np.flatnonzero(~first):
        _check_same_row(preds, i - 1, i, atol)  # sorted: a duplicate sits right after its twin
    return preds.take(first)


def _check_same_row(preds: Predictions, i: int, j: int, atol: float) -> None:
    exact = [preds.label, preds.n_views]
    close = [preds.latlon, *preds.values.values()]
    same = all(np.array_equal(a[i], a[j]) for a in exact) and all(
        np.allclose(a[i], a[j], atol=atol, rtol=0, equal_nan=True) for a in close
    )
    if not same:
        raise ValueError(f"sample {preds.sample_id[i]!r} was predicted twice with different results")


def gather_predictions(local: Predictions, accelerator) -> Predictions:
    """One ``gather_object`` of every rank's rows, then sort + de-duplicate; the result is on every rank."""
    from accelerate.utils import gather_object

    parts = gather_object([local.to_dict()])  # a list with one dict per rank
    return dedupe_by_id(concat_predictions([Predictions(**p) for p in parts]))


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 autocast on GPU, plain fp32 elsewhere (CPU bf16 is slow and changes results)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def forward_values(predictor, pixels_fn, images, view_mask, tta_scales) -> dict[str, torch.Tensor]:
    """A batch's decoded values (``state_probs`` (B, C), ``gps`` (B, 2), ...), averaged over TTA scales.

    ``predictor(pixels, view_mask) -> {name: (B, ...)}``; ``pixels_fn(images (B, V, 3, H, W) uint8) ->
    (B, V, 3, S, S) float``. Rows without any view get an all-True mask so the model never averages zero
    views; their values are NaN.
    """
    has_view = view_mask.any(dim=1)  # (B,)
    safe_mask = view_mask | ~has_view[:, None]  # (B, V)
    total: dict[str, torch.Tensor] = {}
    for scale in tta_scales:
        for name, value in predictor(pixels_fn(crop_views(images, scale)), safe_mask).items():
            total[name] = total.get(name, 0.0) + value.float()
    nan = torch.tensor(float("nan"), device=images.device)
    seen = {k: has_view.view(-1, *([1] * (v.dim() - 1))) for k, v in total.items()}  # (B, 1, ...)
    return {k: torch.where(seen[k], v / len(tta_scales), nan) for k, v in total.items()}


def pad_rows(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad dim 0 to ``size`` rows; padded samples have an all-False view mask (outputs dropped)."""
    if x.shape[0] >= size:
        return x
    return torch.cat([x, x.new_zeros((size - x.shape[0], *x.shape[1:]))])


def _batch_rows(batch: dict, values: dict[str, torch.Tensor], n: int) -> Predictions:
    """A batch's first ``n`` rows (the rest is padding) of outputs and targets as numpy rows."""
    return Predictions(
        sample_id=np.asarray(list(batch["sample_id"]), dtype=object),
        label=batch["label"].cpu().numpy().astype(np.int64),
        latlon=batch["latlon"].cpu().numpy().astype(np.float32),
        n_views=batch["view_mask"].sum(dim=1).cpu().numpy().astype(np.int64),
        values={k: v[:n].cpu().numpy().astype(np.float32) for k, v in values.items()},
    )


def padding_batch(num_views: int = len(VIEWS), size: int = IMAGE_SIZE) -> dict:
    """One unlabelled sample without views: what an idle rank forwards under lockstep (then dropped)."""
    return {
        "images": torch.zeros(1, num_views, 3, size, size, dtype=torch.uint8),
        "view_mask": torch.zeros(1, num_views, dtype=torch.bool),
        "label": torch.full((1,), -1, dtype=torch.int64),
        "latlon": torch.full((1, 2), float("nan")),
        "sample_id": [PAD_ID],
    }


def _loader_len(loader) -> int | None:
    try:
        return len(loader)
    except TypeError:  # an IterableDataset loader may not know its length
        return None


@torch.no_grad()
def predict(
    model,
    loader,
    preprocessor,
    accelerator,
    *,
    dtype: torch.dtype | None = None,
    tta_scales: tuple[float, ...] | None = None,
    progress: bool = True,
    batch_size: int | None = None,
    total: int | None = None,
    decoder=None,
) -> Predictions:
    """Predict every sample of ``loader`` (this rank's share) and gather all ranks' rows.

    ``model(pixels, view_mask)`` returns a dict of outputs; ``decoder`` (a :class:`geoloc.decoders.Decoder`)
    turns them into ``state_probs`` (B, C) and ``gps`` (B, 2) (an ensemble decodes itself: no decoder);
    ``preprocessor`` maps uint8 ``(B, V, 3, H, W)`` to normalised float pixels on the device. ``dtype``
    defaults to bf16 on GPU and fp32 on CPU. ``tta_scales`` are centre-crop fractions averaged over
    (default: ``(1.0,)``). A short batch is zero-padded to ``batch_size`` rows (default: the largest batch
    seen so far): with one shape for every forward, a sample's outputs do not depend on which batch it fell
    in, so 1 and N processes give bit-identical predictions. The model's train/eval mode is restored
    afterwards (the trainer calls this mid-training). A wrapped model (DDP, DeepSpeed) is unwrapped first,
    so that no collective hides in the loop. Returns the gathered predictions, sorted by sample id, on
    every rank.
    """
    from geoloc.distributed import eval_module, lockstep, needs_lockstep

    model = eval_module(model)
    predictor = model if decoder is None else (lambda pixels, mask: decoder(model(pixels, mask)))
    total = total or _loader_len(loader)  # batches of this rank, for the progress bar
    if needs_lockstep(model):
        loader = lockstep(loader, accelerator, padding_batch)
    was_training = model.training
    model.eval()
    bar = tqdm(
        total=total, desc="predict", unit="batch", disable=not (progress and accelerator.is_main_process)
    )
    with _autocast(accelerator.device, dtype or default_dtype(accelerator.device)):
        rows = _predict_rows(
            predictor, loader, preprocessor, accelerator, tuple(tta_scales or (1.0,)), batch_size, bar
        )
    bar.close()
    model.train(was_training)
    local = concat_predictions(rows) if rows else empty_predictions()  # a rank may get no batch
    local = local.take(local.sample_id != PAD_ID)
    return gather_predictions(local, accelerator)


def _predict_rows(predictor, loader, preprocessor, accelerator, scales, batch_size, bar) -> list[Predictions]:
    """This rank's batches through ``predictor``, each padded to one shape; no collective inside."""
    device, rows, pad_to = accelerator.device, [], batch_size or 0
    n_seen, t0 = 0, time.perf_counter()
    for batch in loader:
        images = batch["images"].to(device, non_blocking=True)  # (B, V, 3, H, W) uint8
        view_mask = batch["view_mask"].to(device, non_blocking=True)  # (B, V) bool
        n = images.shape[0]
        pad_to = max(pad_to, n)
        values = forward_values(
            predictor, preprocessor, pad_rows(images, pad_to), pad_rows(view_mask, pad_to), scales
        )
        rows.append(_batch_rows(batch, values, n))
        fault_point("predict.batch")  # crash tests: one rank dies mid-way
        n_seen += n
        bar.update(1)
        rate = n_seen * accelerator.num_processes / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix({"samples/s": f"{rate:.1f}"})  # all ranks, assuming they keep pace
    return rows


def evaluate(preds: Predictions, encoder, prior=None) -> dict:
    """Competition metrics (score, parts, accuracies, km statistics) on the labelled rows of ``preds``.

    The top 5 are decoded to ORIGINAL state indices before scoring. Rows with no readable view are
    predicted by ``prior`` (a ``geoloc.metrics.Prior``); without one they are an error, naming the ids.
    """
    from geoloc.metrics import competition_metrics

    lab = preds.take(preds.labelled)
    if len(lab) == 0:
        raise ValueError("evaluate: no labelled sample (is this the test split?)")
    top5, latlon = point_predictions(lab, encoder, prior)
    true_state = encoder.decode(lab.label)
    return competition_metrics(top5, true_state, latlon, lab.latlon.astype(np.float64))


def point_predictions(preds: Predictions, encoder, prior=None) -> tuple[np.ndarray, np.ndarray]:
    """``(N, 5)`` original state indices and ``(N, 2)`` lat/lon, rows without views from ``prior``."""
    from geoloc.metrics import top5_from_probs

    blind = ~preds.has_views
    if blind.any() and prior is None:
        ids = preds.sample_id[blind][:10].tolist()
        raise ValueError(f"{int(blind.sum())} sample(s) had no readable view and no prior was given: {ids}")
    probs = np.where(blind[:, None], 0.0, preds.probs).astype(np.float32)  # NaN rows are replaced below
    top5 = np.asarray(top5_from_probs(probs, encoder), dtype=np.int64)
    latlon = preds.gps.astype(np.float64)
    if blind.any():
        prior_top5, prior_latlon = prior.predict(int(blind.sum()))
        top5[blind] = np.asarray(prior_top5, dtype=np.int64)
        latlon[blind] = np.asarray(prior_latlon, dtype=np.float64)
    return top5, latlon
