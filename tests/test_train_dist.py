"""train.py on two real gloo ranks: DDP, DeepSpeed ZeRO-2 and ZeRO-3, both phases each; DDP mean pooling;
a rank killed, stopped or orphaned.

Two ranks are checked from what the run writes (``num_processes`` in the exported geoloc.json), since a
misconfigured launcher silently starts one process. DeepSpeed runs use the shipped
``accelerate_configs/4xa100_zero{2,3}.yaml`` (their ``ds_configs/*.json``) with 2 processes and bf16.
The DDP and ZeRO-2 runs validate on ONE val shard (rank 1 has nothing to evaluate): the layout that hung
at the first phase-2 validation while the DDP wrapper broadcast its buffers at every forward.
"""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from _hub_checks import check_hub_export
from _train_helpers import (
    ENV,
    REPO,
    check,
    export_meta,
    launcher,
    read_metrics,
    run_train,
    train_args,
    val_records,
)
from safetensors.torch import load_file

from geoloc.train.checkpoint import CheckpointManager

SHORT = ("train.epochs_frozen=1", "train.epochs_finetune=1")
# val shards hold 7 and 5 samples: with batches of 5 the ranks get 2 and 1 eval batches, which ZeRO-3
# validation must survive (every forward there is a collective)
UNEVEN_EVAL = ("train.eval_batch_size=5",)
# phase 1: 1 update (cache, 36 rows / (32 x 2 ranks)); phase 2: 36 / (4 x 2) = 4 updates; checkpoint every 2
ZERO = (
    *UNEVEN_EVAL,
    "train.batch_size=4",
    "train.finetune_batch_size=4",
    "train.save_every_steps=2",
    "train.keep_checkpoints=5",
)


def _launch(kind, shards, clip, root, *extra):
    check(run_train(train_args(shards, clip, root / "run", root / "cache", *SHORT, *extra), kind=kind))
    return root / "run"


