"""One rank under DeepSpeed ZeRO-3 (the 2-rank DDP / ZeRO-2 / ZeRO-3 runs are in test_train_dist.py, the
1-process plain run in test_train_run.py): the exported directory is a hub model, and infer.py --eval on
it draws the embeddings of every val sample."""

import json

import pytest
from _hub_checks import check_hub_export
from _train_helpers import check, export_meta, launch, launcher, run_train, train_args

ZERO = (
    "train.epochs_frozen=1",
    "train.epochs_finetune=1",
    "train.batch_size=4",
    "train.finetune_batch_size=4",
)


@pytest.mark.slow
def test_zero3_on_one_rank_exports_a_hub_model_and_eval_draws_its_embeddings(
    tiny_shards, tiny_clip_dir, tmp_path
):
    run = tmp_path / "run"
    check(
        run_train(
            train_args(tiny_shards, tiny_clip_dir, run, tmp_path / "cache", *ZERO), kind="zero3", nproc=1
        )
    )
    meta = export_meta(run)
    assert meta["extra"]["num_processes"] == 1 and meta["extra"]["distributed_type"].endswith("DEEPSPEED")
    check_hub_export(run / "model")
    prefix, env = launcher("python")
    cmd = prefix + ["infer.py", "--eval", "--model", str(run / "model"), "--shards", str(tiny_shards),
                    "--out-dir", str(tmp_path / "report"), "--no-progress"]  # fmt: skip
    check(launch(cmd, "infer.py --eval on a ZeRO-3 model", 300, env))
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["embeddings"]["of"] == report["n"] == 12
    assert (tmp_path / "report" / "embeddings.png").read_bytes()[:4] == b"\x89PNG"
