"""The Optuna study: storage, creation or resumption, the trial loop on rank 0 (and its mirror on the
other ranks), and the best trial's config.

The study lives in a database (``--storage``, sqlite by default) and is maximised. Its first trial is the
base config itself (the baseline the best is compared with). ``n_trials`` is the study's target of
finished (complete or pruned) trials, whoever ran them: a rerun after a crash, or another worker on the
same storage, continues until the study holds that many. Every trial beats a heartbeat into the storage;
a trial whose process died (SIGKILL, a lost machine) is marked failed once its heartbeat is older than
twice the interval, and run again once with the same values.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path

from geoloc.config import config_to_dict, save_config
from geoloc.errors import TrainingError
from geoloc.tune.space import apply_params, baseline, suggest
from geoloc.tune.trial import Setup, TuneError, reporter, run_dir, run_trial, share, trial_result

META = "geoloc_tune"  # the study's user attribute recording what its trials mean
# base-config keys that may differ between the processes of one study (where things are on a machine)
MACHINE_KEYS = ("train.cache_dir", "data.num_workers", "train.dist_timeout_s", "train.log_every")
MAX_FAILED_IN_A_ROW = 3  # trials that failed one after the other before this process gives up


@dataclass(frozen=True)
class StudyOptions:
    storage: str  # an SQLAlchemy URL: sqlite:///study.db, postgresql://...
    name: str
    n_trials: int  # the study's target of finished trials
    keys: tuple[str, ...]  # the searched config keys
    sampler_seed: int = 0
    prune_startup: int = 5
    prune_warmup: int = 1
    prune_below: float | None = None
    heartbeat_s: int = 60
    timeout_s: float | None = None  # this process starts no trial after that many seconds


# ----------------------------------------------------------------------------- opening


def storage_for(url: str, heartbeat_s: int):
    """RDB storage with heartbeats; a trial that died is failed and retried once with its values."""
    import warnings

    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    warnings.filterwarnings("ignore", category=ExperimentalWarning)  # heartbeats and retries are stable
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None  # concurrent writers
    return RDBStorage(
        url, engine_kwargs=engine, heartbeat_interval=heartbeat_s, grace_period=2 * heartbeat_s,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
    )  # fmt: skip


def study_meta(setup: Setup, keys) -> dict:
    """What a study's trials mean; a process joining the study must agree (:func:`check_meta`)."""
    return {"version": 1, "base_config": config_to_dict(setup.base), "finetune": setup.finetune,
            "objective": setup.objective, "keys": list(keys)}  # fmt: skip


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def check_meta(saved: dict, mine: dict, name: str) -> None:
    """Refuse to join a study of other settings, naming each difference as ``key: study -> here``."""
    diffs = [f"{k}: {saved.get(k)!r} -> {mine[k]!r}" for k in ("finetune", "objective", "keys")
             if saved.get(k) != mine[k]]  # fmt: skip
    old, new = _flat(saved.get("base_config", {})), _flat(mine["base_config"])
    diffs += [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
              if old.get(k) != new.get(k) and k not in MACHINE_KEYS]  # fmt: skip
    if diffs:
        raise TuneError(
            f"study {name!r} was started with other settings; give another --study-name, or the same "
            "flags and config: " + "; ".join(diffs)
        )


def open_study(opts: StudyOptions, setup: Setup):
    """Create the study (its metadata and the baseline trial) or resume it after checking its metadata."""
    import optuna

    from geoloc.tune.pruning import MedianOrFloorPruner

    storage = storage_for(opts.storage, opts.heartbeat_s)
    pruner = MedianOrFloorPruner(opts.prune_startup, opts.prune_warmup, opts.prune_below)
    study = optuna.create_study(
        storage=storage, study_name=opts.name, direction="maximize", pruner=pruner, load_if_exists=True
    )
    mine, earlier = study_meta(setup, opts.keys), len(study.trials)
    if META in study.user_attrs:
        check_meta(study.user_attrs[META], mine, opts.name)
    else:
        study.set_user_attr(META, mine)
        study.enqueue_trial(baseline(setup.base, list(opts.keys)))
    # a resumed study must not replay the random start-up draws of its first run: the seed moves on
    study.sampler = optuna.samplers.TPESampler(seed=opts.sampler_seed + earlier)
    return study