@pytest.fixture(scope="module")
def ddp_run(layouts, tiny_clip_dir, tmp_path_factory):
    return _launch("ddp", layouts["one"], tiny_clip_dir, tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def zero_runs(tiny_shards, layouts, tiny_clip_dir, tmp_path_factory):
    shards = {2: layouts["one"], 3: tiny_shards}  # ZeRO-3 on 7 + 5 val samples, in batches of 5
    return {
        s: _launch(f"zero{s}", shards[s], tiny_clip_dir, tmp_path_factory.mktemp(f"z{s}"), *ZERO)
        for s in (2, 3)
    }


def _check_two_rank_run(run_dir, distributed_type: str) -> dict:
    """Both phases trained and validated on 2 ranks, every val sample once; the export reloads on CPU."""
    from geoloc.export import load_model_dir

    meta = export_meta(run_dir)
    assert meta["extra"]["num_processes"] == 2
    assert meta["extra"]["distributed_type"].endswith(distributed_type)
    assert {r["phase_index"] for r in read_metrics(run_dir) if "train/loss" in r} == {1, 2}
    val = val_records(run_dir)
    assert {r["phase_index"] for r in val.values()} == {1, 2}
    assert all(r["val/n"] == 12 for r in val.values())  # every val sample counted once across the ranks
    loaded = load_model_dir(run_dir / "model")  # strict load: full (gathered) shapes, plain fp32 tensors
    x = torch.zeros(2, 4, 3, *(loaded.preprocess["image_size"],) * 2)
    out = loaded.model(x, torch.ones(2, 4, dtype=torch.bool))
    assert torch.isfinite(out["state"]).all() and torch.isfinite(out["gps"]).all()
    check_hub_export(run_dir / "model")  # config.json, the card, from_pretrained == load_model_dir
    return {step: r["val/score"] for step, r in val.items()}


def test_ddp_two_ranks_trains_both_phases(ddp_run):
    _check_two_rank_run(ddp_run, "MULTI_CPU")


def test_ddp_cache_holds_every_sample_once_with_its_own_embedding(ddp_run, tiny_clip_dir, tiny_shards):
    """The embeddings the two ranks computed, gathered by sample id, equal a one-process forward."""
    from geoloc.config import load_config
    from geoloc.data import make_eval_loader, read_manifest, resolve_shards
    from geoloc.heads import HeadSizes
    from geoloc.labels import LabelEncoder
    from geoloc.model import build_model
    from geoloc.preprocess import Preprocessor
    from geoloc.train.cache import load_table

    (train_pt,) = (ddp_run.parent / "cache").glob("*/train.pt")
    table = load_table(train_pt)
    assert table.sample_id == sorted(set(table.sample_id)) and len(table) == 36
    assert len(load_table(train_pt.with_name("val.pt"))) == 12
    cfg = load_config(None, [f"model.backbone={tiny_clip_dir}"])
    model = build_model(cfg.model, HeadSizes(num_classes=3)).eval()
    pre = Preprocessor.from_backbone(str(tiny_clip_dir))
    encoder = LabelEncoder.from_dict(read_manifest(str(tiny_shards))["label_encoder"])
    loader = make_eval_loader(
        resolve_shards(str(tiny_shards), "train"), batch_size=36, num_workers=0, encoder=encoder
    )
    batch = next(iter(loader))
    with torch.no_grad():
        emb = model.forward_features(pre(batch["images"]), batch["view_mask"])  # (36, 4, D)
    rows = [table.sample_id.index(i) for i in batch["sample_id"]]
    torch.testing.assert_close(table.emb[rows], emb, rtol=1e-4, atol=1e-5)
    assert torch.equal(table.view_mask[rows], batch["view_mask"])


def test_ddp_finetunes_a_mean_pooled_backbone(layouts, tiny_clip_dir, tmp_path):
    """Mean pooling never reads CLS's post-layernorm: trainable, DDP would fail at its 2nd step. (Val on
    an odd number of uneven shards: 7 + 4 + 1 samples.)"""
    overrides = ("model.pooling=mean", "train.epochs_frozen=0", "train.epochs_finetune=1")
    args = train_args(layouts["odd"], tiny_clip_dir, tmp_path / "run", tmp_path / "cache", *overrides)
    check(run_train(args, kind="ddp"))
    meta = export_meta(tmp_path / "run")
    assert meta["pooling"] == "mean" and meta["extra"]["num_processes"] == 2
    steps = [r["step"] for r in read_metrics(tmp_path / "run") if "train/loss" in r]
    assert len(steps) >= 2  # the error comes at the step after the first backward
    assert [r["val/n"] for r in val_records(tmp_path / "run").values()] == [12]


def test_two_processes_without_a_backend_are_refused(tiny_shards, tiny_clip_dir, tmp_path):
    """`--multi_gpu` on a CPU box without ACCELERATE_USE_CPU gives 2 processes that never talk."""
    args = train_args(tiny_shards, tiny_clip_dir, tmp_path / "run", tmp_path / "cache")
    proc = check(run_train(args, kind="ddp", drop_env=("ACCELERATE_USE_CPU",)), rc=1)
    assert "2 processes were launched but accelerate set up no distributed backend" in proc.stderr


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_two_ranks_trains_both_phases(zero_runs, stage):
    run_dir = zero_runs[stage]
    _check_two_rank_run(run_dir, "DEEPSPEED")
    for phase in ("frozen", "finetune"):  # DeepSpeed's own checkpoint layout, one per phase engine
        (ckpt,) = [d for d in (run_dir / "checkpoints").iterdir() if d.name.startswith(phase)][-1:]
        assert (ckpt / "pytorch_model").is_dir(), sorted(p.name for p in ckpt.iterdir())


def test_zero2_and_zero3_train_the_same_model(zero_runs):
    """Same data, seeds and bf16: partitioning the parameters (ZeRO-3) must not change the result."""
    scores = {s: [r["val/score"] for _, r in sorted(val_records(d).items())] for s, d in zero_runs.items()}
    assert len(scores[2]) == len(scores[3]) == 2
    assert scores[2] == pytest.approx(scores[3], abs=0.02)


def test_zero3_resume_after_an_interruption_follows_the_uninterrupted_run(
    zero_runs, tiny_shards, tiny_clip_dir
):
    """Stopped in phase 2 (step 3, last checkpoint at step 2), resumed: the same losses, scores, weights."""
    from safetensors.torch import load_file

    full = zero_runs[3]
    args = train_args(
        tiny_shards, tiny_clip_dir, full.parent / "resumed", full.parent / "cache", *SHORT, *ZERO
    )
    check(run_train(args + ["--stop-after-steps", "3"], kind="zero3"), rc=1)  # the launcher reports 1
    check(run_train(args + ["--resume", "latest"], kind="zero3"))
    resumed = full.parent / "resumed"

    def curve(run_dir):  # a resumed run's later line for a step wins
        return {
            (r["step"], k): r[k] for r in read_metrics(run_dir) for k in ("train/loss", "val/score") if k in r
        }

    assert curve(resumed) == curve(full) and len(curve(full)) == 5 + 2
    want, got = (
        load_file(full / "model" / "model.safetensors"),
        load_file(resumed / "model" / "model.safetensors"),
    )
    assert all(torch.equal(want[k], got[k]) for k in want)


# ----------------------------------------------------------------------------- a rank that dies


@pytest.mark.slow
def test_sigkill_of_rank_1_in_phase_2_ends_the_job_and_resume_follows(
    ddp_run, layouts, tiny_clip_dir, tmp_path
):
    """Rank 1 SIGKILLed mid-update in phase 2: the launcher fails fast, the last checkpoint verifies, and
    ``--resume latest`` on 2 ranks ends with the uninterrupted run's weights."""
    killed = tmp_path / "run"
    args = train_args(
        layouts["one"], tiny_clip_dir, killed, tmp_path / "cache", *SHORT, "train.save_every_steps=1"
    )
    start = time.monotonic()
    proc = run_train(args, kind="ddp", env={"GEOLOC_FAULT": "finetune.update@3:rank=1"}, timeout=600)
    assert proc.returncode != 0 and "-9" in proc.stderr, proc.stderr[-3000:]
    ckpts = CheckpointManager(killed, None, keep=2)
    latest = ckpts.latest()
    assert latest.name.startswith("finetune-") and ckpts.verify(latest)["state"]["global_step"] == 3
    elapsed = time.monotonic() - start
    check(run_train(args + ["--resume", "latest"], kind="ddp", label="DDP resume after rank 1 was killed"))
    want, got = (load_file(d / "model" / "model.safetensors") for d in (ddp_run, killed))
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert elapsed < 400  # the whole killed run, launcher included: no wait for a timeout


@pytest.mark.slow
def test_a_stopped_rank_ends_the_job_after_the_collective_timeout(layouts, tiny_clip_dir, tmp_path):
    """Rank 1 SIGSTOPped: rank 0 gives up after train.dist_timeout_s, saying so; the launcher exits non-zero."""
    args = train_args(layouts["one"], tiny_clip_dir, tmp_path / "run", tmp_path / "cache",
                      "train.epochs_frozen=0", "train.epochs_finetune=1", "train.dist_timeout_s=30")  # fmt: skip
    start = time.monotonic()
    proc = run_train(
        args, kind="ddp", env={"GEOLOC_FAULT": "finetune.update@1:rank=1:signal=STOP"}, timeout=600
    )
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "rank 0: a collective waited 30 s (train.dist_timeout_s)" in proc.stderr, proc.stderr[-3000:]
    assert elapsed < 300, elapsed  # 30 s of timeout, the launcher's SIGTERM grace, start-up on a busy CPU


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_ranks_stop_when_their_launcher_is_killed(layouts, tiny_clip_dir, tmp_path):
    """SIGKILL of `accelerate launch` (its ranks run in their own sessions): the ranks notice and exit."""
    run = tmp_path / "run"
    args = train_args(layouts["one"], tiny_clip_dir, run, tmp_path / "cache", "train.cache_embeddings=false",
                      "train.epochs_frozen=5")  # fmt: skip
    prefix, extra = launcher("ddp", 2)
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            prefix + args, cwd=REPO, env={**os.environ, **ENV, **extra}, stdout=err, stderr=err
        )
        try:
            deadline = time.monotonic() + 600
            while (
                not (run / "metrics.jsonl").is_file() and proc.poll() is None and time.monotonic() < deadline
            ):
                time.sleep(0.5)  # training has started on both ranks
            ranks = _children(proc.pid)
            assert proc.poll() is None and len(ranks) == 2, (ranks, log.read_text()[-2000:])
        finally:
            proc.kill()
            proc.wait()
        deadline = time.monotonic() + 60
        while any(_alive(r) for r in ranks) and time.monotonic() < deadline:
            time.sleep(0.5)
    assert not any(_alive(r) for r in ranks), log.read_text()[-2000:]
    assert "the launcher (pid" in log.read_text()


