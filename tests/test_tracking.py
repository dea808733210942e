"""MetricsLogger (jsonl on main only, wandb offline through accelerate), curves plot, progress helpers."""

import json
from types import SimpleNamespace

import pytest
import torch

from geoloc.train.progress import Throughput, postfix, progress_bar
from geoloc.train.tracking import MetricsLogger, family, log_with, plot_curves, read_series


def _rank(main: bool):
    """The two attributes the logger reads from an Accelerator, for one rank of a run without trackers."""
    return SimpleNamespace(is_main_process=main, log_with=None)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_records_step_time_and_floats(tmp_path):
    logger = MetricsLogger(tmp_path, _rank(True))
    logger.log({"train/loss": torch.tensor(0.5), "lr": 1e-3}, step=1)
    logger.log({"val/score": 0.25, "train/loss": float("nan")}, step=2)
    first, second = _lines(tmp_path / "metrics.jsonl")
    assert first["step"] == 1 and first["train/loss"] == 0.5 and first["lr"] == 1e-3
    assert isinstance(first["time"], float) and second["time"] >= first["time"]
    assert second == {"step": 2, "time": second["time"], "val/score": 0.25, "train/loss": None}


def test_only_main_process_writes_and_resume_appends(tmp_path):
    MetricsLogger(tmp_path, _rank(False)).log({"loss": 1.0}, step=1)
    assert not (tmp_path / "metrics.jsonl").exists()
    MetricsLogger(tmp_path, _rank(True)).log({"loss": 1.0}, step=1)
    MetricsLogger(tmp_path, _rank(True)).log({"loss": 0.5}, step=2)  # a resumed run continues the file
    assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [1, 2]


def test_read_series_keeps_the_resumed_value_and_names_bad_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0, "phase": "frozen"}, {"step": 2, "loss": 1.5}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_series(path) == {"loss": {1: 3.0, 2: 1.5}}  # strings are not plotted
    path.write_text('{"step": 1, "loss": 1}\nnot json\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_series(path)


def test_metric_families():
    assert family("train/loss_state") == family("val/loss") == "losses"
    assert family("lr/backbone") == family("train/lr_head") == "learning rate"
    assert family("val/km_median") == "distance (km)"
    assert family("val/score") == family("val/acc_top5") == "val score and parts"
    assert family("train/samples_per_s") == "throughput"
    assert family("epoch") == "other"
    # shares in [0, 1] plot beside the score, not on the km axis; the sample count is not a rate
    assert family("val/within_200km") == "val score and parts"
    assert family("val/median_km") == "distance (km)"
    assert family("val/n") == "other"


def test_plot_curves_from_synthetic_jsonl(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [
        {
            "step": s,
            "train/loss": 2.0 / (s + 1),
            "lr": 1e-3 * min(1, s / 3),
            "val/score": 0.1 * s,
            "val/km_mean": 900 - s,
        }
        for s in range(10)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    png = plot_curves(path, tmp_path / "curves.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert plot_curves(empty, tmp_path / "empty.png").stat().st_size > 0  # a run that died before logging


def test_finish_draws_curves_on_main_only(tmp_path):
    main = MetricsLogger(tmp_path / "a", _rank(True))
    main.log({"loss": 1.0}, step=1)
    assert main.finish() == tmp_path / "a" / "curves.png" and (tmp_path / "a" / "curves.png").is_file()
    assert MetricsLogger(tmp_path / "b", _rank(False)).finish() is None


def test_report_to_needs_matching_accelerator(tmp_path):
    with pytest.raises(ValueError, match="log_with"):
        MetricsLogger(tmp_path, _rank(True), report_to="wandb")
    with pytest.raises(ValueError, match="choose one of"):
        log_with("mlflow-typo")
    assert log_with("none") is None and log_with("wandb") == ["wandb"]


def test_wandb_offline_writes_its_run_dir(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("WANDB_MODE", "offline")  # no network: wandb writes a local run to sync later
    monkeypatch.setenv("WANDB_SILENT", "true")
    try:
        acc = Accelerator(cpu=True, log_with=log_with("wandb"))
        logger = MetricsLogger(tmp_path, acc, report_to="wandb", config={"train": {"seed": 0}})
        logger.log({"train/loss": 1.0}, step=1)
        logger.finish()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert _lines(tmp_path / "metrics.jsonl")[0]["train/loss"] == 1.0
    assert (tmp_path / "curves.png").is_file()


def test_progress_helpers():
    assert postfix(0.123456, 1e-5, 12.345) == {"loss": "0.1235", "lr": "1.00e-05", "samples/s": "12.3"}
    assert progress_bar(10, _rank(False), "train").disable
    bar = progress_bar(10, _rank(True), "train")
    assert not bar.disable
    bar.close()
    ticks = iter([0.0, 2.0, 3.0])
    meter = Throughput(clock=lambda: next(ticks))
    meter.add(8)
    meter.add(2)
    assert meter.rate() == pytest.approx(5.0)  # 10 samples in 2 s
    meter.add(4)
    assert meter.rate() == pytest.approx(4.0)  # only the samples since the last call
