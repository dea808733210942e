"""The layout matrix, with real processes (gloo on CPU): no hang and every sample once, whatever the shards.

World sizes 1, 2 and 3; val/test cut into one shard (every rank but one idle), ``world_size - 1`` shards
and an odd number of uneven shards (``tests/_layouts.py``). ``infer.py`` and ``infer.py --eval`` run on
every (world size, layout) pair of :data:`INFER_MATRIX`, one launch per world size; ``train.py`` runs
both phases (per-epoch validation) under DDP, ZeRO-2 and ZeRO-3 here and in ``test_train_dist.py``
(DDP and ZeRO-2 on 2 ranks with ONE val shard: the layout that hung at the first phase-2 validation).

Every launch runs under a hard timeout, so a hang fails naming the launch and where each rank waited,
and every rank must have made the same collectives in the same order (``_train_helpers.check``).
"""

import json

import pytest
import torch
from _infer_helpers import export_tiny_model
from _train_helpers import (
    check,
    export_meta,
    launch,
    launcher,
    read_metrics,
    same_collectives,
    train_args,
    val_records,
)

from geoloc.infer.cli import main as infer_main

INFER_MATRIX = {1: ("one", "odd"), 2: ("one", "odd"), 3: ("one", "two", "odd")}  # "one" = ws - 1 on 2 ranks
TRAIN_MATRIX = {
    # id: (launcher, ranks, val layout, overrides); each trains both phases, one epoch each
    "ddp-3-two-uncached": ("ddp", 3, "two", ("train.cache_embeddings=false",)),  # phase 1 through DDP
    "zero3-3-odd": ("zero3", 3, "odd", ("train.eval_batch_size=3", "train.finetune_batch_size=3")),
    "python-1-odd": ("python", 1, "odd", ()),
}
FLAGS = ["--batch-size", "2", "--num-workers", "1", "--no-progress"]


@pytest.fixture(scope="module")
def model_dir(tiny_clip_dir, tiny_data_root, tmp_path_factory):
    return export_tiny_model(tiny_clip_dir, tiny_data_root, tmp_path_factory.mktemp("layout_model") / "model")


@pytest.fixture(scope="module")
def reference(model_dir, tiny_shards, tmp_path_factory):
    """One process, in this process, on the sharder's own layout: the submission and report to match."""
    out = tmp_path_factory.mktemp("reference")
    assert (
        infer_main(
            ["--model", str(model_dir), "--shards", str(tiny_shards), "--out", str(out / "s.csv"), *FLAGS]
        )
        == 0
    )
    argv = [
        "--eval",
        "--model",
        str(model_dir),
        "--shards",
        str(tiny_shards),
        "--out-dir",
        str(out / "r"),
        *FLAGS,
    ]
    assert infer_main(argv) == 0
    return (out / "s.csv").read_bytes(), json.loads((out / "r" / "report.json").read_text())


@pytest.mark.parametrize("world", sorted(INFER_MATRIX))
def test_infer_and_eval_on_every_layout(world, layouts, model_dir, reference, tmp_path):
    runs = []
    for name in INFER_MATRIX[world]:
        runs.append(
            [
                "--model",
                str(model_dir),
                "--shards",
                str(layouts[name]),
                "--out",
                str(tmp_path / f"{name}.csv"),
                *FLAGS,
            ]
        )
        runs.append(["--eval", "--model", str(model_dir), "--shards", str(layouts[name]),
                     "--out-dir", str(tmp_path / f"{name}-report"), *FLAGS])  # fmt: skip
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    prefix, extra = launcher("ddp", world) if world > 1 else launcher("python")
    label = f"infer.py + --eval, {world} rank(s), layouts {INFER_MATRIX[world]}"
    proc = check(launch(prefix + ["tests/_infer_runs.py", str(tmp_path / "runs.json")], label, 300, extra))
    assert len(proc.trace) == world and (world > 1 or proc.trace[0] == [])  # one process: no collective
    submission, report = reference
    for name in INFER_MATRIX[world]:
        assert (tmp_path / f"{name}.csv").read_bytes() == submission, f"{label}: {name}"
        got = json.loads((tmp_path / f"{name}-report" / "report.json").read_text())
        assert got["context"]["processes"] == world
        for key in ("score", "cls_score", "gps_score", "top1_acc", "mean_km", "n"):
            assert got[key] == pytest.approx(report[key], abs=1e-9), (label, name, key)  # same batch shapes
        assert got["embeddings"] == report["embeddings"] and got["embeddings"]["of"] == 12  # each sample once


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(TRAIN_MATRIX))
def test_train_both_phases_on_a_layout(case, layouts, tiny_clip_dir, tmp_path):
    kind, ranks, layout, overrides = TRAIN_MATRIX[case]
    args = train_args(layouts[layout], tiny_clip_dir, tmp_path / "run", tmp_path / "cache",
                      "train.epochs_frozen=1", "train.epochs_finetune=1", *overrides)  # fmt: skip
    prefix, extra = launcher(kind, ranks)
    check(launch(prefix + args, f"train.py {case}", 900, extra))
    meta = export_meta(tmp_path / "run")
    assert meta["extra"]["num_processes"] == ranks
    assert {r["phase_index"] for r in read_metrics(tmp_path / "run") if "train/loss" in r} == {1, 2}
    val = val_records(tmp_path / "run")
    assert {r["phase_index"] for r in val.values()} == {1, 2}
    assert all(r["val/n"] == 12 for r in val.values())  # every val sample once, on every layout
    assert torch.isfinite(torch.tensor([r["val/score"] for r in val.values()])).all()


def test_the_invariant_check_catches_unequal_collectives(tmp_path):
    """A DDP module evaluated through its wrapper on ranks with different batch counts: its first no-grad
    forward after construction or training broadcasts buffers, so rank 1 waits in a broadcast rank 0 never
    joins (until the 20 s collective timeout); the trace shows the ranks diverging. Unwrapped, no hang."""
    script = tmp_path / "unequal.py"
    script.write_text(
        "import os, torch\n"
        "from accelerate import Accelerator\n"
        "from geoloc.distributed import maybe_trace_collectives, process_group_kwargs, eval_module\n"
        "acc = Accelerator(cpu=True, kwargs_handlers=process_group_kwargs(20))\n"
        "maybe_trace_collectives(acc.process_index)\n"
        "model = acc.prepare(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)))\n"
        "wrapped = os.environ['MODE'] == 'wrapped'\n"
        "net = model if wrapped else eval_module(model)\n"
        "with torch.no_grad():\n"
        "    for _ in range(acc.process_index):  # rank 0 has no batch, rank 1 one (the layout that hung)\n"
        "        net(torch.ones(3, 2))\n"
        "acc.wait_for_everyone()\n"
    )
    prefix, extra = launcher("ddp", 2)
    ok = check(launch(prefix + [str(script)], "unwrapped eval", 120, {**extra, "MODE": "unwrapped"}))
    assert [line.split(" @ ")[0] for line in ok.trace[0]][-1:] == ["barrier"]
    bad = launch(prefix + [str(script)], "wrapped eval", 120, {**extra, "MODE": "wrapped"})
    with pytest.raises(AssertionError, match="made other collectives"):
        same_collectives(bad)  # however the run ended (a timeout here), the per-rank traces differ
    assert any("_broadcast_coalesced" in line for line in bad.trace[1])
