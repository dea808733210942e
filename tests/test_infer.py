"""infer.py in one process: submissions from shards and from the raw folder, broken views, ensembles, TTA,
calibration, --eval against evaluate(), --validate and the flags."""

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _infer_helpers import ROOT, export_tiny_model, read_csv, template_path
from accelerate import Accelerator

from geoloc.contract import PRED_STATE_COLUMNS, read_submission_template
from geoloc.data import decode_image, make_eval_loader, read_manifest, resolve_shards
from geoloc.export import load_model_dir
from geoloc.infer.calibrate import apply_temperature, fit_temperature, nll
from geoloc.infer.cli import build_parser, main
from geoloc.infer.ensemble import Ensemble, identity
from geoloc.infer.raw import RawTestDataset, make_raw_loader
from geoloc.infer.submission import validate_submission
from geoloc.infer.tta import crop_views, parse_scales
from geoloc.labels import LabelEncoder
from geoloc.metrics import Prior, top5_from_probs
from geoloc.predict import evaluate, predict
from geoloc.preprocess import Preprocessor
from geoloc.synth import corrupt_view

BLIND, ONE_BAD = "000053", "000050"  # test samples of tiny_data_root (ids 000048..000059)


@pytest.fixture(scope="module")
def model_dir(tiny_clip_dir, tiny_data_root, tmp_path_factory):
    return export_tiny_model(tiny_clip_dir, tiny_data_root, tmp_path_factory.mktemp("m0") / "model", seed=0)


@pytest.fixture(scope="module")
def model_dir2(tiny_clip_dir, tiny_data_root, tmp_path_factory):
    return export_tiny_model(tiny_clip_dir, tiny_data_root, tmp_path_factory.mktemp("m1") / "model", seed=1)


@pytest.fixture(scope="module")
def broken_root(tiny_data_root, tmp_path_factory):
    """A copy of the data with one bad view in one test sample and all four views bad in another."""
    root = shutil.copytree(tiny_data_root, tmp_path_factory.mktemp("broken") / "data")
    corrupt_view(root, ONE_BAD, "east", "truncated")
    for view, kind in zip(("north", "east", "south", "west"), ("truncated", "garbage", "missing", "garbage")):
        corrupt_view(root, BLIND, view, kind)
    return root


@pytest.fixture(scope="module")
def broken_shards(broken_root, tmp_path_factory):
    from geoloc.sharding import shard_dataset

    out = tmp_path_factory.mktemp("broken_shards")
    shard_dataset(broken_root, out, val_fraction=0.25, seed=0, samples_per_shard=7, workers=1)
    return out


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def run_cli(capsys, *argv, expect=0) -> dict | str:
    """``infer.py`` in this process; returns the summary JSON printed last (or stderr when it fails)."""
    code = main([str(a) for a in argv] + ["--no-progress", "--num-workers", "0", "--batch-size", "5"])
    out, err = capsys.readouterr()
    assert code == expect, out + err
    return json.loads(out.strip().splitlines()[-1]) if expect == 0 else err


def test_data_root_submission_has_every_row_and_original_state_indices(
    capsys, model_dir, tiny_data_root, tmp_path
):
    out = tmp_path / "sub.csv"
    summary = run_cli(capsys, "--model", model_dir, "--data-root", tiny_data_root, "--out", out)
    template = read_submission_template(template_path(tiny_data_root))
    sub = read_csv(out)
    assert list(sub["sample_id"]) == list(template["sample_id"]) and summary["rows"] == 12
    assert validate_submission(out, template) == []
    encoder = load_model_dir(model_dir).encoder
    assert list(encoder.state_indices) != list(range(encoder.num_classes))  # the data's indices have gaps
    states = set(sub[list(PRED_STATE_COLUMNS)].to_numpy().ravel())
    assert states <= set(encoder.state_indices) and not states <= set(range(encoder.num_classes))
    assert summary["processes"] == 1 and summary["from_prior"] == []


