"""Trainer pieces in one process: the CLI, the embedding cache, cached-vs-backbone steps, non-finite loss."""

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
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


def test_cache_key_holds_the_thumbnail_size_only_when_a_head_needs_thumbnails(monkeypatch):
    from geoloc.train import cache

    pre = {"image_size": 56, "mean": [0.5] * 3, "std": [0.25] * 3}
    plain = load_config(None, ["model.backbone=some/hub-id", "model.heads=[state,gps,metric]"])
    vae = load_config(None, ["model.backbone=some/hub-id", "model.heads=[state,gps,vae]"])
    keys = {name: cache_key(cfg, pre, {}, torch.float32) for name, cfg in (("plain", plain), ("vae", vae))}
    assert keys["plain"] != keys["vae"]  # the vae's tables hold thumbnails too
    assert keys["plain"] == cache_key(
        load_config(None, ["model.backbone=some/hub-id"]), pre, {}, torch.float32
    )
    monkeypatch.setattr(cache, "THUMB_SIZE", 8)  # other thumbnails: another vae cache, the same plain one
    assert cache_key(vae, pre, {}, torch.float32) != keys["vae"]
    assert cache_key(plain, pre, {}, torch.float32) == keys["plain"]


# ----------------------------------------------------------------------------- steps


def _head_grads(module) -> dict:
    return {n: p.grad.clone() for n, p in module.named_parameters() if not n.startswith("backbone.")}


@pytest.mark.parametrize("heads", [None, "[state,gps,metric,vae]"])
def test_cached_step_equals_the_step_through_the_frozen_backbone(make_ctx, monkeypatch, heads):
    """Also with the auxiliary heads: the VAE's targets are the cache's thumbnails in one step and
    thumbnails of the loader's views in the other; the metric head mines the same batch."""
    from geoloc.data import make_eval_loader
    from geoloc.heads import thumbnails
    from geoloc.train import cache
    from geoloc.train.engine import build_geo_model
    from geoloc.train.loop import compute_loss
    from geoloc.train.phases import cached_forward, frozen_phase, pixel_forward

    real_tqdm, bars = cache.tqdm, []
    monkeypatch.setattr(
        cache, "tqdm", lambda it, **kw: (bars.append((kw["desc"], kw["total"])), real_tqdm(it, **kw))[1]
    )
    metric = ["loss.metric_d_pos_km=1500", "loss.metric_bands=[all]"]  # triplets on 36 places
    extra = [] if heads is None else [f"model.heads={heads}", *metric]
    ctx = make_ctx(*extra)
    cached = frozen_phase(ctx, build_geo_model(ctx, None))  # computes and saves the cache
    assert bars == [("embed train", 3), ("embed val", 1)]  # bars with totals: ceil(36 / 16), ceil(12 / 16)
    direct_ctx = replace(ctx, cfg=replace(ctx.cfg, train=replace(ctx.cfg.train, cache_embeddings=False)))
    direct = frozen_phase(direct_ctx, build_geo_model(direct_ctx, None))
    batch = next(iter(make_eval_loader(ctx.shards["train"], batch_size=8, encoder=ctx.labels.encoder)))
    table = cache.load_or_compute(ctx, None)["train"]
    rows = table.rows(torch.tensor([table.sample_id.index(i) for i in batch["sample_id"]]))

    results, fresh = [], ctx.criterion.state_dict()
    for forward, model, inputs in (
        (cached_forward, cached.model, rows),
        (pixel_forward, direct.model, batch),
    ):
        model.train()
        torch.manual_seed(0)  # same dropout masks in the heads (and VAE draws)
        ctx.criterion.load_state_dict(fresh)  # the metric head's bandit picks the same band for both
        out = forward(ctx, model, inputs) if forward is cached_forward else forward(ctx, True, model, inputs)
        terms = compute_loss(ctx, out, inputs)
        terms["loss"].backward()
        results.append(({k: v.detach() for k, v in terms.items()}, _head_grads(model)))
    (terms_c, grads_c), (terms_d, grads_d) = results
    loss_c = terms_c["loss"]
    assert torch.isfinite(loss_c) and loss_c > 0
    assert terms_c.keys() == terms_d.keys()
    for name in terms_c:
        torch.testing.assert_close(terms_c[name], terms_d[name], rtol=1e-5, atol=1e-6, msg=name)
    assert ("thumb" in rows) == (heads is not None)  # thumbnails are cached only for the vae head
    if heads is not None:
        assert terms_c["loss_vae_rec"] > 0 and terms_c["metric_anchors"] > 0 and terms_c["loss_metric"] > 0
        assert torch.equal(
            rows["thumb"], thumbnails(batch["images"]) * batch["view_mask"][..., None, None, None]
        )
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
        terms = real(ctx, out, batch)
        calls.append(1)
        return {k: v * float("nan") for k, v in terms.items()} if len(calls) == 3 else terms

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
    calls = {"saved": [], "logged": [], "reported": []}
    plugin = NS(deepspeed_config=ds_config or {}, zero_stage=zero_stage)
    ctx = NS(
        cfg=cfg,
        accelerator=NS(is_main_process=False, num_processes=4, state=NS(deepspeed_plugin=plugin)),
        tracker=NS(log=lambda metrics, step: calls["logged"].append(metrics)),
        checkpoints=NS(save=lambda tag, state, parts: calls["saved"].append(dict(state))),
        zero_stage=zero_stage,
        # RunOptions.on_epoch (the tuner's hook), with how many checkpoints were written when it was called
        opts=NS(on_epoch=lambda ph, e, m: calls["reported"].append((ph, e, m["score"], len(calls["saved"])))),
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
    # the hook: once per epoch, with that epoch's metrics, after its checkpoint
    assert calls["reported"] == [("finetune", e, s, e) for e, s in enumerate([0.5, 0.4, 0.6, 0.55, 0.58], 1)]


def test_deepspeed_config_gets_batch_sizes_buckets_and_zero3_gathering():
    from geoloc.train.engine import configure_deepspeed

    ds = {
        "train_micro_batch_size_per_gpu": 256,
        "gradient_accumulation_steps": 2,
        "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"},
    }
    ctx, _ = _fake_ctx(patience=0, zero_stage=3, ds_config=ds)
    # a second engine (phase 2, its own accumulation): the first engine's values are replaced
    configure_deepspeed(ctx, batch_size=8, grad_accum=3, hidden_size=32)
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 8 * 3 * 4
    assert ds["zero_optimization"]["reduce_bucket_size"] == 32 * 32
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize("key", ["scheduler", "optimizer"])
def test_deepspeed_json_with_its_own_scheduler_or_optimizer_is_refused(key):
    from geoloc.train.context import TrainingError
    from geoloc.train.engine import configure_deepspeed

    ctx, _ = _fake_ctx(patience=0, zero_stage=2, ds_config={key: {"type": "X"}, "zero_optimization": {}})
    with pytest.raises(TrainingError, match=f"defines a '{key}'"):
        configure_deepspeed(ctx, batch_size=8, grad_accum=1, hidden_size=32)


