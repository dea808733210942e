"""Validation each epoch: the competition score of the val split, every sample counted once.

Through the full model this is :func:`geoloc.predict.predict` + :func:`geoloc.predict.evaluate`, the
same code infer.py reports with. On cached embeddings (phase 1) the rows are scored directly, with the
same :class:`geoloc.predict.Predictions` and ``evaluate``.
"""

from __future__ import annotations

import numpy as np
import torch

from geoloc.train.context import RunContext, TrainingError

PAD_ID = "__lockstep_padding__"  # a filler row for ZeRO-3 validation: unlabelled, so never scored


def prior(ctx: RunContext):
    from geoloc.metrics import Prior

    return Prior.from_dict(ctx.labels.prior)


@torch.no_grad()
def validate_cached(ctx: RunContext, model, table, forward) -> dict:
    """Score the val embeddings with ``forward(model, rows)``; every rank scores all rows.

    (The same forward count on every rank, as ZeRO-3 needs, and nothing to gather.)
    """
    from geoloc.predict import Predictions, evaluate

    was_training = model.training
    model.eval()
    probs, gps = [], []
    for rows in torch.arange(len(table)).split(ctx.cfg.train.eval_batch_size):
        out = forward(model, table.rows(rows))
        probs.append(torch.softmax(out.logits.float(), -1).cpu())
        gps.append(out.gps.float().cpu())
    model.train(was_training)
    preds = Predictions(
        sample_id=np.asarray(table.sample_id, dtype=object),
        probs=torch.cat(probs).numpy(),
        gps=torch.cat(gps).numpy(),
        label=table.label.numpy(),
        latlon=table.latlon.numpy(),
        n_views=table.view_mask.sum(1).numpy(),
    )
    return evaluate(preds, ctx.labels.encoder, prior(ctx))


def padding_batch(num_views: int) -> dict:
    """One unlabelled sample without views: forwarded by an idle ZeRO-3 rank, ignored by the scoring."""
    return {
        "images": torch.zeros(1, num_views, 3, 256, 256, dtype=torch.uint8),
        "view_mask": torch.zeros(1, num_views, dtype=torch.bool),
        "label": torch.full((1,), -1, dtype=torch.int64),
        "latlon": torch.full((1, 2), float("nan")),
        "sample_id": [PAD_ID],
    }


def lockstep(loader, ctx: RunContext):
    """Batches of ``loader``; ranks that run out forward padding until every rank is done.

    Needed under ZeRO-3 only: there every forward gathers parameters with a collective, so all ranks
    must make the same number of calls, while the eval loader gives ranks different batch counts.
    """
    acc, it = ctx.accelerator, iter(loader)
    while True:
        batch = next(it, None)
        if acc.gather(torch.tensor([batch is not None], device=acc.device)).sum() == 0:
            return
        yield batch if batch is not None else padding_batch(ctx.num_views)


class Sized:
    """An iterable with a length for progress bars (``geoloc.predict`` takes its bar's total from ``len``)."""

    def __init__(self, iterable, length: int):
        self.iterable, self.length = iterable, length

    def __iter__(self):
        return iter(self.iterable)

    def __len__(self) -> int:
        return self.length


def validate_pixels(ctx: RunContext, model) -> dict:
    """Score the val shards through the full model with geoloc.predict (the numbers infer.py reports)."""
    from geoloc.data import make_eval_loader
    from geoloc.predict import evaluate, predict
    from geoloc.train.cache import eval_batches

    acc = ctx.accelerator
    loader = make_eval_loader(
        ctx.shards["val"], batch_size=ctx.cfg.train.eval_batch_size, rank=acc.process_index,
        world_size=acc.num_processes, num_workers=ctx.cfg.data.num_workers, encoder=ctx.labels.encoder,
    )  # fmt: skip
    if ctx.zero_stage == 3:
        loader = lockstep(loader, ctx)
    loader = Sized(loader, eval_batches(ctx.counts["val"], ctx.cfg.train.eval_batch_size, acc.num_processes))
    ctx.preprocessor.eval()
    preds = predict(model, loader, ctx.preprocessor, acc, dtype=ctx.eval_dtype)
    preds = preds.take(preds.sample_id != PAD_ID)
    if len(preds) != ctx.counts["val"]:
        raise TrainingError(f"validation saw {len(preds)} val samples, the manifest has {ctx.counts['val']}")
    return evaluate(preds, ctx.labels.encoder, prior(ctx))
