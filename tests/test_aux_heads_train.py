"""train.py with the auxiliary heads (``metric`` and ``vae``): both phases, the band choices in
metrics.jsonl, the bandit in every checkpoint, a bit-identical resume; on 1 and 2 ranks under DDP,
ZeRO-2 and ZeRO-3 (real launches, slow)."""

import json

import pytest
import torch
from _train_helpers import check, export_meta, read_metrics, run_train, train_args
from safetensors.torch import load_file

# 36 train places of the tiny set: positives within 1500 km, neighbouring states within 800 km, so every
# band has pairs. Phase 1 (cache): 36 / 8 -> 5 batches an epoch, 2 epochs (steps 1-10); phase 2: 36 / 8 ->
# 4 batches (steps 11-14). A checkpoint every 2 updates.
AUX = (
    "model.heads=[state,gps,metric,vae]", "loss.metric_d_pos_km=1500", "loss.metric_neighbour_km=800",
    "loss.metric_bands=[hard,medium,easy,all]", "train.frozen_batch_size=8", "train.finetune_batch_size=8",
    "train.save_every_steps=2", "train.keep_checkpoints=5", "train.build_index=false",
)  # fmt: skip
BANDS = ("hard", "medium", "easy", "all")


def _train_lines(run_dir) -> dict[int, dict]:
    """``{step: train record}`` (a resumed run's later line for a step wins)."""
    return {r["step"]: r for r in read_metrics(run_dir) if "train/loss" in r}


def _last_checkpoint(run_dir) -> dict:
    metas = [json.loads((d / "trainer_state.json").read_text()) for d in (run_dir / "checkpoints").iterdir()]
    return max(metas, key=lambda m: m["seq"])


def _check_aux_run(run_dir, steps: int) -> dict[int, dict]:
    """Both phases logged every term and one band per step; the last checkpoint holds the bandit."""
    lines = _train_lines(run_dir)
    assert sorted(lines) == list(range(1, steps + 1))
    assert {r["phase_index"] for r in lines.values()} == {1, 2}
    for r in lines.values():
        assert all(
            k in r for k in ("train/loss_metric", "train/loss_vae", "train/loss_vae_rec", "train/loss_vae_kl")
        )
        picked = [r[f"train/band_{b}"] for b in BANDS]
        assert sorted(picked) == [0.0, 0.0, 0.0, 1.0], picked  # every rank picked the same band (rank mean)
    assert any(r["train/metric_anchors"] > 0 for r in lines.values())
    bandit = _last_checkpoint(run_dir)["stateful"]["loss"]["metric"]["bandit"]
    assert bandit["arms"] == list(BANDS) and min(bandit["counts"]) >= 1 and bandit["updates"] > 0
    counts = [sum(r[f"train/band_{b}"] for r in lines.values()) for b in BANDS]  # log_every=1, accum 1
    assert counts == bandit["counts"]
    meta = export_meta(run_dir)
    assert meta["heads"] == ["state", "gps", "metric", "vae"]
    return lines