# ----------------------------------------------------------------------------- launch warnings


def test_fp32_deepspeed_on_gpu_is_warned_with_the_launch_flag():
    from accelerate.utils import DistributedType as DT

    from geoloc.train.engine import precision_warning

    message = precision_warning(str(DT.DEEPSPEED), "cuda", "no")
    assert message and "--mixed_precision bf16" in message
    assert precision_warning(str(DT.DEEPSPEED), "cuda", "bf16") is None
    assert precision_warning(str(DT.DEEPSPEED), "cpu", "no") is None  # CPU runs are fp32 on purpose
    assert precision_warning(str(DT.MULTI_GPU), "cuda", "no") is None  # DDP configs set bf16 in the yaml


def test_clip_grad_differing_from_the_deepspeed_json_is_warned():
    from types import SimpleNamespace as NS

    from accelerate.utils import DistributedType as DT

    from geoloc.train.engine import clip_warning, launch_warnings

    assert clip_warning(1.0, 1.0) is None and clip_warning(1.0, "auto") is None  # accelerate fills 1.0
    message = clip_warning(0.5, 1.0)
    assert "train.clip_grad=0.5" in message and "gradient_clipping=1.0" in message
    assert "gradient_clipping=0.0" in clip_warning(1.0, None)  # no clipping in the JSON at all
    # both checks are wired into what make_accelerator logs
    plugin = NS(deepspeed_config={"gradient_clipping": 2.0})
    acc = NS(distributed_type=DT.DEEPSPEED, device=torch.device("cuda"), mixed_precision="no",
             state=NS(deepspeed_plugin=plugin))  # fmt: skip
    warnings = launch_warnings(load_config(None, ["train.clip_grad=1.0"]), acc)
    assert len(warnings) == 2 and "--mixed_precision bf16" in warnings[0] and "=2.0" in warnings[1]


# ----------------------------------------------------------------------------- phase 2, accumulation, seeds


