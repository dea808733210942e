"""train.py and infer.py with a DINOv2 and a SigLIP backbone: both phases in one process, the export
reloaded by infer.py; then two ranks under DDP, ZeRO-2 and ZeRO-3 (``slow``).

DINOv2 fine-tunes its last block only, with layer decay; SigLIP its whole backbone, pooled by its
attention-pooling head (``torch.nn.MultiheadAttention``, whose output projection ZeRO-3 must gather).
"""

import json

import pytest
import torch
from _hub_checks import check_hub_export
from _train_helpers import check, export_meta, read_metrics, run_train, train_args, val_records
from safetensors.torch import load_file

from geoloc.contract import read_submission_template
from geoloc.export import load_model_dir
from geoloc.infer.cli import main as infer_main
from geoloc.infer.submission import validate_submission

SHORT = ("train.epochs_frozen=1", "train.epochs_finetune=1")
RUNS = {
    "dinov2": ("model.pooling=cls", "train.unfreeze_last_n=1", "train.layer_decay=0.5"),
    "siglip": ("model.pooling=projection", "train.unfreeze_last_n=0"),
}


def _source_weights(path) -> dict[str, torch.Tensor]:
    """The checkpoint's vision weights under their GeoModel names (``backbone.model.<name>``)."""
    state = load_file(path / "model.safetensors")
    prefix = "vision_model."  # a full SigLIP dir keeps the towers apart
    return {
        f"backbone.model.{k.removeprefix(prefix)}": v
        for k, v in state.items()
        if not k.startswith(("text_model.", "logit_"))
    }


@pytest.fixture(scope="module", params=sorted(RUNS))
def family_run(request, tiny_shards, tmp_path_factory):
    family = request.param
    source = request.getfixturevalue(f"tiny_{family}_dir")
    root = tmp_path_factory.mktemp(f"train_{family}")
    args = train_args(tiny_shards, source, root / "run", root / "cache", *SHORT, *RUNS[family])
    check(run_train(args))
    return family, source, root / "run"


def test_both_phases_train_and_validate(family_run):
    family, _, run = family_run
    train = [r for r in read_metrics(run) if "train/loss" in r]
    assert {r["phase_index"] for r in train} == {1, 2}
    assert all(r["train/loss"] == r["train/loss"] for r in train)  # finite: NaN != NaN
    assert {r["phase_index"] for r in val_records(run).values()} == {1, 2}
    meta = export_meta(run)
    assert meta["pooling"] == RUNS[family][0].split("=")[1] and meta["preprocess"]["image_size"] == 56
    (key,) = [d.name for d in (run.parent / "cache").iterdir() if d.is_dir()]  # one cached table set
    assert (run.parent / "cache" / key / "train.pt").is_file()


def test_the_export_is_a_hub_model_of_its_family(family_run):
    """GeolocModel.from_pretrained rebuilds the DINOv2 / SigLIP tower from config.json and predicts what
    load_model_dir predicts, bit for bit."""
    family, _, run = family_run
    check_hub_export(run / "model")
    hub_config = json.loads((run / "model" / "config.json").read_text())
    assert (
        hub_config["clip_vision"]["model_type"]
        == {"dinov2": "dinov2", "siglip": "siglip_vision_model"}[family]
    )


def test_phase_2_changes_exactly_the_unfrozen_blocks(family_run):
    """DINOv2 (last block + layernorm): the first block and the embeddings keep the checkpoint's weights;
    SigLIP (whole backbone): they move too."""
    family, source, run = family_run
    before = _source_weights(source)
    (last_ckpt,) = (run / "checkpoints").glob(
        "finetune-*"
    )  # the export holds the best epoch: maybe phase 1's
    after = load_file(last_ckpt / "model.safetensors")
    block = "encoder.layer" if family == "dinov2" else "encoder.layers"
    first = f"backbone.model.{block}.0.mlp.fc1.weight"
    last = f"backbone.model.{block}.1.mlp.fc1.weight"
    assert not torch.equal(after[last], before[last])
    assert torch.equal(after[first], before[first]) == (family == "dinov2")
    if family == "dinov2":  # never trained: read only with masked pre-training inputs
        assert torch.equal(
            after["backbone.model.embeddings.mask_token"], before["backbone.model.embeddings.mask_token"]
        )
        assert not torch.equal(
            after["backbone.model.layernorm.weight"], before["backbone.model.layernorm.weight"]
        )