def test_submission_equals_a_direct_forward_pass(capsys, model_dir, tiny_data_root, tmp_path):
    """Independent of the loader/gather: decode the JPEGs here, run the model, rank, decode indices."""
    out = tmp_path / "sub.csv"
    run_cli(capsys, "--model", model_dir, "--data-root", tiny_data_root, "--out", out)
    sub = read_csv(out).set_index("sample_id")
    loaded = load_model_dir(model_dir)
    pre = Preprocessor(loaded.preprocess["image_size"], loaded.preprocess["mean"], loaded.preprocess["std"])
    template = read_submission_template(template_path(tiny_data_root))
    for row in template.head(3).itertuples(index=False):
        names = (row.image_north, row.image_east, row.image_south, row.image_west)
        images = torch.stack([decode_image((tiny_data_root / "test_images" / n).read_bytes()) for n in names])
        with torch.no_grad():
            out = loaded.model(pre(images[None]), torch.ones(1, 4, dtype=torch.bool))
        top5 = top5_from_probs(torch.softmax(out["state"], -1).numpy(), loaded.encoder)[0]
        assert sub.loc[row.sample_id, list(PRED_STATE_COLUMNS)].tolist() == top5.tolist()
        np.testing.assert_allclose(
            sub.loc[row.sample_id, "predicted_latitude"], out["gps"][0, 0].item(), atol=1e-5
        )
        np.testing.assert_allclose(
            sub.loc[row.sample_id, "predicted_longitude"], out["gps"][0, 1].item(), atol=1e-5
        )


def test_shards_mode_equals_data_root_mode_and_finds_the_template(
    capsys, model_dir, tiny_data_root, tiny_shards, tmp_path
):
    a, b = tmp_path / "raw.csv", tmp_path / "shards.csv"
    run_cli(capsys, "--model", model_dir, "--data-root", tiny_data_root, "--out", a)
    summary = run_cli(capsys, "--model", model_dir, "--shards", tiny_shards, "--out", b)  # no --template
    assert summary["template"] == str(template_path(read_manifest(str(tiny_shards))["data_root"]))
    assert a.read_bytes() == b.read_bytes()


def test_broken_views_keep_every_row_and_blind_sample_gets_the_prior(
    capsys, model_dir, broken_root, broken_shards, tmp_path
):
    raw, sharded = tmp_path / "raw.csv", tmp_path / "shards.csv"
    summary = run_cli(capsys, "--model", model_dir, "--data-root", broken_root, "--out", raw)
    template = read_submission_template(template_path(broken_root))
    sub = read_csv(raw).set_index("sample_id")
    assert list(sub.index) == list(template["sample_id"])
    assert summary["from_prior"] == [BLIND]
    assert summary["views"]["bad_views"] + summary["views"]["missing_views"] == 5
    prior = Prior.from_dict(load_model_dir(model_dir).prior)
    assert sub.loc[BLIND, list(PRED_STATE_COLUMNS)].tolist() == list(prior.top5)
    assert sub.loc[BLIND, "predicted_latitude"] == pytest.approx(prior.lat, abs=1e-6)
    assert sub.loc[ONE_BAD, "predicted_latitude"] != pytest.approx(prior.lat, abs=1e-3)  # from its 3 views
    summary = run_cli(capsys, "--model", model_dir, "--shards", broken_shards, "--out", sharded)
    assert summary["from_prior"] == [BLIND]
    assert raw.read_bytes() == sharded.read_bytes()


def test_ensemble_of_a_model_with_itself_equals_the_model(capsys, model_dir, tiny_shards, tmp_path):
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    run_cli(capsys, "--model", model_dir, "--shards", tiny_shards, "--out", one)
    args = ("--model", model_dir, "--model", model_dir, "--weights", 0.7, 0.3)
    run_cli(capsys, *args, "--shards", tiny_shards, "--out", two)
    assert one.read_bytes() == two.read_bytes()


def _single(loaded):
    p = loaded.preprocess
    return Ensemble([loaded.model], [Preprocessor(p["image_size"], p["mean"], p["std"])], [loaded.decoder()])


