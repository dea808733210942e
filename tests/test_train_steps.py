"""Trainer pieces in one process: the CLI, the embedding cache, cached-vs-backbone steps, non-finite loss."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from geoloc.config import load_config
from geoloc.train import cli
from geoloc.train.cache import cache_key, epoch_batches


@pytest.fixture
def make_ctx(tiny_clip_dir, tiny_shards, tmp_path):
    """``make_ctx(*overrides)`` -> a RunContext on the tiny data (one process, fp32 on CPU)."""
    from accelerate.state import AcceleratorState

    from geoloc.train.context import RunOptions, prepare_context

    def make(*overrides):
        base = [f"model.backbone={tiny_clip_dir}", f"train.cache_dir={tmp_path / 'cache'}"]
        cfg = load_config(None, base + list(overrides), preset="smoke")
        return prepare_context(cfg, RunOptions(shards=str(tiny_shards), output_dir=tmp_path / "run"))

    yield make
    AcceleratorState._reset_state(True)


# ----------------------------------------------------------------------------- command line


def test_help_is_fast_and_imports_nothing_heavy():
    code = (
        "import sys; from geoloc.train.cli import build_parser; build_parser().format_help(); "
        "print([m for m in ('torch', 'transformers', 'deepspeed', 'accelerate') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_flag_has_help():
    parser = cli.build_parser()
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in flags} >= {
        "config",
        "shards",
        "output_dir",
        "preset",
        "phase",
        "resume",
        "report_to",
    }
    assert all(a.help and len(a.help) > 20 for a in flags), [a.dest for a in flags if not a.help]


def test_bad_override_is_a_usage_error_naming_the_key(tmp_path, capsys):
    # overrides may come before and after the flags; the bad key (not argparse) is what gets reported
    argv = ["train.epochs_frozen=1", "--shards", str(tmp_path), "--output-dir", str(tmp_path / "run"),
            "--phase", "frozen", "train.no_such_key=1"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no_such_key" in err and "unrecognized" not in err


# ----------------------------------------------------------------------------- cache pieces


def test_epoch_batches_equal_steps_per_rank_cover_all_rows_and_follow_the_seed():
    n, b, world = 37, 8, 2
    ranks = [epoch_batches(n, b, epoch=0, seed=1, rank=r, world_size=world) for r in range(world)]
    assert ranks[0].shape == ranks[1].shape == (3, b)  # ceil(37 / 16) full batches on each rank
    assert set(torch.cat([r.flatten() for r in ranks]).tolist()) == set(range(n))
    assert torch.equal(ranks[0], epoch_batches(n, b, epoch=0, seed=1, rank=0, world_size=world))
    assert not torch.equal(ranks[0], epoch_batches(n, b, epoch=1, seed=1, rank=0, world_size=world))
    assert not torch.equal(ranks[0], epoch_batches(n, b, epoch=0, seed=2, rank=0, world_size=world))


def test_cache_key_follows_what_the_numbers_depend_on():
    cfg = load_config(None, ["model.backbone=some/hub-id"])
    pre = {"image_size": 56, "mean": [0.5] * 3, "std": [0.25] * 3}
    manifest = {"splits": {"train": {"count": 3}}}
    key = cache_key(cfg, pre, manifest, torch.float32)
    assert key == cache_key(cfg, dict(pre), dict(manifest), torch.float32)
    other_pooling = replace(cfg, model=replace(cfg.model, pooling="cls"))
    changed = [
        cache_key(other_pooling, pre, manifest, torch.float32),
        cache_key(cfg, {**pre, "image_size": 112}, manifest, torch.float32),
        cache_key(cfg, pre, {"splits": {"train": {"count": 4}}}, torch.float32),
        cache_key(cfg, pre, manifest, torch.bfloat16),
    ]
    assert key not in changed and len(set(changed)) == len(changed)


# ----------------------------------------------------------------------------- steps


def _head_grads(module) -> dict:
    return {n: p.grad.clone() for n, p in module.named_parameters() if not n.startswith("backbone.")}


def test_cached_step_equals_the_step_through_the_frozen_backbone(make_ctx, monkeypatch):
    from geoloc.data import make_eval_loader
    from geoloc.train import cache
    from geoloc.train.engine import build_geo_model
    from geoloc.train.loop import compute_loss
    from geoloc.train.phases import cached_forward, frozen_phase, pixel_forward

    ctx = make_ctx()
    cached = frozen_phase(ctx, build_geo_model(ctx, None))  # computes and saves the cache
    direct_ctx = replace(ctx, cfg=replace(ctx.cfg, train=replace(ctx.cfg.train, cache_embeddings=False)))
    direct = frozen_phase(direct_ctx, build_geo_model(direct_ctx, None))
    batch = next(iter(make_eval_loader(ctx.shards["train"], batch_size=8, encoder=ctx.labels.encoder)))
    table = cache.load_or_compute(ctx, None)["train"]
    rows = table.rows(torch.tensor([table.sample_id.index(i) for i in batch["sample_id"]]))

    results = []
    for forward, model, inputs in (
        (cached_forward, cached.model, rows),
        (pixel_forward, direct.model, batch),
    ):
        model.train()
        torch.manual_seed(0)  # same dropout masks in the heads
        out = forward(ctx, model, inputs) if forward is cached_forward else forward(ctx, True, model, inputs)
        loss, _ = compute_loss(ctx, out, inputs)
        loss.backward()
        results.append((loss.detach(), _head_grads(model)))
    (loss_c, grads_c), (loss_d, grads_d) = results
    assert torch.isfinite(loss_c) and loss_c > 0
    torch.testing.assert_close(loss_c, loss_d, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads_d.keys() and len(grads_c) > 4
    for name in grads_c:
        torch.testing.assert_close(grads_c[name], grads_d[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(g.abs().sum() > 0 for g in grads_c.values())
    assert all(p.grad is None for p in direct.model.backbone.parameters())  # frozen: no backbone grads

    # the second request reads the saved files instead of running the backbone again
    monkeypatch.setattr(cache, "compute_tables", lambda *a, **k: pytest.fail("cache not reused"))
    again = cache.load_or_compute(ctx, None)
    assert again["train"].sample_id == table.sample_id and torch.equal(again["train"].emb, table.emb)
    assert table.sample_id == sorted(table.sample_id) and len(table) == ctx.counts["train"]


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(make_ctx, monkeypatch):
    from geoloc.train import loop
    from geoloc.train.checkpoint import STATE_FILE, CheckpointManager
    from geoloc.train.context import TrainingError
    from geoloc.train.phases import run

    real, calls = loop.compute_loss, []

    def poisoned(ctx, out, batch):  # the 3rd batch's loss becomes NaN
        loss, parts = real(ctx, out, batch)
        calls.append(1)
        return (loss * float("nan"), parts * float("nan")) if len(calls) == 3 else (loss, parts)

    monkeypatch.setattr(loop, "compute_loss", poisoned)
    ctx = make_ctx("train.save_every_steps=1")
    # phase 1 on the cache: 36 train rows, batch 32 -> 2 steps an epoch, so step 3 is epoch 2, batch 1
    with pytest.raises(
        TrainingError, match=r"non-finite loss .* at step 3 \(phase frozen, epoch 2, batch 1\)"
    ) as err:
        run(ctx.cfg, ctx.opts)
    latest = CheckpointManager(ctx.run_dir, ctx.accelerator, keep=2).latest()
    assert latest is not None and str(latest) in str(err.value)
    state = json.loads((latest / STATE_FILE).read_text())["state"]
    assert (state["phase"], state["global_step"]) == ("frozen", 2)


# ----------------------------------------------------------------------------- epoch end, DeepSpeed config


def _fake_ctx(patience: int, zero_stage: int = 0, ds_config: dict | None = None):
    """Just what end_of_epoch / configure_deepspeed touch, recording the calls."""
    from types import SimpleNamespace as NS

    cfg = load_config(None, [f"train.patience={patience}", "train.grad_accum=2"])
    calls = {"saved": [], "logged": []}
    plugin = NS(deepspeed_config=ds_config or {}, zero_stage=zero_stage)
    ctx = NS(
        cfg=cfg,
        accelerator=NS(is_main_process=False, num_processes=4, state=NS(deepspeed_plugin=plugin)),
        tracker=NS(log=lambda metrics, step: calls["logged"].append(metrics)),
        checkpoints=NS(save=lambda tag, state: calls["saved"].append(dict(state))),
        zero_stage=zero_stage,
    )
    return ctx, calls


def test_epoch_end_exports_only_improvements_and_stops_after_patience():
    from types import SimpleNamespace as NS

    from geoloc.train.loop import TrainState, end_of_epoch

    ctx, calls = _fake_ctx(patience=2)
    scores = iter([0.5, 0.4, 0.6, 0.55, 0.58, 0.9])
    phase = NS(name="finetune", epochs=10, ema=None, model=None, validate=lambda: {"score": next(scores)})
    exported, state = [], TrainState("finetune")
    while not state.finished:
        state.epoch += 1
        end_of_epoch(ctx, phase, state, lambda p, m, s: exported.append((s.epoch, m["score"])))
    assert exported == [(1, 0.5), (3, 0.6)]  # best so far only
    assert state.epoch == 5 and state.best_score == 0.6  # epochs 4 and 5 did not improve: patience 2
    assert [s["epoch"] for s in calls["saved"]] == [1, 2, 3, 4, 5]  # a checkpoint after every epoch
    assert calls["saved"][-1]["finished"] and calls["logged"][-1]["val/best_score"] == 0.6


def test_deepspeed_config_gets_batch_sizes_buckets_and_zero3_gathering():
    from geoloc.train.engine import configure_deepspeed

    ds = {
        "train_micro_batch_size_per_gpu": 256,
        "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"},
    }
    ctx, _ = _fake_ctx(patience=0, zero_stage=3, ds_config=ds)
    configure_deepspeed(ctx, batch_size=8, hidden_size=32)  # a second engine: earlier values are replaced
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["train_batch_size"] == 8 * 2 * 4
    assert ds["zero_optimization"]["reduce_bucket_size"] == 32 * 32
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize("key", ["scheduler", "optimizer"])
def test_deepspeed_json_with_its_own_scheduler_or_optimizer_is_refused(key):
    from geoloc.train.context import TrainingError
    from geoloc.train.engine import configure_deepspeed

    ctx, _ = _fake_ctx(patience=0, zero_stage=2, ds_config={key: {"type": "X"}, "zero_optimization": {}})
    with pytest.raises(TrainingError, match=f"defines a '{key}'"):
        configure_deepspeed(ctx, batch_size=8, hidden_size=32)
