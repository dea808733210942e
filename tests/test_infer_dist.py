"""infer.py on two real CPU ranks (gloo) gives exactly the one-process outputs.

Launched as a user would: ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 infer.py``
(``--cpu --num_processes 2`` would silently start one process). Each run asserts it saw 2 processes.
The test split has 12 samples in shards of 7 and 5, read 2 per batch: the ranks run 4 and 3 batches.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from _infer_helpers import ENV, ROOT, export_tiny_model, read_csv, template_path

from geoloc.infer.cli import main
from geoloc.synth import corrupt_view


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(*argv) -> str:
    """``infer.py`` under accelerate launch with 2 CPU processes; returns stdout (fails on error)."""
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(ROOT / "infer.py"), *map(str, argv), "--batch-size", "2", "--num-workers", "2", "--no-progress"]  # fmt: skip
    env = {**os.environ, **ENV, "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def run_one(capsys, *argv) -> str:
    code = main([*map(str, argv), "--batch-size", "2", "--num-workers", "0", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    return out


def summary(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def model_dir(tiny_clip_dir, tiny_data_root, tmp_path_factory):
    return export_tiny_model(tiny_clip_dir, tiny_data_root, tmp_path_factory.mktemp("dist_model") / "model")


def test_two_processes_write_the_same_submission_from_shards(capsys, model_dir, tiny_shards, tmp_path):
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    run_one(capsys, "--model", model_dir, "--shards", tiny_shards, "--out", one)
    s = summary(launch_two("--model", model_dir, "--shards", tiny_shards, "--out", two))
    assert s["processes"] == 2 and s["rows"] == 12
    assert one.read_bytes() == two.read_bytes()


def test_two_processes_on_the_raw_folder_keep_every_row(capsys, model_dir, tiny_data_root, tmp_path):
    root = shutil.copytree(tiny_data_root, tmp_path / "data")
    for view in ("north", "east", "south", "west"):
        corrupt_view(root, "000055", view, "garbage")  # no readable view left: the prior answers
    corrupt_view(root, "000049", "south", "missing")
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    run_one(capsys, "--model", model_dir, "--data-root", root, "--out", one)
    s = summary(launch_two("--model", model_dir, "--data-root", root, "--out", two))
    assert s["processes"] == 2 and s["from_prior"] == ["000055"]
    assert s["views"]["bad_views"] == 4 and s["views"]["missing_views"] == 1
    assert list(read_csv(two)["sample_id"]) == list(read_csv(template_path(root))["sample_id"])
    assert one.read_bytes() == two.read_bytes()


def test_two_process_eval_report_equals_one_process(capsys, model_dir, tiny_shards, tmp_path):
    run_one(capsys, "--eval", "--model", model_dir, "--shards", tiny_shards, "--out-dir", tmp_path / "r1")
    launch_two("--eval", "--model", model_dir, "--shards", tiny_shards, "--out-dir", tmp_path / "r2")
    r1, r2 = (json.loads((tmp_path / r / "report.json").read_text()) for r in ("r1", "r2"))
    assert r2["context"]["processes"] == 2 and r1["context"]["processes"] == 1
    for key in ("score", "cls_score", "gps_score", "top1_acc", "top5_acc", "mean_km", "median_km", "n"):
        assert r2[key] == pytest.approx(r1[key], abs=1e-9), key
    assert r2["confusion"] == r1["confusion"]
    # the embeddings, gathered over both ranks: the same rows, so the same t-SNE picture
    assert r2["embeddings"] == r1["embeddings"] and r1["embeddings"]["of"] == r1["n"]
    pictures = [(tmp_path / r / "embeddings.png").read_bytes() for r in ("r1", "r2")]
    assert pictures[0] == pictures[1]


def test_a_rank_that_raises_mid_prediction_ends_the_job(model_dir, tiny_shards, tmp_path):
    """Rank 1 fails after its first batch while rank 0 goes on to the gather: the launcher ends both."""
    from _train_helpers import launch, launcher

    prefix, extra = launcher("ddp", 2)
    cmd = prefix + [str(ROOT / "infer.py"), "--model", str(model_dir), "--shards", str(tiny_shards),
                    "--out", str(tmp_path / "s.csv"), "--batch-size", "2", "--num-workers", "1"]  # fmt: skip
    proc = launch(
        cmd, "infer.py, rank 1 raising", 300, {**extra, "GEOLOC_FAULT": "predict.batch@1:rank=1:raise"}
    )
    assert proc.returncode != 0 and "injected fault at predict.batch" in proc.stderr
    assert not (tmp_path / "s.csv").exists()