def test_weighted_ensemble_averages_probabilities_and_points(
    model_dir, model_dir2, tiny_data_root, accelerator
):
    a, b = load_model_dir(model_dir), load_model_dir(model_dir2)
    template = read_submission_template(template_path(tiny_data_root))
    loader = make_raw_loader(tiny_data_root, template, batch_size=5, num_workers=0)
    pa = predict(_single(a), loader, identity, accelerator, progress=False)
    pb = predict(_single(b), loader, identity, accelerator, progress=False)
    members = [_single(m) for m in (a, b)]
    both = Ensemble(
        [a.model, b.model], [m.preprocessors[0] for m in members], [a.decoder(), b.decoder()], [3, 1]
    )
    pe = predict(both, loader, identity, accelerator, progress=False)
    np.testing.assert_allclose(pe.probs, 0.75 * pa.probs + 0.25 * pb.probs, atol=1e-6)
    np.testing.assert_allclose(pe.gps, 0.75 * pa.gps + 0.25 * pb.gps, atol=1e-4)
    assert not np.allclose(pa.probs, pb.probs, atol=1e-3)  # the two members really differ


def test_ensemble_hands_on_the_first_members_embedding(model_dir, model_dir2, tiny_data_root, accelerator):
    """The fused embeddings of members differ in meaning (and may in width): never averaged."""
    a, b = load_model_dir(model_dir), load_model_dir(model_dir2)
    template = read_submission_template(template_path(tiny_data_root))
    loader = make_raw_loader(tiny_data_root, template, batch_size=5, num_workers=0)
    pre = [_single(m).preprocessors[0] for m in (a, b)]
    keep = ("embedding",)
    alone = Ensemble([a.model], pre[:1], [a.decoder(passthrough=keep)])
    both = Ensemble([a.model, b.model], pre, [a.decoder(passthrough=keep), b.decoder()], [3, 1])
    pa = predict(alone, loader, identity, accelerator, progress=False)
    pe = predict(both, loader, identity, accelerator, progress=False)
    assert pe.values["embedding"].shape == (len(template), a.model.embed_dim)
    np.testing.assert_array_equal(pe.values["embedding"], pa.values["embedding"])


def test_ensemble_rejects_members_with_other_states(
    capsys, model_dir, tiny_clip_dir, tiny_data_root, tmp_path
):
    other = export_tiny_model(tiny_clip_dir, tiny_data_root, tmp_path / "other")
    meta = json.loads((other / "geoloc.json").read_text())
    meta["label_encoder"]["state_indices"][0] = 49 if meta["label_encoder"]["state_indices"][0] != 49 else 48
    (other / "geoloc.json").write_text(json.dumps(meta))
    err = run_cli(
        capsys,
        "--model",
        model_dir,
        "--model",
        other,
        "--data-root",
        tiny_data_root,
        "--out",
        tmp_path / "x.csv",
        expect=2,
    )
    assert "states" in err and str(other) in err


def test_eval_report_equals_evaluate_as_the_trainer_calls_it(
    capsys, model_dir, tiny_shards, tmp_path, accelerator
):
    out_dir = tmp_path / "report"
    code = main(
        [
            "--eval",
            "--model",
            str(model_dir),
            "--shards",
            str(tiny_shards),
            "--out-dir",
            str(out_dir),
            "--no-progress",
            # the same batch shapes as below: CPU kernels round differently per shape (and per processor),
            # so only identical shapes give identical float32 outputs on every x86-64 machine
            "--batch-size",
            "3",
            "--num-workers",
            "0",
        ]
    )
    assert code == 0 and "val: score" in capsys.readouterr().out
    report = json.loads((out_dir / "report.json").read_text())
    loaded = load_model_dir(model_dir)
    p = loaded.preprocess
    loader = make_eval_loader(
        resolve_shards(str(tiny_shards), "val"), batch_size=3, num_workers=0, encoder=loaded.encoder
    )
    want = evaluate(
        predict(
            loaded.model,
            loader,
            Preprocessor(p["image_size"], p["mean"], p["std"]),
            accelerator,
            decoder=loaded.decoder(),
        ),
        loaded.encoder,
    )
    assert want["n"] == read_manifest(str(tiny_shards))["splits"]["val"]["count"]
    for key, value in want.items():
        assert report[key] == pytest.approx(value, abs=1e-9), key
    for name in ("confusion.png", "map.png", "errors_km.png", "embeddings.png"):
        assert (out_dir / name).read_bytes()[:4] == b"\x89PNG"
    assert np.sum(report["confusion"]["counts"]) == want["n"]
    assert report["embeddings"]["points"] == report["embeddings"]["of"] == want["n"]  # every val sample