def test_finetune_phase_has_its_own_batch_size_and_accumulation(make_ctx, monkeypatch):
    import geoloc.predict
    from geoloc.train.engine import build_geo_model
    from geoloc.train.phases import finetune_phase

    # 36 train rows: phase 2's 4 a batch -> 9 batches (batch_size 6 would give 6), 3 updates an epoch
    ctx = make_ctx("train.batch_size=6", "train.grad_accum=2", "train.finetune_batch_size=4",
                   "train.finetune_grad_accum=3", "train.epochs_finetune=2")  # fmt: skip
    phase = finetune_phase(ctx, build_geo_model(ctx, None))
    assert (phase.batch_size, phase.num_batches, phase.grad_accum) == (4, 9, 3)
    assert ctx.accelerator.gradient_accumulation_steps == 3  # backward divides by phase 2's accumulation
    assert phase.scheduler.lr_lambdas[0].keywords["total_steps"] == 3 * 2  # updates x epochs
    batch = next(iter(phase.batches(0)))
    assert len(batch["sample_id"]) == 4 and batch["images"].shape[0] == 4

    # the validation progress bar knows its length: ceil(12 val samples / eval batch 16) on one rank
    real, lengths = geoloc.predict.predict, []
    monkeypatch.setattr(geoloc.predict, "predict", lambda m, loader, *a, **k: (
        lengths.append(k["total"]), real(m, loader, *a, **k))[1])  # fmt: skip
    assert 0 <= phase.validate()["score"] <= 1 and lengths == [1]


def test_short_last_window_updates_with_the_mean_gradient_of_its_batches(monkeypatch):
    """grad_accum=3 over 4 batches: updates after batches 3 and 4, each the mean gradient of its window."""
    from types import SimpleNamespace as NS

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from geoloc.train import loop
    from geoloc.train.engine import prepare

    updates = []

    class Recording(torch.optim.SGD):  # lr 0: every batch's gradient is taken at the same weights
        def step(self, closure=None):
            updates.append(self.param_groups[0]["params"][0].grad.clone())
            return super().step(closure)

    def loss_of(out, batch):
        return {"loss": out.pow(2).mean()}

    monkeypatch.setattr(loop, "compute_loss", lambda ctx, out, batch: loss_of(out, batch))
    torch.manual_seed(0)
    xs = torch.randn(4, 2, 3)  # 4 batches of 2 rows
    module = torch.nn.Linear(3, 1, bias=False)
    want = []
    for x in xs:  # each batch's own gradient, by hand
        (g,) = torch.autograd.grad(module(x).pow(2).mean(), module.weight)
        want.append(g)
    ctx = NS(accelerator=Accelerator(cpu=True), is_deepspeed=False, opts=NS(stop_after_steps=0),
             cfg=load_config(None, ["train.log_every=1", "train.save_every_steps=0"]),
             checkpoints=NS(latest=lambda: None), tracker=NS(log=lambda record, step: None))  # fmt: skip
    try:
        model, optimizer = prepare(ctx, module, Recording(module.parameters(), lr=0.0), 2, 3, 0)
        phase = loop.Phase(
            "finetune", 1, model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
            lambda epoch: [{"x": x, "sample_id": ["a", "b"]} for x in xs], 4, 2, 3,
            lambda m, batch: m(batch["x"]), validate=None, full_state=None,
        )  # fmt: skip
        state = loop.TrainState("finetune")
        loop.train_epoch(ctx, phase, state)
    finally:
        AcceleratorState._reset_state(True)
    assert state.step == 2 and len(updates) == 2
    torch.testing.assert_close(updates[0], torch.stack(want[:3]).mean(0))
    torch.testing.assert_close(updates[1], want[3])  # a window of 1: not divided by 3


def test_ranks_build_the_same_model_then_draw_their_own_crops_and_dropout(tiny_clip_dir):
    from types import SimpleNamespace as NS

    from accelerate.utils import set_seed

    from geoloc.heads import HeadSizes
    from geoloc.preprocess import Preprocessor
    from geoloc.train.context import PHASE_NAMES
    from geoloc.train.engine import build_geo_model, training_seed

    ctx = NS(cfg=load_config(None, [f"model.backbone={tiny_clip_dir}"]), zero_stage=0,
             labels=NS(sizes=HeadSizes(3)))  # fmt: skip
    augment = Preprocessor(image_size=28, augment=True, min_scale=0.3).train()
    images = torch.randint(0, 256, (2, 4, 3, 32, 32), dtype=torch.uint8)

    def rank(process_index: int):
        """What train_phase does on one rank: build with the common seed, then reseed per rank."""
        weights = build_geo_model(ctx, None).state_dict()
        set_seed(training_seed(ctx.cfg.train.seed, "finetune", process_index))
        return weights, augment(images), torch.nn.functional.dropout(torch.ones(256), 0.5)

    (w0, crops0, drop0), (w1, crops1, drop1) = rank(0), rank(1)
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    assert not torch.equal(crops0, crops1) and not torch.equal(drop0, drop1)
    _, crops0_again, drop0_again = rank(0)  # reproducible per rank (what --resume relies on)
    assert torch.equal(crops0, crops0_again) and torch.equal(drop0, drop0_again)
    seeds = {training_seed(0, phase, r) for phase in PHASE_NAMES for r in range(64)}
    assert len(seeds) == 2 * 64  # no (phase, rank) pair shares a stream