# ----------------------------------------------------------------------------- cells and retrieval


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "zero2", "zero3"])
def test_cells_and_retrieval_train_and_infer_on_two_ranks(kind, layouts, tiny_clip_dir, tmp_path):
    """A model with state, cell and GPS heads (geocells of 2-3 training points) trains both phases on 2
    ranks, indexes its training embeddings, and infer.py --eval on 2 ranks decodes it with the cells and
    with the nearest neighbours, every val sample once."""
    from _train_helpers import launch

    run = tmp_path / "run"
    cells = ("model.heads=[state,cell,gps]", "model.cell_min_size=2", "model.cell_max_size=3")
    extra = (*ZERO, *cells) if kind.startswith("zero") else cells
    check(
        run_train(
            train_args(layouts["odd"], tiny_clip_dir, run, tmp_path / "cache", *SHORT, *extra), kind=kind
        )
    )
    meta = export_meta(run)
    assert meta["heads"] == ["state", "cell", "gps"] and meta["num_cells"] > 3 and meta["index_sha256"]
    assert {r["decoder"]["gps"] for r in meta["decoders_val"]} == {"regression", "cell", "bayes", "knn"}
    prefix, env = launcher("ddp", 2)
    for flags in ([], ["--decode-state", "cells", "--decode-gps", "knn", "--knn-alpha", "0.5"]):
        out = tmp_path / f"report{len(flags)}"
        cmd = prefix + ["infer.py", "--eval", "--model", str(run / "model"), "--shards", str(layouts["odd"]),
                        "--out-dir", str(out), "--batch-size", "3", "--no-progress", *flags]  # fmt: skip
        check(launch(cmd, f"infer.py --eval {flags} on a {kind} model", 300, env))
        report = json.loads((out / "report.json").read_text())
        assert report["n"] == 12 and report["context"]["processes"] == 2