def test_validate_mode_exit_status_and_messages(capsys, model_dir, tiny_data_root, tmp_path):
    good = tmp_path / "good.csv"
    run_cli(capsys, "--model", model_dir, "--data-root", tiny_data_root, "--out", good)
    template = template_path(tiny_data_root)
    assert main(["--validate", str(good), "--template", str(template)]) == 0
    assert '"valid": true' in capsys.readouterr().out
    bad = tmp_path / "bad.csv"
    df = read_csv(good)
    df.loc[3, "predicted_state_idx_1"] = 77
    df.drop(index=5).to_csv(bad, index=False)
    assert main(["--validate", str(bad), "--template", str(template)]) == 1
    out = capsys.readouterr().out
    assert "11 rows, the template has 12" in out and "predicted_state_idx_1: outside 0..49" in out


def test_template_mismatch_is_an_error_and_writes_nothing(
    capsys, model_dir, tiny_data_root, tiny_shards, tmp_path
):
    template = read_submission_template(template_path(tiny_data_root))
    path = tmp_path / "template.csv"
    template.iloc[1:].to_csv(path, index=False)  # one test sample of the shards is not in this template
    out = tmp_path / "x.csv"
    err = run_cli(
        capsys, "--model", model_dir, "--shards", tiny_shards, "--template", path, "--out", out, expect=2
    )
    assert template["sample_id"][0] in err and "not in the template" in err
    assert not out.exists()


def test_tta_and_calibration_runs_produce_valid_files(
    capsys, model_dir, model_dir2, tiny_shards, tiny_data_root, tmp_path
):
    plain, tta = tmp_path / "plain.csv", tmp_path / "tta.csv"
    run_cli(capsys, "--model", model_dir, "--shards", tiny_shards, "--out", plain)
    summary = run_cli(capsys, "--model", model_dir, "--shards", tiny_shards, "--out", tta, "--tta", "scales")
    assert summary["tta_scales"] == [1.0, 0.9, 0.8]
    template = read_submission_template(template_path(tiny_data_root))
    assert validate_submission(tta, template) == []
    assert plain.read_bytes() != tta.read_bytes()  # the crops change the points
    calibrated = tmp_path / "calibrated.csv"
    summary = run_cli(
        capsys, "--model", model_dir, "--shards", tiny_shards, "--out", calibrated, "--calibrate"
    )
    (t,) = summary["temperatures"]
    assert t > 0 and t != 1.0
    assert calibrated.read_bytes() == plain.read_bytes()  # one model: a temperature keeps its ranking
    summary = run_cli(capsys, "--model", model_dir, "--model", model_dir2, "--shards", tiny_shards,
                      "--out", calibrated, "--calibrate")  # fmt: skip
    assert len(summary["temperatures"]) == 2
    assert validate_submission(calibrated, template) == []


# ----------------------------------------------------------------------------- units


def test_fit_temperature_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4000, 6)) * 3
    true_t = 2.5
    p_true = np.exp(logits / true_t)
    p_true /= p_true.sum(1, keepdims=True)
    labels = np.array([rng.choice(6, p=p) for p in p_true])
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)  # the over-confident model: temperature 1
    t = fit_temperature(probs, labels)
    assert t == pytest.approx(true_t, rel=0.1)
    log_p = np.log(probs)
    assert nll(log_p, labels, t) < nll(log_p, labels, 1.0)
    calibrated = apply_temperature(probs, t)
    np.testing.assert_allclose(calibrated.sum(1), 1, atol=1e-5)
    np.testing.assert_array_equal(calibrated.argmax(1), probs.argmax(1))


def test_raw_dataset_spreads_rows_over_ranks_exactly_once(tiny_data_root):
    template = read_submission_template(template_path(tiny_data_root))
    parts = [RawTestDataset(tiny_data_root, template, rank, 3).ids for rank in range(3)]
    ids = [i for part in parts for i in part]
    assert sorted(ids) == sorted(template["sample_id"]) and len(ids) == 12
    with pytest.raises(ValueError, match="rank 3"):
        RawTestDataset(tiny_data_root, template, 3, 3)


