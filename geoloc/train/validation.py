"""Validation each epoch: the competition score of the val split, every sample counted once.

Through the full model this is :func:`geoloc.predict.predict` + :func:`geoloc.predict.evaluate`, the
same code infer.py reports with. On cached embeddings (phase 1) the rows are scored directly, with the
same :class:`geoloc.predict.Predictions` and ``evaluate``.
"""

from __future__ import annotations

import numpy as np
import torch

from geoloc.train.context import RunContext, TrainingError


def prior(ctx: RunContext):
    from geoloc.metrics import Prior

    return Prior.from_dict(ctx.labels.prior)


@torch.no_grad()
def validate_cached(ctx: RunContext, model, table, forward) -> dict:
    """Score the val embeddings with ``forward(model, rows)``; every rank scores all rows.

    (The same forward count on every rank, as ZeRO-3 needs, and nothing to gather.)
    """
    from geoloc.distributed import eval_module
    from geoloc.predict import Predictions, evaluate

    model = eval_module(model)  # no DDP buffer broadcast per forward (all ranks score all rows anyway)
    was_training = model.training
    model.eval()
    decode, parts = ctx.decoder(), []
    for rows in torch.arange(len(table)).split(ctx.cfg.train.eval_batch_size):
        parts.append({k: v.cpu() for k, v in decode(forward(model, table.rows(rows))).items()})
    model.train(was_training)
    preds = Predictions(
        sample_id=np.asarray(table.sample_id, dtype=object),
        label=table.label.numpy(),
        latlon=table.latlon.numpy(),
        n_views=table.view_mask.sum(1).numpy(),
        values={k: torch.cat([p[k] for p in parts]).numpy() for k in parts[0]},
    )
    return evaluate(preds, ctx.labels.encoder, prior(ctx))


def validate_pixels(ctx: RunContext, model) -> dict:
    """Score the val shards through the full model with geoloc.predict (the numbers infer.py reports)."""
    from geoloc.predict import evaluate, predict
    from geoloc.train.cache import eval_batches

    acc = ctx.accelerator
    loader = ctx.eval_loader("val", ctx.cfg.train.eval_batch_size)
    total = eval_batches(ctx.counts["val"], ctx.cfg.train.eval_batch_size, acc.num_processes)
    ctx.preprocessor.eval()
    # predict() unwraps DDP/DeepSpeed (no collective per batch) and runs ZeRO-3 partitions in lockstep
    batch = ctx.cfg.train.eval_batch_size  # every forward padded to it: results independent of the layout
    preds = predict(
        model, loader, ctx.preprocessor, acc, dtype=ctx.eval_dtype, total=total, batch_size=batch,
        decoder=ctx.decoder(),
    )  # fmt: skip
    if len(preds) != ctx.counts["val"]:
        raise TrainingError(f"validation saw {len(preds)} val samples, the manifest has {ctx.counts['val']}")
    return evaluate(preds, ctx.labels.encoder, prior(ctx))