def test_infer_eval_on_the_export_reproduces_the_trainers_best_val_score(
    family_run, tiny_shards, tmp_path, capsys
):
    """With the decoding validation used (the run's ``decode``: state head + GPS regression here)."""
    _, _, run = family_run
    code = infer_main(["--eval", "--model", str(run / "model"), "--shards", str(tiny_shards),
                       "--out-dir", str(tmp_path), "--no-progress", "--decode-state", "head",
                       "--decode-gps", "regression", "--knn-alpha", "0"])  # fmt: skip
    assert code == 0, capsys.readouterr()
    report = json.loads((tmp_path / "report.json").read_text())
    best = max(r["val/score"] for r in val_records(run).values())
    assert report["n"] == 12 and export_meta(run)["extra"]["val"]["score"] == pytest.approx(best, abs=1e-12)
    assert report["score"] == pytest.approx(best, abs=1e-6)


def test_infer_writes_a_valid_submission_from_the_export(
    family_run, tiny_shards, tiny_data_root, tmp_path, capsys
):
    _, _, run = family_run
    out = tmp_path / "submission.csv"
    code = infer_main(["--model", str(run / "model"), "--shards", str(tiny_shards), "--out", str(out),
                       "--no-progress", "--num-workers", "0", "--batch-size", "5"])  # fmt: skip
    assert code == 0, capsys.readouterr()
    template = read_submission_template(tiny_data_root / "sample_submission.csv")
    assert validate_submission(out, template) == []


# ----------------------------------------------------------------------------- DDP and DeepSpeed


def _check_ranks(run, distributed_type: str, pooling: str, ranks: int = 2) -> None:
    """Both phases trained and validated on ``ranks`` processes; the export reloads on the CPU."""
    meta = export_meta(run)
    assert meta["extra"]["num_processes"] == ranks
    assert meta["extra"]["distributed_type"].endswith(distributed_type)
    assert meta["pooling"] == pooling
    assert {r["phase_index"] for r in read_metrics(run) if "train/loss" in r} == {1, 2}
    assert all(r["val/n"] == 12 for r in val_records(run).values())  # every val sample once over the ranks
    loaded = load_model_dir(run / "model")
    with torch.no_grad():
        out = loaded.model(torch.zeros(2, 4, 3, 56, 56), torch.ones(2, 4, dtype=torch.bool))
    assert torch.isfinite(out["state"]).all() and torch.isfinite(out["gps"]).all()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "pooling"), [("dinov2", "mean"), ("siglip", "projection")]
)  # DINOv2's mask_token: trainable, DDP would fail at the 2nd step
def test_ddp_two_ranks_fine_tune_the_whole_backbone(family, pooling, request, layouts, tmp_path):
    source = request.getfixturevalue(f"tiny_{family}_dir")
    args = train_args(layouts["one"], source, tmp_path / "run", tmp_path / "cache", *SHORT,
                      f"model.pooling={pooling}", "train.eval_batch_size=5")  # fmt: skip
    check(run_train(args, kind="ddp"))
    _check_ranks(tmp_path / "run", "MULTI_CPU", pooling)
    assert (
        len([r for r in read_metrics(tmp_path / "run") if r.get("phase_index") == 2 and "train/loss" in r])
        >= 2
    )


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_two_ranks_train_a_siglip_backbone(stage, tiny_siglip_dir, tiny_shards, layouts, tmp_path):
    """ZeRO-3 partitions the attention-pooling head's MultiheadAttention, which reads its out_proj weight
    without calling out_proj; ZeRO-3 validation also runs 2 and 1 eval batches on the two ranks."""
    shards = layouts["one"] if stage == 2 else tiny_shards
    args = train_args(shards, tiny_siglip_dir, tmp_path / "run", tmp_path / "cache", *SHORT,
                      "model.pooling=projection", "train.unfreeze_last_n=1", "train.layer_decay=0.8",
                      "train.batch_size=4", "train.finetune_batch_size=4", "train.eval_batch_size=5")  # fmt: skip
    check(run_train(args, kind=f"zero{stage}"))
    _check_ranks(tmp_path / "run", "DEEPSPEED", "projection")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_one_rank_trains_a_dinov2_backbone(stage, tiny_dinov2_dir, tiny_shards, tmp_path):
    """A launched single-process DeepSpeed run, the last block unfrozen with layer decay."""
    args = train_args(tiny_shards, tiny_dinov2_dir, tmp_path / "run", tmp_path / "cache", *SHORT,
                      *RUNS["dinov2"], "train.batch_size=4", "train.finetune_batch_size=4")  # fmt: skip
    check(run_train(args, kind=f"zero{stage}", nproc=1))
    _check_ranks(tmp_path / "run", "DEEPSPEED", "cls", ranks=1)
