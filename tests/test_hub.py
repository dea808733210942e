"""Hub format: an exported directory loads with ``GeolocModel.from_pretrained`` and ``AutoModel`` and predicts
bit for bit what ``load_model_dir`` predicts; checksums verified, no code run from the directory; the push
is wired to ``upload_folder`` (monkeypatched: no network here) and fails clearly offline, before any work."""

import json
import shutil

import huggingface_hub
import pytest
import torch
from _infer_helpers import export_tiny_model
from safetensors import safe_open

from geoloc.export import HUB_CONFIG, WEIGHTS, ModelDirError, load_model_dir
from geoloc.hf_model import GeolocConfig, GeolocModel, HubLoadError
from geoloc.hub import HubError, check_push_target, main, push_model_dir
from geoloc.model_card import CARD


@pytest.fixture(scope="module")
def model_dir(tiny_clip_dir, tiny_data_root, tmp_path_factory):
    return export_tiny_model(tiny_clip_dir, tiny_data_root, tmp_path_factory.mktemp("hub") / "model")


@pytest.fixture
def copy(model_dir, tmp_path):
    """A private copy of the exported directory, for tests that break it."""
    return shutil.copytree(model_dir, tmp_path / "model")


@pytest.fixture
def online(monkeypatch):
    """Not offline, with a token, and the hub client's two calls recorded instead of sent."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    calls = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda *a, **k: calls.append(("create", a, k)))

    def upload(**kwargs):
        calls.append(("upload", (), kwargs))
        return type("Commit", (), {"commit_url": f"https://hub.test/{kwargs['repo_id']}/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "upload_folder", upload)
    return calls


def _inputs(size: int):
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[True, True, True, True], [False, True, False, True], [True, False, False, False]])
    return torch.randn(3, 4, 3, size, size, generator=g), mask


def _outputs(model, size):
    with torch.no_grad():
        return model(*_inputs(size))


def test_from_pretrained_and_automodel_predict_bit_for_bit_what_load_model_dir_predicts(model_dir):
    from transformers import AutoConfig, AutoModel

    loaded = load_model_dir(model_dir)
    size = loaded.preprocess["image_size"]
    want = _outputs(loaded.model, size)
    want_decoded = loaded.decoder()(want)
    for model in (GeolocModel.from_pretrained(model_dir), AutoModel.from_pretrained(str(model_dir))):
        assert type(model) is GeolocModel and not model.training
        got = _outputs(model, size)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        decoded = model.decoder()(got)
        assert all(torch.equal(decoded[k], want_decoded[k]) for k in want_decoded)
        assert model.loaded.encoder == loaded.encoder and model.loaded.model is model
    config = AutoConfig.from_pretrained(str(model_dir))
    assert type(config) is GeolocConfig and config.model_type == "geoloc"
    assert config.id2label == dict(enumerate(loaded.encoder.state_names))
    assert config.state_indices == list(loaded.encoder.state_indices)


def test_state_dict_keys_are_exactly_the_weights_file_keys(model_dir):
    """One model.safetensors serves both loaders: no second copy of the weights."""
    with safe_open(model_dir / WEIGHTS, "pt") as f:
        keys = set(f.keys())
    model = GeolocModel.from_pretrained(model_dir)
    assert set(model.state_dict()) == keys
    assert {k.split(".")[0] for k in keys} == {"backbone", "norm", "heads"}  # average fusion: no weights
    assert sorted(p.name for p in model_dir.iterdir() if p.suffix == ".safetensors") == [WEIGHTS]


def test_a_model_built_from_the_config_alone_has_the_same_shapes_and_fresh_weights(model_dir):
    loaded = GeolocModel.from_pretrained(model_dir)
    fresh = GeolocModel(GeolocConfig.from_pretrained(str(model_dir)))
    a, b = loaded.state_dict(), fresh.state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert not torch.equal(a["heads.state.net.0.weight"], b["heads.state.net.0.weight"])
    with pytest.raises(HubLoadError, match="no decoder"):
        fresh.decoder()


def test_flipped_weight_bytes_are_refused_by_both_loaders(copy):
    from transformers import AutoModel

    data = bytearray((copy / WEIGHTS).read_bytes())
    data[-5] ^= 0xFF
    (copy / WEIGHTS).write_bytes(bytes(data))
    for load in (GeolocModel.from_pretrained, lambda p: AutoModel.from_pretrained(str(p))):
        with pytest.raises(ModelDirError, match=rf"{WEIGHTS}: modified or corrupted since export"):
            load(copy)


def test_a_config_json_that_disagrees_with_geoloc_json_names_file_and_key(copy):
    config = json.loads((copy / HUB_CONFIG).read_text())
    config["num_classes"] += 1
    (copy / HUB_CONFIG).write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match=rf"{HUB_CONFIG}: key 'num_classes' disagrees"):
        GeolocModel.from_pretrained(copy)


def test_code_in_the_directory_is_never_run(copy, tmp_path):
    """A config.json pointing at code beside it (auto_map) is refused; the module is never imported,
    through GeolocModel or through AutoModel (also with trust_remote_code=True)."""
    from transformers import AutoModel

    sentinel = tmp_path / "ran"
    (copy / "evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('x')\n")
    config = json.loads((copy / HUB_CONFIG).read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    (copy / HUB_CONFIG).write_text(json.dumps(config))
    for load in (
        GeolocModel.from_pretrained,
        lambda p: AutoModel.from_pretrained(str(p)),
        lambda p: AutoModel.from_pretrained(str(p), trust_remote_code=True),
    ):
        with pytest.raises(ModelDirError, match="auto_map"):
            load(copy)
    assert not sentinel.exists()


def test_a_directory_exported_before_hub_support_still_loads(copy, model_dir, caplog):
    (copy / HUB_CONFIG).unlink()
    with caplog.at_level("WARNING"):
        model = GeolocModel.from_pretrained(copy)
    assert "no config.json" in caplog.text
    size = model.loaded.preprocess["image_size"]
    want = _outputs(load_model_dir(model_dir).model, size)
    assert torch.equal(_outputs(model, size)["state"], want["state"])


def test_unknown_arguments_and_save_pretrained_are_refused(model_dir, tmp_path):
    with pytest.raises(HubLoadError, match="device_map"):
        GeolocModel.from_pretrained(model_dir, device_map="auto")
    model = GeolocModel.from_pretrained(model_dir)
    with pytest.raises(HubLoadError, match="python -m geoloc.hub push"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_hub_id_is_downloaded_then_loaded_the_same_way(model_dir, monkeypatch):
    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(model_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    model = GeolocModel.from_pretrained("someone/geoloc-test", revision="abc")
    assert calls == [("someone/geoloc-test", {"revision": "abc"})]
    assert model.config.name_or_path == "someone/geoloc-test"
    with pytest.raises(FileNotFoundError, match=r"not found \(nor a valid hub id\)"):
        GeolocModel.from_pretrained("/no/such/dir/x//y")
    monkeypatch.undo()  # the real client, offline (HF_HUB_OFFLINE=1 in tests)
    with pytest.raises(FileNotFoundError, match="runs/model: no such model directory, and the hub did not"):
        GeolocModel.from_pretrained("runs/model")


# ----------------------------------------------------------------------------- push


def test_push_uploads_the_verified_folder_to_the_repo(model_dir, online):
    url = push_model_dir(model_dir, "someone/geoloc-test", private=True)
    (create, upload) = online
    assert create[0] == "create" and create[1] == ("someone/geoloc-test",) and create[2]["private"] is True
    kwargs = upload[2]
    assert kwargs["repo_id"] == "someone/geoloc-test" and kwargs["folder_path"] == str(model_dir)
    assert kwargs["token"] == "hf_test_token" and ".*" in kwargs["ignore_patterns"]
    assert url.endswith("someone/geoloc-test/commit/1")
    assert {CARD, HUB_CONFIG, WEIGHTS} <= {p.name for p in model_dir.iterdir()}  # what the hub will show


def test_push_command_line(model_dir, online, capsys):
    assert main(["push", str(model_dir), "someone/geoloc-test", "--message", "first"]) == 0
    assert "pushed" in capsys.readouterr().out
    assert online[-1][2]["commit_message"] == "first"


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_push_offline_fails_clearly_before_reading_anything(model_dir, online, monkeypatch, capsys, var):
    monkeypatch.setenv(var, "1")
    monkeypatch.setattr("geoloc.hub.verify_model_dir", lambda path: pytest.fail("read the model dir"))
    assert main(["push", str(model_dir), "someone/geoloc-test"]) == 1
    assert f"{var} is set (offline mode)" in capsys.readouterr().err
    assert online == []


def test_push_needs_a_valid_repo_id_and_a_token(online, monkeypatch):
    with pytest.raises(HubError, match="not a valid repo id"):
        check_push_target("bad repo id!")
    with pytest.raises(HubError, match="OWNER/NAME"):
        check_push_target("justaname")
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(HubError, match="no Hugging Face token"):
        check_push_target("someone/geoloc-test")
    assert online == []


def test_a_broken_directory_is_never_uploaded(copy, online):
    data = bytearray((copy / WEIGHTS).read_bytes())
    data[-5] ^= 0xFF
    (copy / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(HubError, match="modified or corrupted"):
        push_model_dir(copy, "someone/geoloc-test")
    (copy / CARD).unlink()
    with pytest.raises(HubError, match="no README.md"):
        push_model_dir(copy, "someone/geoloc-test")
    assert online == []


def test_a_failing_upload_is_one_clear_error(model_dir, online, monkeypatch):
    def refuse(**kwargs):
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "upload_folder", refuse)
    with pytest.raises(HubError, match="failed: ConnectionError: network unreachable"):
        push_model_dir(model_dir, "someone/geoloc-test")


# ----------------------------------------------------------------------------- train.py --push-to-hub


def _train_main(argv, monkeypatch, fake_run):
    from geoloc.train import cli, phases

    monkeypatch.setattr(phases, "run", fake_run)
    return cli.main(argv)


def test_train_push_to_hub_offline_fails_at_start_up(tiny_shards, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["--shards", str(tiny_shards), "--output-dir", str(tmp_path / "run"), "--push-to-hub", "me/x"]
    with pytest.raises(SystemExit) as exit_:
        _train_main(argv, monkeypatch, lambda cfg, opts: pytest.fail("training started"))
    assert exit_.value.code == 2 and "HF_HUB_OFFLINE is set" in capsys.readouterr().err


def test_train_push_to_hub_uploads_the_exported_model_after_training(
    model_dir, tiny_shards, tmp_path, monkeypatch, online, capsys
):
    run = tmp_path / "run"

    def fake_run(cfg, opts):  # what training leaves behind: RUN/model
        assert online == []  # nothing is pushed before training has ended
        shutil.copytree(model_dir, opts.output_dir / "model")

    argv = ["--shards", str(tiny_shards), "--output-dir", str(run), "--push-to-hub", "me/geoloc"]
    assert _train_main(argv, monkeypatch, fake_run) == 0
    upload = online[-1][2]
    assert upload["repo_id"] == "me/geoloc" and upload["folder_path"] == str(run / "model")
    assert "pushed" in capsys.readouterr().out


def test_train_push_to_hub_without_an_exported_model_fails(
    tiny_shards, tmp_path, monkeypatch, online, capsys
):
    argv = ["--shards", str(tiny_shards), "--output-dir", str(tmp_path / "run"), "--push-to-hub", "me/geoloc"]
    assert _train_main(argv, monkeypatch, lambda cfg, opts: None) == 1
    assert "no model was exported" in capsys.readouterr().err and online == []


def test_hub_module_is_light_until_the_model_classes_are_asked_for():
    """``python -m geoloc.hub`` and train.py's start-up check import neither torch nor transformers."""
    import subprocess
    import sys

    code = (
        "import sys, geoloc.hub, geoloc.train.cli; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]"
    from geoloc import hub

    assert hub.GeolocModel is GeolocModel and hub.GeolocConfig is GeolocConfig  # loaded on first use
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        hub.Nope  # noqa: B018