# ----------------------------------------------------------------------------- the trial loop


def finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def move_aside(out: Path) -> Path:
    """``out``, free: a directory left there by a study of the same name in another storage (or one
    deleted and started again) is renamed ``<name>.stale-<time>``, not appended to."""
    if out.exists():
        stale = out.with_name(f"{out.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
        out.rename(stale)
        print(f"tune: {out} was there already (another study of that name?); moved to {stale.name}")
    return out


def objective(setup: Setup, keys, trial) -> float:
    """Rank 0's side of one trial: draw, hand out, train, read the score; attrs record the run."""
    params = suggest(trial, list(keys))
    out = move_aside(run_dir(setup, trial.number))
    trial.set_user_attr("run_dir", str(out.resolve()))
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("baseline", params == baseline(setup.base, list(keys)))
    share({"number": trial.number, "params": params})
    start = time.perf_counter()
    try:
        run_trial(setup, trial.number, params, reporter(setup, trial))
    except TrainingError as err:
        trial.set_user_attr("error", str(err))
        raise
    finally:
        trial.set_user_attr("wall_s", round(time.perf_counter() - start, 2))
    score, attrs = trial_result(out, setup.objective)
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    return score


def stop_after_failures(limit: int = MAX_FAILED_IN_A_ROW):
    """A callback that stops this process after ``limit`` of its trials failed in a row (broken input
    rather than bad values: every further trial would fail the same way)."""
    from optuna.trial import TrialState

    streak = [0]

    def callback(study, trial) -> None:
        streak[0] = streak[0] + 1 if trial.state == TrialState.FAIL else 0
        if streak[0] >= limit:
            print(f"tune: {limit} trials failed in a row; stopping (their errors are above)")
            study.stop()

    return callback


def lead(study, opts: StudyOptions, setup: Setup) -> int:
    """Run trials until the study holds ``n_trials`` finished ones; returns how many this process ran."""
    from functools import partial

    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    ran = []
    todo = max(0, opts.n_trials - finished(study))
    if todo:
        done = MaxTrialsCallback(opts.n_trials, states=(TrialState.COMPLETE, TrialState.PRUNED))
        study.optimize(
            partial(objective, setup, opts.keys), n_trials=todo, timeout=opts.timeout_s,
            catch=(TrainingError,), callbacks=[done, stop_after_failures(), lambda s, t: ran.append(t.number)],
        )  # fmt: skip
    share(None)  # the other ranks stop waiting for trials
    return len(ran)


def follow(setup: Setup) -> int:
    """The other ranks: run each trial rank 0 hands out until it says stop; returns how many."""
    import optuna

    count = 0
    while (msg := share(None)) is not None:
        count += 1
        try:
            run_trial(setup, msg["number"], msg["params"], reporter(setup, None))
        except (optuna.TrialPruned, TrainingError):  # rank 0 records it; all ranks raised together
            continue
    return count


# ----------------------------------------------------------------------------- results


def write_best(study, setup: Setup, path: Path):
    """The best complete trial's config (base + its values, every section) as a YAML ``train.py
    --config`` takes; None when no trial completed."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    best = study.best_trial
    save_config(apply_params(setup.base, best.params), path)
    head = (f"# geoloc.tune study {study.study_name!r}, trial {best.number}: val score {best.value:.4f} "
            f"({setup.objective}); train.py --config {path.name}\n")  # fmt: skip
    path.write_text(head + path.read_text())
    return best


def summary(study, setup: Setup) -> dict:
    """Every trial (state, value, values, attrs), the best and the baseline trials and their difference."""
    rows = [
        {"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
         "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())}, **t.user_attrs}
        for t in study.get_trials(deepcopy=False)
    ]  # fmt: skip
    done = [r for r in rows if r["state"] == "COMPLETE"]
    best = max(done, key=lambda r: r["value"], default=None)
    base = next((r for r in done if r.get("baseline")), None)
    counts = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    gain = best["value"] - base["value"] if best and base else None
    return {"study": study.study_name, "objective": setup.objective, "finetune": setup.finetune,
            "counts": counts, "best": best, "baseline": base, "gain": gain, "trials": rows}  # fmt: skip