@pytest.fixture(scope="module")
def aux_run(tiny_shards, tiny_clip_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("aux")
    args = train_args(
        tiny_shards, tiny_clip_dir, root / "run", root / "cache", *AUX, "train.epochs_finetune=1"
    )
    check(run_train(args))
    return root / "run", args


def test_auxiliary_heads_train_both_phases_and_log_their_terms_and_bands(aux_run):
    from geoloc.export import load_model_dir

    run_dir, _ = aux_run
    _check_aux_run(run_dir, 14)
    loaded = load_model_dir(run_dir / "model")  # rebuilds the metric and vae heads from the saved config
    x = torch.zeros(2, 4, 3, *(loaded.preprocess["image_size"],) * 2)
    out = loaded.model(x, torch.ones(2, 4, dtype=torch.bool))
    assert out["metric"].shape == (2, 128) and torch.allclose(out["metric"].norm(dim=1), torch.ones(2))
    assert loaded.decoder(loaded.cfg.decode)(out)["state_probs"].shape[0] == 2  # the answer is unaffected


def test_resume_restores_the_bandit_and_follows_the_uninterrupted_run(aux_run, tmp_path):
    run_dir, args = aux_run
    resumed = tmp_path / "resumed"
    args = [str(resumed) if a == str(run_dir) else a for a in args]
    check(run_train(args + ["--stop-after-steps", "13"]), rc=3)  # mid phase 2; last checkpoint at step 12
    assert _last_checkpoint(resumed)["state"]["global_step"] == 12
    check(run_train(args + ["--resume", "latest"]))
    assert _strip_time(_train_lines(resumed)) == _strip_time(_train_lines(run_dir))  # bands and terms
    assert _last_checkpoint(resumed)["stateful"] == _last_checkpoint(run_dir)["stateful"]  # bit for bit
    want, got = (load_file(d / "model" / "model.safetensors") for d in (run_dir, resumed))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def _strip_time(lines: dict[int, dict]) -> dict[int, dict]:
    return {
        s: {k: v for k, v in r.items() if k not in ("time", "train/samples_per_s")} for s, r in lines.items()
    }


# ----------------------------------------------------------------------------- ranks and engines

# 2 ranks: phase 1 36 / (8 x 2) -> 3 batches an epoch (wrapped), phase 2 36 / (8 x 2) -> 2 batches
STEPS = {1: 14, 2: 3 * 2 + 2}


def _launch(kind, nproc, shards, clip, root):
    extra = ("train.eval_batch_size=5",) if kind.startswith("zero") else ()
    args = train_args(shards, clip, root / "run", root / "cache", *AUX, *extra, "train.epochs_finetune=1")
    return check(run_train(args, kind=kind, nproc=nproc)), args


@pytest.fixture(scope="module")
def ddp_aux_run(tiny_shards, tiny_clip_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("aux_ddp")
    proc, args = _launch("ddp", 2, tiny_shards, tiny_clip_dir, root)
    return proc, args, root / "run"


def _check_ranks_run(proc, run_dir, nproc):
    """The metric head mined over the gathered batch (one collective per batch, the same on every rank:
    ``check`` compared the traced collectives) and the ranks agreed on every band; the VAE trained (also
    under DeepSpeed bf16); the model exported and reloaded."""
    lines = _check_aux_run(run_dir, STEPS[nproc])
    assert export_meta(run_dir)["extra"]["num_processes"] == nproc
    assert f"phase-1 batch of {8 * nproc} " in proc.stdout  # mining sees every rank's batch
    assert all(torch.isfinite(torch.tensor(r["train/loss_vae_rec"])) for r in lines.values())
    if nproc == 2:
        gathers = [line for line in proc.trace[0] if "geoloc/metric.py" in line]
        assert len(gathers) == STEPS[2], gathers[:3]  # one per batch


@pytest.mark.slow
def test_auxiliary_heads_train_on_two_ddp_ranks(ddp_aux_run):
    proc, _, run_dir = ddp_aux_run
    _check_ranks_run(proc, run_dir, 2)


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "nproc"), [("zero2", 2), ("zero3", 2), ("zero2", 1), ("zero3", 1)])
def test_auxiliary_heads_train_under_deepspeed(kind, nproc, tiny_shards, tiny_clip_dir, tmp_path):
    proc, _ = _launch(kind, nproc, tiny_shards, tiny_clip_dir, tmp_path)
    _check_ranks_run(proc, tmp_path / "run", nproc)


@pytest.mark.slow
def test_two_rank_resume_restores_the_bandit_and_follows_the_uninterrupted_run(ddp_aux_run, tmp_path):
    """DDP, 2 ranks, stopped at the first phase-2 update (last checkpoint after phase 1's 6 updates)."""
    _, args, run_dir = ddp_aux_run
    resumed = tmp_path / "resumed"
    args = [str(resumed) if a == str(run_dir) else a for a in args]
    check(run_train(args + ["--stop-after-steps", "7"], kind="ddp"), rc=1)  # the launcher reports 1
    assert _last_checkpoint(resumed)["state"]["global_step"] == 6
    check(run_train(args + ["--resume", "latest"], kind="ddp"))
    assert _strip_time(_train_lines(resumed)) == _strip_time(_train_lines(run_dir))
    assert _last_checkpoint(resumed)["stateful"] == _last_checkpoint(run_dir)["stateful"]
    want, got = (load_file(d / "model" / "model.safetensors") for d in (run_dir, resumed))
    assert all(torch.equal(want[k], got[k]) for k in want)