# ----------------------------------------------------------------------------- cache key of a hub backbone


def test_cache_key_of_a_hub_backbone_follows_its_cached_snapshot(tmp_path, monkeypatch):
    """A new hub revision of the same id (refs/main moves) must not reuse the old embeddings."""
    from huggingface_hub import constants

    def publish(commit: str) -> None:  # the HF cache layout after a download of org/clip at `commit`
        repo = tmp_path / "models--org--clip"
        (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    cfg = load_config(None, ["model.backbone=org/clip"])
    pre = {"image_size": 56, "mean": [0.5] * 3, "std": [0.25] * 3}
    keys = []
    for commit in ("a" * 40, "b" * 40, "a" * 40):
        publish(commit)
        keys.append(cache_key(cfg, pre, {}, torch.float32))
    assert keys[0] != keys[1] and keys[2] == keys[0]


def test_data_settings_reach_the_training_preprocessor_and_loader(make_ctx, monkeypatch):
    """aug_jitter / augment reach the on-device Preprocessor; the manifest's shard counts reach the loader."""
    import geoloc.data
    from geoloc.train.phases import loader_batches

    ctx = make_ctx("data.augment=true", "data.aug_jitter=0.25", "data.aug_min_scale=0.6")
    assert (ctx.preprocessor.augment, ctx.preprocessor.jitter, ctx.preprocessor.min_scale) == (
        True,
        0.25,
        0.6,
    )

    seen = {}
    real = geoloc.data.make_train_loader
    monkeypatch.setattr(geoloc.data, "make_train_loader", lambda *a, **k: (seen.update(k), real(*a, **k))[1])
    next(iter(loader_batches(ctx, 4, epoch=0)))
    assert seen["shard_counts"] == ctx.manifest["splits"]["train"]["shards"]  # empty shards get dropped


def test_labels_come_from_labels_csv_without_streaming_the_shards(make_ctx, monkeypatch, tiny_shards):
    """Start-up reads labels.csv beside the manifest; the shards are streamed only when it is absent."""
    from geoloc.data import ShardSet, shardset

    streamed = shardset.gathered_labels
    monkeypatch.setattr(shardset, "gathered_labels", lambda *a: pytest.fail("streamed the shards"))
    fast = make_ctx()
    data = ShardSet.open(str(tiny_shards))
    states, latlon = data.labels("train")
    slow_states, slow_latlon = streamed(None, fast.shards["train"])
    order, slow_order = np.lexsort(latlon.T), np.lexsort(slow_latlon.T)  # same rows, any order
    np.testing.assert_array_equal(states[order], slow_states[slow_order])
    np.testing.assert_array_equal(latlon[order], slow_latlon[slow_order])  # exact floats
    elsewhere = ShardSet(data.spec, data.manifest, str(tiny_shards / "elsewhere" / "manifest.json"))
    assert elsewhere._sidecar_labels("train") is None


def test_remote_style_shard_template_with_an_explicit_manifest(tiny_clip_dir, tiny_shards, tmp_path):
    """--shards '<prefix>/{shard}' --manifest FILE: train and val get their own shards from the manifest."""
    from geoloc.train.context import shard_lists

    cfg = load_config(None, [f"model.backbone={tiny_clip_dir}"], preset="smoke")
    spec, manifest_path = f"file:{tiny_shards}/{{shard}}", str(tiny_shards / "manifest.json")
    data, shards, counts = shard_lists(cfg, spec, manifest_path)
    manifest = data.manifest
    assert [u.rsplit("/", 1)[1] for u in shards["val"]] == sorted(manifest["splits"]["val"]["shards"])
    assert (
        all("/train-" in u for u in shards["train"]) and counts["val"] == manifest["splits"]["val"]["count"]
    )
    with pytest.raises(Exception, match="--manifest"):
        shard_lists(cfg, "pipe:cat /nowhere/{shard}")
