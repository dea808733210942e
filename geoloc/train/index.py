"""After training: the exported model's retrieval index, and the decoder that wins on val.

Every rank reloads the exported best model (``RUN/model``) and embeds the train and val splits through it
once (the eval loader over all ranks, gathered by sample id: ``geoloc.predict.predict``). The train rows'
fused embeddings, classes, points and cells become the retrieval index (``RUN/model/index/``, its sha256
in geoloc.json); then every decoder the model can serve (:func:`candidates`) is scored on the val rows,
and the best becomes the model's default (``decoder`` in geoloc.json; the whole table under
``decoders_val``), which ``infer.py`` uses unless its flags say otherwise. The val split thus chooses the
decoder as it chose the epoch: its score is slightly optimistic, the test split's is not.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from geoloc.train.context import RunContext


def candidates(spec, heads: list[str]) -> list:
    """Every decoding the heads allow (with the index), as DecodeConfigs derived from ``spec``."""
    states = [s for s, head in (("head", "state"), ("cells", "cell")) if head in heads]
    points = [g for g, head in (("regression", "gps"), ("cell", "cell"), ("bayes", "cell")) if head in heads]
    return [
        replace(spec, state=s, gps=g, knn_alpha=a)
        for s in states
        for g in points + ["knn"]
        for a in (0.0, 0.5)
    ]


def raw_outputs(ctx: RunContext, loaded, role: str, keep: tuple[str, ...] | None = None):
    """Every sample of ``role`` through the loaded model: its raw outputs (embedding, logits, gps; only
    ``keep`` when given) as values, gathered on every rank."""
    from geoloc.predict import predict
    from geoloc.preprocess import Preprocessor

    pre = Preprocessor(**loaded.preprocess).to(ctx.accelerator.device).eval()
    loader = ctx.eval_loader(role, ctx.cfg.train.eval_batch_size)
    batch = ctx.cfg.train.eval_batch_size
    return predict(
        loaded.model, loader, pre, ctx.accelerator, dtype=ctx.eval_dtype, batch_size=batch,
        decoder=lambda out: {k: v for k, v in out.items() if keep is None or k in keep},
        progress=ctx.accelerator.is_main_process,
    )  # fmt: skip


def build_index(loaded, train, device="cpu"):
    """The retrieval index of the train rows (fused embeddings, classes, points, cells), on ``device``."""
    from geoloc.retrieval import EmbeddingIndex

    seen = train.take(train.has_views)
    cell = None
    if loaded.cells is not None:
        cell = loaded.cells.assign(seen.latlon, loaded.encoder.decode(seen.label))
    emb = torch.as_tensor(seen.values["embedding"])
    return EmbeddingIndex.build(emb, seen.label, seen.latlon.astype(np.float64), cell, device=device)


def score(loaded, index, spec, val) -> dict:
    """Competition metrics of the val rows decoded with ``spec`` (rows without views from the prior)."""
    from geoloc.decoders import Decoder
    from geoloc.metrics import Prior
    from geoloc.predict import evaluate

    device = index.device  # the accelerator's: the searches of every candidate run there
    decode = Decoder(spec, loaded.heads, loaded.encoder, loaded.cells, index, device)
    seen = val.has_views
    outputs = {k: torch.as_tensor(v[seen], device=device) for k, v in val.values.items()}
    decoded = {k: v.cpu().numpy() for k, v in decode(outputs).items()}
    values = {k: np.full((len(val), *v.shape[1:]), np.nan, np.float32) for k, v in decoded.items()}
    for k, v in decoded.items():
        values[k][seen] = v
    return evaluate(replace(val, values=values), loaded.encoder, Prior.from_dict(loaded.prior))


def choose_decoder(loaded, index, val) -> tuple[dict, list[dict]]:
    """The best candidate by val score, and the table of all (spec, score, mean km, top-1)."""
    table = []
    for spec in candidates(loaded.decode_config(), loaded.heads):
        m = score(loaded, index, spec, val)
        table.append(
            {"decoder": asdict(spec), "score": m["score"], "top1_acc": m["top1_acc"], "mean_km": m["mean_km"]}
        )
    best = max(table, key=lambda row: row["score"])
    return best["decoder"], table


def save_index(model_dir: Path, index, decoder: dict, table: list[dict]) -> str:
    """``model_dir/index/`` (written aside, then renamed) and geoloc.json's decoder, table and index hash."""
    from geoloc.export import INDEX_DIR, META
    from geoloc.fileio import file_sha256
    from geoloc.model_card import write_model_card

    tmp, final = model_dir / f".{INDEX_DIR}.tmp-{os.getpid()}", model_dir / INDEX_DIR
    shutil.rmtree(tmp, ignore_errors=True)
    index.save(tmp)
    digest = file_sha256(tmp / "index.safetensors")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    meta = json.loads((model_dir / META).read_text())
    meta |= {"decoder": decoder, "decoders_val": table, "index_sha256": digest}
    tmp_meta = model_dir / f".{META}.tmp-{os.getpid()}"
    tmp_meta.write_text(json.dumps(meta, indent=2))
    os.replace(tmp_meta, model_dir / META)  # the index is in place before geoloc.json names it
    write_model_card(model_dir)  # again: the card now shows the decoder table
    return digest


def finalize_model(ctx: RunContext) -> None:
    """Index the best model's training embeddings and record its best decoder; every rank calls.

    The model is reloaded whole (also under ZeRO-3) and run unwrapped: the two embedding passes hold no
    collective but their final gathers; the main process then writes while the others wait."""
    from geoloc.export import load_model_dir
    from geoloc.train.engine import whole_weights

    model_dir = ctx.run_dir / "model"
    ctx.accelerator.wait_for_everyone()
    with whole_weights(ctx):
        loaded = load_model_dir(model_dir, ctx.accelerator.device)
    train, val = raw_outputs(ctx, loaded, "train", keep=("embedding",)), raw_outputs(ctx, loaded, "val")
    if ctx.accelerator.is_main_process:
        index = build_index(loaded, train, ctx.accelerator.device)
        decoder, table = choose_decoder(loaded, index, val)
        save_index(model_dir, index, decoder, table)
        print_decoders(table, decoder)
    ctx.accelerator.wait_for_everyone()


def print_decoders(table: list[dict], decoder: dict) -> None:
    for row in sorted(table, key=lambda r: -r["score"]):
        d = row["decoder"]
        print(f"  decoder {d['state']:>5}+{d['gps']:<10} knn_alpha {d['knn_alpha']:.1f}: val score "
              f"{row['score']:.4f}, top-1 {row['top1_acc']:.3f}, mean {row['mean_km']:.0f} km")  # fmt: skip
    print(f"default decoder {decoder['state']}+{decoder['gps']} (knn_alpha {decoder['knn_alpha']})")