def test_crop_views_and_parse_scales():
    images = torch.arange(2 * 4 * 3 * 10 * 10, dtype=torch.int64).view(2, 4, 3, 10, 10).to(torch.uint8)
    assert crop_views(images, 1.0) is images
    crop = crop_views(images, 0.6)
    assert crop.shape == (2, 4, 3, 6, 6)
    assert torch.equal(crop, images[..., 2:8, 2:8])
    assert parse_scales("none") == (1.0,) and parse_scales("1.0, 0.85") == (1.0, 0.85)
    for bad in ("1.2", "abc", "0"):
        with pytest.raises(ValueError, match="--tta"):
            parse_scales(bad)


def test_flag_errors_exit_with_usage(model_dir, tmp_path):
    cases = [
        ["--model", str(model_dir), "--data-root", str(tmp_path), "--out", "x.csv", "--weights", "1", "2"],
        ["--model", str(model_dir), "--out", "x.csv"],  # no data
        [
            "--eval",
            "--model",
            str(model_dir),
            "--data-root",
            str(tmp_path),
            "--out-dir",
            "r",
        ],  # eval needs shards
        ["--validate", "x.csv"],  # needs --template
    ]
    for argv in cases:
        with pytest.raises(SystemExit) as err:
            main(argv)
        assert err.value.code == 2, argv


def test_help_is_fast_and_explains_every_flag():
    for action in build_parser()._actions:
        assert action.help and action.help.strip(), action.option_strings
    code = "import sys, geoloc.infer.cli as c; c.build_parser().format_help(); print(sorted(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    assert out.strip() == "[]"


def test_encoder_non_consecutive_in_fixture_data(tiny_data_root):
    """Guard for the tests above: the generated data really uses gapped original indices."""
    from geoloc.contract import read_train_table

    enc = LabelEncoder.fit(read_train_table(tiny_data_root)["state_idx"])
    assert np.any(np.diff(enc.state_indices) > 1)


