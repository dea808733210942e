"""train.py end to end in one process: both phases, the run directory, export + reload, and --resume.

One uninterrupted run (module fixture) serves three tests; the resume test interrupts a second run with
``--stop-after-steps`` and resumes it, then compares with the uninterrupted one.
"""

import json
import math
import signal

import pytest
import torch
from _train_helpers import check, export_meta, read_metrics, run_train, train_args, val_records
from safetensors.torch import load_file

from geoloc.train.checkpoint import CheckpointManager

# grad accumulation, periodic checkpoints and EMA, so the resume test has all of them to restore.
# Phase 1 (cache): 36 rows / batch 32 = 2 batches, accum 2 -> 1 update an epoch, 2 epochs: steps 1-2.
# Phase 2: 36 / 4 = 9 batches, accum 2 -> updates after batches 2, 4, 6, 8, 9 (a short window): steps 3-7.
OVERRIDES = (
    "train.grad_accum=2", "train.finetune_batch_size=4", "train.finetune_grad_accum=2",
    "train.save_every_steps=2", "train.ema_decay=0.5", "train.keep_checkpoints=5",
)  # fmt: skip
TOTAL_STEPS = 7


@pytest.fixture(scope="module")
def full_run(tiny_shards, tiny_clip_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("train_full")
    args = train_args(tiny_shards, tiny_clip_dir, root / "run", root / "cache", *OVERRIDES)
    check(run_train(args))
    return root / "run", args


def test_both_phases_log_train_and_val_metrics_and_write_the_run_dir(full_run):
    from geoloc.config import read_config

    run_dir, _ = full_run
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "model/model.safetensors"):
        assert (run_dir / name).is_file(), name
    assert read_config(run_dir / "config.yaml").train.grad_accum == 2  # the resolved config
    train = [r for r in read_metrics(run_dir) if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, TOTAL_STEPS + 1))
    assert [r["phase_index"] for r in train] == [1, 1, 2, 2, 2, 2, 2]
    assert all(math.isfinite(r["train/loss"]) and r["train/samples_per_s"] > 0 for r in train)
    assert all("train/lr_backbone" not in r for r in train[:2])  # phase 1 trains the heads only
    assert all(0 < r["train/lr_backbone"] <= 1e-5 < r["train/lr_head"] for r in train[2:])
    val = val_records(run_dir)
    assert sorted(val) == [1, 2, TOTAL_STEPS]  # after each epoch: 2 frozen, 1 finetune
    assert all(r["val/n"] == 12 and 0 <= r["val/score"] <= 1 for r in val.values())


def test_export_reloads_on_cpu_and_reproduces_the_best_val_score(full_run, tiny_shards):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from geoloc.data import make_eval_loader, resolve_shards
    from geoloc.export import load_model_dir
    from geoloc.metrics import Prior
    from geoloc.predict import evaluate, predict
    from geoloc.preprocess import Preprocessor

    run_dir, _ = full_run
    best = max(r["val/score"] for r in val_records(run_dir).values())
    meta = export_meta(run_dir)
    assert meta["extra"]["val"]["score"] == pytest.approx(best, abs=1e-12)
    assert meta["extra"]["num_processes"] == 1
    loaded = load_model_dir(run_dir / "model")
    loader = make_eval_loader(resolve_shards(str(tiny_shards), "val"), batch_size=5, encoder=loaded.encoder)
    try:
        preds = predict(
            loaded.model,
            loader,
            Preprocessor(**loaded.preprocess),
            Accelerator(cpu=True),
            decoder=loaded.decoder(loaded.cfg.decode),  # the run's decoding, which validation used
        )
    finally:
        AcceleratorState._reset_state(True)
    metrics = evaluate(preds, loaded.encoder, Prior.from_dict(loaded.prior))
    assert metrics["n"] == 12
    assert metrics["score"] == pytest.approx(best, abs=1e-6)


def test_export_is_a_hub_model_with_a_card_of_the_run(full_run):
    from _hub_checks import check_hub_export

    check_hub_export(full_run[0] / "model")


