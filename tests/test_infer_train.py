"""``infer.py --eval`` on a model from ``train.py`` reports the val numbers the trainer logged for it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from _infer_helpers import ENV, ROOT

from geoloc.infer.cli import main


@pytest.fixture(scope="module")
def trained_run(tiny_clip_dir, tiny_shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    cmd = [sys.executable, str(ROOT / "train.py"), "--shards", str(tiny_shards), "--output-dir", str(run),
           "--preset", "smoke", f"model.backbone={tiny_clip_dir}"]  # fmt: skip
    proc = subprocess.run(
        cmd, check=False, cwd=ROOT, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return run


def best_val(run) -> dict:
    """The val metrics of the exported (best) epoch, from RUN/metrics.jsonl, without the ``val/`` prefix."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in lines if "val/score" in r]
    best = max(vals, key=lambda r: r["val/score"])
    return {
        k.removeprefix("val/"): v for k, v in best.items() if k.startswith("val/") and k != "val/best_score"
    }


def test_eval_report_matches_the_trainers_val_metrics(capsys, trained_run, tiny_shards, tmp_path):
    """With the decoding validation used (the run's ``decode``: state head + GPS regression here)."""
    code = main(["--eval", "--model", str(trained_run / "model"), "--shards", str(tiny_shards),
                 "--out-dir", str(tmp_path), "--no-progress", "--decode-state", "head",
                 "--decode-gps", "regression", "--knn-alpha", "0"])  # fmt: skip
    assert code == 0, capsys.readouterr()
    report = json.loads((tmp_path / "report.json").read_text())
    want = best_val(trained_run)
    assert {"score", "cls_score", "gps_score", "top1_acc", "mean_km", "n"} <= set(want)
    for key, value in want.items():
        # same predict() + evaluate(); only the batch composition differs (float32 rounding)
        assert report[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key


def test_eval_with_the_models_default_decoder_reports_its_val_row(capsys, trained_run, tiny_shards, tmp_path):
    """The decoder that won on val after training is the default, and --eval reproduces its table row."""
    meta = json.loads((trained_run / "model" / "geoloc.json").read_text())
    best = max(meta["decoders_val"], key=lambda row: row["score"])
    assert (
        best["decoder"] == meta["decoder"]
        and (trained_run / "model" / "index" / "index.safetensors").is_file()
    )
    code = main(["--eval", "--model", str(trained_run / "model"), "--shards", str(tiny_shards),
                 "--out-dir", str(tmp_path), "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["score"] == pytest.approx(best["score"], rel=1e-5)
    assert report["mean_km"] == pytest.approx(best["mean_km"], rel=1e-5)


def test_from_pretrained_predicts_the_val_split_bit_for_bit_like_load_model_dir(trained_run, tiny_shards):
    """The save/load round trip through the hub format: the whole predict() path, default decoder (with
    the retrieval index), identical predictions; the card shows the decoder table and the run's data."""
    from _hub_checks import check_hub_export
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from geoloc.data import make_eval_loader, resolve_shards
    from geoloc.export import load_model_dir
    from geoloc.hf_model import GeolocModel
    from geoloc.predict import predict
    from geoloc.preprocess import Preprocessor

    model_dir = trained_run / "model"
    loaded, hub = load_model_dir(model_dir), GeolocModel.from_pretrained(model_dir)
    assert hub.loaded.index is not None
    runs, urls = [], resolve_shards(str(tiny_shards), "val")
    try:
        for model, decoder in ((loaded.model, loaded.decoder()), (hub, hub.decoder())):
            loader = make_eval_loader(urls, batch_size=4, encoder=loaded.encoder)
            pre = Preprocessor(**loaded.preprocess)
            runs.append(predict(model, loader, pre, Accelerator(cpu=True), decoder=decoder, progress=False))
    finally:
        AcceleratorState._reset_state(True)
    want, got = runs
    assert len(got) == 12 and list(got.sample_id) == list(want.sample_id)
    assert got.values.keys() == want.values.keys()
    assert all(np.array_equal(got.values[k], want.values[k], equal_nan=True) for k in want.values)
    check_hub_export(model_dir)
