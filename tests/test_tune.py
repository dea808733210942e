"""The hyper-parameter search (geoloc.tune): search space, pruning, the trainer's per-epoch hook, tiny real
studies on the cached embeddings (best.yaml round trip, resume, wandb grouping), a study resumed after a
SIGKILL, and studies under accelerate launch (DDP, ZeRO-2/3; 1 and 2 ranks).

Trials train the tiny CLIP's frozen phase on the shared embedding cache (``--preset smoke``: 2 epochs of
one or two updates), a few seconds each.
"""

import json
import math
import os
import subprocess
import sys
import time

import optuna
import pytest
from _train_helpers import REPO, check, launch, launcher, read_metrics, val_records

from geoloc.config import ConfigError, TrainConfig, config_to_dict, load_config

STUDY_FLAGS = ("--preset", "smoke")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One embedding cache for the module: the backbone runs once, every trial reads it."""
    return tmp_path_factory.mktemp("tune_cache")


def tune_args(shards, clip, out, cache, *extra) -> list[str]:
    return ["--shards", str(shards), "--output-dir", str(out), *STUDY_FLAGS, f"model.backbone={clip}",
            f"train.cache_dir={cache}", *extra]  # fmt: skip


def load(out, name="geoloc"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")


def states(study) -> list[str]:
    return [t.state.name for t in study.get_trials(deepcopy=False)]


def run_tune(argv) -> int:
    from geoloc.tune.cli import main

    return main(argv)


# ----------------------------------------------------------------------------- search space


def test_searched_keys_follow_the_heads_the_trial_kind_and_fixed_overrides():
    from geoloc.tune.space import override_keys, searched_keys

    cfg = load_config()
    frozen = searched_keys(cfg, finetune=False, fixed=set())
    assert "train.head_lr" in frozen and "loss.weights.state" in frozen and "loss.weights.gps" in frozen
    assert "train.backbone_lr" not in frozen and "train.layer_decay" not in frozen  # backbone frozen
    assert "loss.weights.cell" not in frozen  # no cell head
    full = searched_keys(cfg, finetune=True, fixed=set())
    assert {"train.backbone_lr", "train.layer_decay"} <= set(full)
    cells = load_config(overrides=["model.heads=[cell,gps]"])
    keys = searched_keys(cells, False, override_keys(["model.heads=[cell,gps]", "loss.tau_km=30"]))
    assert "loss.weights.cell" in keys and "loss.weights.state" not in keys and "loss.tau_km" not in keys
    aux = ("loss.weights.metric", "loss.metric_loss", "loss.metric_d_pos_km", "loss.weights.vae")
    assert not set(aux) & set(full)  # no metric or vae head by default
    with_aux = searched_keys(load_config(overrides=["model.heads=[state,gps,metric,vae]"]), False, set())
    assert set(aux) <= set(with_aux)
    assert searched_keys(cfg, False, set(), ["model.fusion"]) == ["model.fusion"]
    with pytest.raises(ConfigError, match="--params train.nope: not in the search space"):
        searched_keys(cfg, False, set(), ["train.nope", "model.fusion"])


def test_every_range_holds_the_default_and_its_ends_are_valid_configs():
    """The baseline trial (the defaults) lies in the space, and every end of every range or choice is a
    config train.py accepts."""
    from geoloc.tune.space import SPACE, apply_params, baseline

    cfg = load_config(overrides=["model.heads=[state,gps,cell]"])
    base = baseline(cfg, list(SPACE))
    for key, dim in SPACE.items():
        values = list(dim.choices) or [dim.low, dim.high]
        if dim.choices:
            assert base[key] in dim.choices, key
        else:
            assert dim.low <= base[key] <= dim.high, key
        for value in values:
            assert apply_params(cfg, {key: value}) is not None


def test_apply_params_sets_nested_keys_and_names_a_bad_one():
    from geoloc.tune.space import apply_params, get_key

    cfg = apply_params(
        load_config(), {"loss.weights.gps": 0.5, "model.fusion": "concat", "train.head_lr": 2e-3}
    )
    assert cfg.loss.weights["gps"] == 0.5 and cfg.model.fusion == "concat" and cfg.train.head_lr == 2e-3
    assert cfg.loss.weights["state"] == 0.8  # the other weights stay
    assert get_key(cfg, "loss.weights.gps") == 0.5
    with pytest.raises(ConfigError, match="model.fusion='sum'"):
        apply_params(load_config(), {"model.fusion": "sum"})


def test_suggest_draws_every_key_from_the_trial():
    from geoloc.tune.space import suggest

    fixed = {"train.head_lr": 3e-3, "model.fusion": "attention"}
    assert suggest(optuna.trial.FixedTrial(fixed), list(fixed)) == fixed


# ----------------------------------------------------------------------------- command line


def test_help_is_fast_and_loads_neither_torch_nor_optuna():
    code = ("import sys; from geoloc.tune.cli import build_parser; text = build_parser().format_help(); "
            "assert 'train.head_lr' in text; "
            "print(sorted(m for m in ('torch', 'optuna', 'transformers', 'accelerate') if m in sys.modules))")  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--n-trials", "0"], "--n-trials 0: must be >= 1"),
        (["--params", "train.nope"], "--params train.nope: not in the search space"),
        (["model.fusion=average", "--params", "model.fusion"], "nothing to search"),
        (["train.head_lr=-1"], "train.head_lr=-1"),
    ],
)
def test_bad_flags_are_usage_errors_naming_the_flag(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        run_tune(["--shards", "s", "--output-dir", str(tmp_path / "out"), *extra])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- pruning


def _scripted(study, curves: list[list[float]]):
    """Report each curve (one value per epoch) as a trial, stopping where the pruner says so."""
    for curve in curves:
        trial = study.ask()
        for step, value in enumerate(curve, start=1):
            trial.report(value, step)
            if trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            study.tell(trial, curve[-1])


def test_median_rule_prunes_a_worse_trial_after_start_up_and_warm_up():
    from geoloc.tune.pruning import MedianOrFloorPruner

    study = optuna.create_study(direction="maximize", pruner=MedianOrFloorPruner(startup=2, warmup=1))
    _scripted(study, [[0.5, 0.6, 0.7], [0.4, 0.5, 0.6], [0.1, 0.2, 0.3], [0.9, 0.95, 0.99]])
    trials = study.get_trials()
    assert states(study) == ["COMPLETE", "COMPLETE", "PRUNED", "COMPLETE"]
    assert list(trials[2].intermediate_values) == [1, 2]  # epoch 1 is warm-up; pruned at epoch 2


def test_floor_prunes_only_after_start_up_and_warm_up():
    from geoloc.tune.pruning import MedianOrFloorPruner

    study = optuna.create_study(
        direction="maximize", pruner=MedianOrFloorPruner(startup=1, warmup=0, floor=0.3)
    )
    _scripted(study, [[0.1, 0.2], [0.25, 0.5], [0.35, 0.2]])
    # trial 0 is start-up (kept though below the floor), trial 1 is below at epoch 1, trial 2 only at 2
    assert states(study) == ["COMPLETE", "PRUNED", "PRUNED"]
    assert [len(t.intermediate_values) for t in study.get_trials()] == [2, 1, 2]


# ----------------------------------------------------------------------------- the study loop (fake trainer)


def fake_setup(tmp_path):
    from geoloc.tune.trial import Setup

    return Setup(
        load_config(), "shards", None, tmp_path / "geoloc", "geoloc", finetune=False, build_index=False
    )


def test_the_loop_reports_every_epoch_prunes_records_failures_and_stops_after_repeated_ones(
    tmp_path, monkeypatch
):
    """The trial loop with a scripted trainer: what each trial reports, when the median rule stops one,
    a TrainingError recorded as a failed trial, and three failures in a row ending the process."""
    from geoloc.errors import TrainingError
    from geoloc.tune import study as study_mod
    from geoloc.tune.study import StudyOptions, lead, open_study

    curves = {0: [0.5, 0.6], 1: [0.55, 0.65], 2: [0.1, 0.9], 3: "fail", 4: "fail", 5: "fail", 6: [0.7, 0.8]}
    epochs = []

    def fake_run(setup, number, params, on_epoch):
        if curves[number] == "fail":
            raise TrainingError("non-finite loss (scripted)")
        for epoch, score in enumerate(curves[number], start=1):
            epochs.append((number, epoch))
            on_epoch("frozen", epoch, {"score": score})
        return tmp_path / str(number)

    monkeypatch.setattr(study_mod, "run_trial", fake_run)
    monkeypatch.setattr(
        study_mod, "trial_result", lambda out, kind: (curves[int(out.name.split("-")[1])][-1], {})
    )
    setup = fake_setup(tmp_path)
    opts = StudyOptions(f"sqlite:///{tmp_path / 'db'}", "geoloc", n_trials=10, keys=("train.head_lr",),
                        prune_startup=2, prune_warmup=0)  # fmt: skip
    study = open_study(opts, setup)
    assert lead(study, opts, setup) == 6  # trials 3-5 failed in a row: the process stopped
    assert states(study) == ["COMPLETE", "COMPLETE", "PRUNED", "FAIL", "FAIL", "FAIL"]
    assert epochs == [(0, 1), (0, 2), (1, 1), (1, 2), (2, 1)]  # trial 2 stopped after its first epoch
    trials = study.get_trials()
    assert trials[0].params == {"train.head_lr": 1e-3} and trials[0].user_attrs["baseline"]  # the base config
    assert trials[3].user_attrs["error"] == "non-finite loss (scripted)"
    assert trials[1].intermediate_values == {1: 0.55, 2: 0.65}


def test_timeout_starts_no_trial_after_it_and_a_leftover_run_dir_is_moved_aside(tmp_path, monkeypatch):
    from geoloc.tune import study as study_mod
    from geoloc.tune.study import StudyOptions, lead, open_study

    monkeypatch.setattr(study_mod, "run_trial", lambda setup, number, params, on_epoch: time.sleep(0.6))
    monkeypatch.setattr(study_mod, "trial_result", lambda out, kind: (0.5, {}))
    setup = fake_setup(tmp_path)
    (setup.study_dir / "trial-0000").mkdir(parents=True)  # left by an earlier study of that name
    (setup.study_dir / "trial-0000" / "metrics.jsonl").write_text("{}\n")
    opts = StudyOptions(f"sqlite:///{tmp_path / 'db'}", "geoloc", 10, ("train.head_lr",), timeout_s=0.5)
    assert lead(open_study(opts, setup), opts, setup) == 1  # a trial of 0.6 s: none starts after it
    stale = list(setup.study_dir.glob("trial-0000.stale-*"))  # moved aside, never appended to
    assert len(stale) == 1 and (stale[0] / "metrics.jsonl").read_text() == "{}\n"


def test_joining_a_study_of_other_settings_is_refused_naming_the_keys(tmp_path):
    from geoloc.tune.study import StudyOptions, open_study
    from geoloc.tune.trial import Setup, TuneError

    opts = StudyOptions(f"sqlite:///{tmp_path / 'db'}", "geoloc", n_trials=1, keys=("train.head_lr",))
    open_study(opts, fake_setup(tmp_path))
    other = Setup(load_config(overrides=["train.seed=7", "train.cache_dir=/elsewhere"]), "shards", None,
                  tmp_path / "geoloc", "geoloc", False, False)  # fmt: skip
    with pytest.raises(TuneError, match=r"train.seed: 0 -> 7") as err:
        open_study(opts, other)
    assert "cache_dir" not in str(err.value)  # where a machine keeps its cache may differ
    with pytest.raises(TuneError, match=r"finetune: False -> True"):
        open_study(opts, Setup(load_config(), "shards", None, tmp_path, "geoloc", True, False))


# ----------------------------------------------------------------------------- the trainer's hook


def test_on_epoch_sees_every_epoch_and_raising_from_it_ends_the_run_cleanly(
    tiny_shards, tiny_clip_dir, cache_dir, tmp_path
):
    """RunOptions.on_epoch: called after each epoch with the metrics metrics.jsonl logs; an exception from
    it leaves run() after the tracker finished (curves drawn), and the next run in the process works."""
    from accelerate.state import AcceleratorState

    from geoloc.train.context import RunOptions
    from geoloc.train.phases import run

    cfg = load_config(overrides=[f"model.backbone={tiny_clip_dir}", f"train.cache_dir={cache_dir}",
                                 "train.build_index=false"], preset="smoke")  # fmt: skip
    calls = []

    def opts(out, hook):
        return RunOptions(shards=str(tiny_shards), output_dir=out, phase="frozen", on_epoch=hook)

    try:
        run(cfg, opts(tmp_path / "a", lambda phase, epoch, m: calls.append((phase, epoch, m["score"]))))
    finally:
        AcceleratorState._reset_state(True)
    logged = [r["val/score"] for r in val_records(tmp_path / "a").values()]
    assert calls == [("frozen", 1, logged[0]), ("frozen", 2, logged[1])]

    class Stop(Exception):
        pass

    def stop(phase, epoch, metrics):
        raise Stop(f"{phase} {epoch}")

    with pytest.raises(Stop, match="frozen 1"):
        try:
            run(cfg, opts(tmp_path / "b", stop))
        finally:
            AcceleratorState._reset_state(True)
    assert len(val_records(tmp_path / "b")) == 1 and (tmp_path / "b" / "curves.png").is_file()
    try:
        run(cfg, opts(tmp_path / "c", None))  # a fresh accelerator after the interrupted run
    finally:
        AcceleratorState._reset_state(True)
    assert len(val_records(tmp_path / "c")) == 2


# ----------------------------------------------------------------------------- tiny real studies


@pytest.fixture(scope="module")
def tiny_study(tiny_shards, tiny_clip_dir, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tune") / "out"
    args = tune_args(tiny_shards, tiny_clip_dir, out, cache_dir, "--n-trials", "3")
    assert run_tune(args) == 0
    return out, args


def test_trials_record_their_run_and_score_and_the_first_is_the_base_config(tiny_study):
    out, _ = tiny_study
    study = load(out)
    assert states(study) == ["COMPLETE"] * 3
    assert (
        study.trials[0].params["train.head_lr"] == TrainConfig().head_lr
        and study.trials[0].user_attrs["baseline"]
    )
    for trial in study.trials:
        run_dir = out / "geoloc" / f"trial-{trial.number:04d}"
        assert trial.user_attrs["run_dir"] == str(run_dir)
        scores = [r["val/score"] for r in val_records(run_dir).values()]
        assert len(scores) == 2  # the frozen phase only, 2 epochs
        assert trial.value == pytest.approx(max(scores), abs=1e-9) == trial.user_attrs["score"]
        assert trial.intermediate_values == pytest.approx({1: scores[0], 2: scores[1]}, abs=1e-9)
        assert not (run_dir / "model" / "index").exists()  # no index in trials unless --build-index
    summary = json.loads((out / "geoloc" / "summary.json").read_text())
    assert summary["counts"]["COMPLETE"] == 3 and summary["best"]["number"] == study.best_trial.number
    assert summary["gain"] == pytest.approx(study.best_value - study.trials[0].value)


def test_best_yaml_is_the_best_trials_config_and_train_py_takes_it(tiny_study, tiny_shards, tmp_path):
    from accelerate.state import AcceleratorState

    from geoloc.config import read_config
    from geoloc.train.cli import main as train_main
    from geoloc.tune.space import apply_params

    out, args = tiny_study
    best = load(out).best_trial
    path = out / "geoloc" / "best.yaml"
    base = load_config(None, [a for a in args if "=" in a and not a.startswith("-")], "smoke")  # the study's
    want = config_to_dict(apply_params(base, best.params))
    assert config_to_dict(load_config(path)) == want
    assert want["train"]["build_index"] is True  # the base's value: trials alone skip the index
    try:
        code = train_main(["--config", str(path), "--shards", str(tiny_shards), "--output-dir", str(tmp_path / "run"),
                           "--phase", "frozen", "train.build_index=false"])  # fmt: skip
    finally:
        AcceleratorState._reset_state(True)
    assert code == 0
    got = config_to_dict(read_config(tmp_path / "run" / "config.yaml"))
    assert got == want | {"train": want["train"] | {"build_index": False}}
    # the same training as the best trial (same config, seed and cache): the same val scores
    assert [r["val/score"] for r in val_records(tmp_path / "run").values()] == pytest.approx(
        list(best.intermediate_values.values()), abs=1e-6
    )


def test_a_rerun_continues_the_study_to_the_new_target(tiny_study):
    out, args = tiny_study
    before = [(t.number, t.value, t.params) for t in load(out).trials]
    n = args.index("--n-trials") + 1
    assert run_tune(args[:n] + ["5"] + args[n + 1 :]) == 0
    study = load(out)
    assert states(study) == ["COMPLETE"] * 5  # two new trials, the three kept as they were
    assert [(t.number, t.value, t.params) for t in study.trials[:3]] == before
    assert run_tune(args[:n] + ["5"] + args[n + 1 :]) == 0  # the target is reached: no new trial
    assert len(load(out).trials) == 5


def test_pruned_trials_stop_after_their_epoch_and_the_next_trial_runs(
    tiny_shards, tiny_clip_dir, cache_dir, tmp_path
):
    out = tmp_path / "out"
    args = tune_args(tiny_shards, tiny_clip_dir, out, cache_dir, "--n-trials", "3", "--prune-startup", "1",
                     "--prune-warmup", "0", "--prune-below", "2")  # fmt: skip
    assert run_tune(args) == 0
    study = load(out)
    assert states(study) == ["COMPLETE", "PRUNED", "PRUNED"]
    for trial in study.trials[1:]:
        run_dir = out / "geoloc" / f"trial-{trial.number:04d}"
        assert list(trial.intermediate_values) == [1]
        assert len(val_records(run_dir)) == 1 and (run_dir / "curves.png").is_file()  # tracker finished


def test_build_index_makes_the_winning_decoder_the_objective(tiny_shards, tiny_clip_dir, cache_dir, tmp_path):
    out, db = tmp_path / "out", tmp_path / "elsewhere.db"
    args = tune_args(tiny_shards, tiny_clip_dir, out, cache_dir, "--n-trials", "1", "--build-index",
                     "--storage", f"sqlite:///{db}", "--study-name", "indexed")  # fmt: skip
    assert run_tune(args) == 0
    trial = optuna.load_study(study_name="indexed", storage=f"sqlite:///{db}").trials[0]
    assert not (out / "study.db").exists()  # the study lives where --storage says
    meta = json.loads((out / "indexed" / "trial-0000" / "model" / "geoloc.json").read_text())
    assert trial.value == max(row["score"] for row in meta["decoders_val"])
    assert trial.user_attrs["decoder"] == meta["decoder"]


def test_wandb_runs_are_grouped_by_study(tiny_shards, tiny_clip_dir, cache_dir, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_RUN_GROUP", raising=False)
    wandb.setup()  # as after an earlier wandb run in this process: wandb no longer reads the variables
    out = tmp_path / "out"
    args = tune_args(tiny_shards, tiny_clip_dir, out, cache_dir, "--n-trials", "1", "--report-to", "wandb",
                     "--study-name", "grouped-study-x7")  # fmt: skip
    assert run_tune(args) == 0
    runs = list((out / "grouped-study-x7" / "trial-0000" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    record = next(runs[0].glob("*.wandb")).read_bytes()
    assert b"grouped-study-x7" in record and b"grouped-study-x7-trial-0" in record  # group and name
    assert "WANDB_RUN_GROUP" not in os.environ  # restored after the trial


# ----------------------------------------------------------------------------- crash and resume


@pytest.mark.slow
def test_a_study_killed_mid_trial_resumes_keeping_its_trials_and_retrying_the_lost_one(
    tiny_shards, tiny_clip_dir, cache_dir, tmp_path
):
    """SIGKILL during trial 2 (its training done, its result not recorded); the same command again runs
    exactly the missing trials: the 2 finished ones are kept, the lost one is failed by its stale
    heartbeat and retried with its values, and the study ends with 4 complete trials."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "geoloc.tune", *tune_args(tiny_shards, tiny_clip_dir, out, cache_dir),
           "--n-trials", "4", "--heartbeat-s", "1"]  # fmt: skip
    killed = launch(cmd, "tune killed", timeout=300, env_extra={"GEOLOC_FAULT": "phase.end@3"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    first = load(out)
    assert states(first) == ["COMPLETE", "COMPLETE", "RUNNING"]
    kept = [(t.number, t.value, t.params) for t in first.trials[:2]]
    lost = first.trials[2].params

    resumed = check(launch(cmd, "tune resumed", timeout=300))  # >2 s later: the heartbeat is stale
    assert "this process ran 2 trial(s)" in resumed.stdout
    study = load(out)
    assert states(study) == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert [(t.number, t.value, t.params) for t in study.trials[:2]] == kept
    # the lost trial runs again with its values: as trial 3, or as trial 4 when the resumed process asked
    # for its first trial within the heartbeat's grace period (2 s after the kill: not stale yet)
    retried = [t for t in study.trials[3:] if t.system_attrs.get("failed_trial") == 2]
    assert len(retried) == 1 and retried[0].params == lost
    assert (out / "geoloc" / "best.yaml").is_file()
    assert all(math.isfinite(t.value) for t in study.trials if t.state.name == "COMPLETE")


# ----------------------------------------------------------------------------- several ranks


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "nproc"), [("ddp", 2), ("zero2", 2), ("zero3", 2), ("zero2", 1)])
def test_under_accelerate_every_rank_runs_every_trial_and_rank_0_leads(
    tiny_shards, tiny_clip_dir, cache_dir, tmp_path, kind, nproc
):
    """Trial 0 completes, trial 1 is pruned after its first epoch (the floor): the trial and the pruning
    decision reach every rank (the same collectives on all ranks, one broadcast per trial and epoch)."""
    out = tmp_path / "out"
    prefix, env = launcher(kind, nproc)
    args = tune_args(tiny_shards, tiny_clip_dir, out, cache_dir, "--n-trials", "2", "--prune-startup", "1",
                     "--prune-warmup", "0", "--prune-below", "2")  # fmt: skip
    proc = check(launch(prefix + ["-m", "geoloc.tune", *args], f"tune {kind} x{nproc}", 600, env))
    study = load(out)
    assert states(study) == ["COMPLETE", "PRUNED"]
    run_dir = out / "geoloc" / "trial-0000"
    meta = json.loads((run_dir / "model" / "geoloc.json").read_text())
    assert meta["extra"]["num_processes"] == nproc
    assert study.trials[0].value == pytest.approx(max(r["val/score"] for r in val_records(run_dir).values()))
    shared = [
        line for line in proc.trace.get(0, []) if line.startswith("broadcast_object_list @ geoloc/tune/")
    ]
    if nproc > 1:
        assert len(proc.trace) == nproc
        # trial 0 and its 2 epochs, trial 1 and its 1 epoch, the stop
        assert len(shared) == 6, proc.trace[0]
        assert proc.trace[0][-1].startswith("barrier @ geoloc/tune/cli.py")  # every rank leaves together
    assert len(read_metrics(out / "geoloc" / "trial-0001")) > 0