def test_resume_after_an_interruption_follows_the_uninterrupted_run(full_run, tmp_path):
    run_dir, args = full_run
    resumed = tmp_path / "resumed"
    args = [str(resumed) if a == str(run_dir) else a for a in args]
    stopped = check(run_train(args + ["--stop-after-steps", "5"]), rc=3)  # mid phase 2, epoch 1
    assert "stopped after 5 optimiser updates" in stopped.stderr
    saved = [json.loads((d / "trainer_state.json").read_text()) for d in (resumed / "checkpoints").iterdir()]
    state = max(saved, key=lambda meta: meta["seq"])["state"]
    assert (state["phase"], state["global_step"], state["batch"]) == ("finetune", 4, 4)  # step 5 is redone

    check(run_train(args + ["--resume", "latest"]))
    want = load_file(run_dir / "model" / "model.safetensors")
    got = load_file(resumed / "model" / "model.safetensors")
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert _val(resumed) == _val(run_dir)  # the same val metrics after every epoch, resumed or not
    train = {
        r["step"]: r["train/loss"] for r in read_metrics(resumed) if "train/loss" in r
    }  # later line wins
    want_train = {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}
    assert train == want_train


def _same_run(resumed, run_dir) -> None:
    """The resumed run ends with the uninterrupted run's weights, val metrics and train losses."""
    want = load_file(run_dir / "model" / "model.safetensors")
    got = load_file(resumed / "model" / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert _val(resumed) == _val(run_dir)
    losses = [
        {r["step"]: r["train/loss"] for r in read_metrics(d) if "train/loss" in r} for d in (resumed, run_dir)
    ]
    assert losses[0] == losses[1]  # a resumed run's later line for a step wins


# GEOLOC_FAULT spec -> what the SIGKILL interrupts (the run's steps and saves: see OVERRIDES)
KILL_POINTS = {
    "cache.batch@2": "the embedding cache, half computed (no checkpoint yet: resume starts afresh)",
    "frozen.update@2": "a phase-1 update between backward and the optimiser step",
    "phase.end@1": "the run between the phases",
    "checkpoint.written@4": "a phase-2 checkpoint, every file written, not yet committed",
    "finetune.update@3": "a phase-2 update between backward and the optimiser step",
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", sorted(KILL_POINTS))
def test_sigkill_anywhere_then_resume_follows_the_uninterrupted_run(full_run, tmp_path, fault):
    run_dir, args = full_run
    killed, cache = tmp_path / "killed", tmp_path / "cache"  # its own cache: a kill mid-cache must matter
    args = [str(killed) if a == str(run_dir) else a for a in args]
    args = [f"train.cache_dir={cache}" if a.startswith("train.cache_dir=") else a for a in args]
    proc = run_train(args, env={"GEOLOC_FAULT": fault}, label=f"train.py killed at {fault}")
    assert proc.returncode == -signal.SIGKILL, (fault, proc.returncode, proc.stderr[-2000:])
    if fault.startswith("checkpoint"):  # the half-written one is there, and is never taken as latest
        ckpts = CheckpointManager(killed, None, keep=5)
        assert [d.name for d in ckpts.dir.iterdir() if d.name.endswith(".tmp")]
        assert ckpts.latest().name == "frozen-e002-b000000-s0000002"
    check(run_train(args + ["--resume", "latest"], label=f"resume after {fault}"))
    _same_run(killed, run_dir)


def _val(run_dir) -> dict:
    return {
        step: {k: v for k, v in r.items() if k.startswith("val/")} for step, r in val_records(run_dir).items()
    }


def test_finetune_alone_starts_from_init_weights(full_run, tmp_path):
    """``--phase finetune --init-from RUN/model`` with zero learning rates keeps exactly those weights."""
    run_dir, args = full_run
    alone = tmp_path / "alone"
    args = [str(alone) if a == str(run_dir) else a for a in args]
    frozen_lr = ["train.head_lr=0", "train.backbone_lr=0", "train.ema_decay=0"]
    check(run_train(args + ["--phase", "finetune", "--init-from", str(run_dir / "model"), *frozen_lr]))
    assert {r["phase_index"] for r in read_metrics(alone)} == {2}  # phase 1 never ran
    start = load_file(run_dir / "model" / "model.safetensors")
    end = load_file(alone / "model" / "model.safetensors")
    assert all(torch.equal(start[k], end[k]) for k in start)
    (score,) = [r["val/score"] for r in val_records(alone).values()]
    assert score == pytest.approx(export_meta(run_dir)["extra"]["val"]["score"], abs=1e-6)