def _relabelled_shards(tiny_shards, tmp_path):
    """A copy of the shards whose manifest lists a state the model never saw (another data set)."""
    shards = shutil.copytree(tiny_shards, tmp_path / "other")
    manifest = json.loads((shards / "manifest.json").read_text())
    enc = manifest["label_encoder"]
    unseen = next(i for i in range(50) if i not in enc["state_indices"])
    enc["state_indices"], enc["state_names"] = enc["state_indices"] + [unseen], enc["state_names"] + ["X"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    return shards, unseen


def test_eval_on_shards_of_another_label_set_is_refused_up_front(capsys, model_dir, tiny_shards, tmp_path):
    shards, unseen = _relabelled_shards(tiny_shards, tmp_path)
    err = run_cli(
        capsys, "--eval", "--model", model_dir, "--shards", shards, "--out-dir", tmp_path / "r", expect=2
    )
    assert f"cannot score states [{unseen}]" in err and "manifest.json" in err
    assert not (tmp_path / "r" / "report.json").exists()


def test_predicting_shards_of_another_label_set_warns(capsys, caplog, model_dir, tiny_shards, tmp_path):
    shards, _ = _relabelled_shards(tiny_shards, tmp_path)
    run_cli(capsys, "--model", model_dir, "--shards", shards, "--out", tmp_path / "s.csv")
    assert "differ from the model's" in caplog.text


def test_remote_style_shard_template_with_manifest(capsys, model_dir, tiny_shards, tmp_path):
    """infer reads '{shard}' templates with --manifest, as train.py does; the result equals a local run."""
    local, remote = tmp_path / "local.csv", tmp_path / "remote.csv"
    run_cli(capsys, "--model", model_dir, "--shards", tiny_shards, "--out", local)
    spec, manifest = f"file:{tiny_shards}/{{shard}}", tiny_shards / "manifest.json"
    run_cli(capsys, "--model", model_dir, "--shards", spec, "--manifest", manifest, "--out", remote)
    assert local.read_bytes() == remote.read_bytes()
    err = run_cli(capsys, "--model", model_dir, "--shards", spec, "--out", remote, expect=2)
    assert "--manifest" in err


# ---------------------------------------------------------------- bad input: templates, image cells, outputs


def _copy_root(tiny_data_root, tmp_path):
    """A private copy of the data root (the session one is shared)."""
    return shutil.copytree(tiny_data_root, tmp_path / "data")


def _bad_template(template, kind):
    if kind == "repeated_id":
        return pd.concat([template, template.iloc[[3]]])
    if kind == "padded_repeat":
        template.loc[5, "sample_id"] = template.loc[4, "sample_id"] + "  "
        return template
    return template.iloc[:0]  # no rows


@pytest.mark.parametrize("kind", ["repeated_id", "padded_repeat", "no_rows"])
@pytest.mark.parametrize("mode", ["--template", "--data-root"])
def test_a_template_with_a_repeated_id_or_no_rows_is_refused_before_the_models_load(
    capsys, tiny_data_root, tmp_path, kind, mode
):
    root = _copy_root(tiny_data_root, tmp_path)
    template = pd.read_csv(template_path(root), dtype=str)
    _bad_template(template, kind).to_csv(template_path(root), index=False)
    data = (
        ["--template", template_path(root), "--data-root", root]
        if mode == "--template"
        else ["--data-root", root]
    )
    out = tmp_path / "sub.csv"
    err = run_cli(capsys, "--model", tmp_path / "no_model_here", *data, "--out", out, expect=2)
    assert f"infer.py: error: {template_path(root)}" in err  # the template is named, not the model
    assert ("no rows" if kind == "no_rows" else "appear more than once") in err
    assert not out.exists()


@pytest.mark.parametrize("cell", ["/ABS", "../test_images/NAME", "sub/../../NAME"])
def test_raw_loader_masks_counts_and_warns_about_a_cell_outside_the_images_folder(
    tiny_data_root, tmp_path, caplog, cell
):
    """The view is never opened (it names a readable JPEG), the sample is kept, the other views are read."""
    template = read_submission_template(template_path(tiny_data_root))
    name = template.loc[2, "image_south"]
    real = Path(tiny_data_root) / "test_images" / name
    template.loc[2, "image_south"] = cell.replace("/ABS", str(real)).replace("NAME", name)
    dataset = RawTestDataset(tiny_data_root, template)
    with caplog.at_level(logging.WARNING, logger="geoloc.infer.raw"):
        item = dataset[2]
    assert item["sample_id"] == template.loc[2, "sample_id"] and len(dataset) == 12
    assert item["view_mask"].tolist() == [True, True, False, True]
    assert not item["images"][2].any()
    assert dataset.stats.as_dict()["bad_views"] == 1
    assert (
        template.loc[2, "sample_id"] in caplog.text
        and "image_south" in caplog.text
        and "bad_path" in caplog.text
    )


@pytest.mark.parametrize("flag", ["--out", "--out-dir"])
def test_an_unwritable_output_is_an_error_before_the_models_load(
    capsys, tiny_shards, tmp_path, read_only_dir, flag
):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [(a_file / "x", "lies under the file"), (read_only_dir / "x", "cannot write in")]
    if flag == "--out":
        cases.append((tmp_path, "is a folder; give a file name"))
    mode = ["--eval"] if flag == "--out-dir" else []
    for path, match in cases:
        argv = [*mode, "--model", tmp_path / "no_model_here", "--shards", tiny_shards, flag, path]
        err = run_cli(capsys, *argv, expect=2)
        assert f"infer.py: error: {flag} {path}: {match}" in err


def test_validate_refuses_a_template_with_a_repeated_id(capsys, tiny_data_root, tmp_path):
    root = _copy_root(tiny_data_root, tmp_path)
    template = pd.read_csv(template_path(root), dtype=str)
    _bad_template(template, "repeated_id").to_csv(template_path(root), index=False)
    assert main(["--validate", str(tmp_path / "sub.csv"), "--template", str(template_path(root))]) == 2
    err = capsys.readouterr().err
    assert f"infer.py: error: {template_path(root)}" in err and "on lines [5, 14]" in err
