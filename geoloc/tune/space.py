"""The search space: one row per config key, and how a trial's values become a :class:`Config`.

Adding a key to the search is one line in :data:`SPACE` (a new head's loss weight names its head, so it
is only searched when the model has that head). Nothing here imports optuna: a ``trial`` is anything with
optuna's ``suggest_float`` / ``suggest_categorical``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from geoloc.config import (
    FUSIONS,
    METRIC_LOSSES,
    SOFT_LABEL_MODES,
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
)


@dataclass(frozen=True)
class Dim:
    """One searched config key: a float range (``log`` for a log-uniform one) or a list of choices."""

    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple = ()
    head: str | None = None  # searched only when model.heads holds this head
    finetune: bool = False  # searched only in fine-tune trials (the backbone does not train otherwise)

    def suggest(self, trial, key: str):
        if self.choices:
            return trial.suggest_categorical(key, list(self.choices))
        return trial.suggest_float(key, self.low, self.high, log=self.log)

    def describe(self) -> str:
        if self.choices:
            return "one of " + "|".join(map(str, self.choices))
        return f"{'log-' if self.log else ''}uniform in [{self.low:g}, {self.high:g}]"


# config key -> its range. Ranges hold the defaults (the baseline trial) and stay inside config.RANGES.
SPACE: dict[str, Dim] = {
    "train.head_lr": Dim(1e-4, 3e-2, log=True),
    "train.backbone_lr": Dim(1e-6, 1e-4, log=True, finetune=True),
    "train.layer_decay": Dim(0.5, 1.0, finetune=True),
    "loss.tau_km": Dim(10.0, 500.0, log=True),
    "loss.soft_labels": Dim(choices=SOFT_LABEL_MODES),
    "model.fusion": Dim(choices=FUSIONS),
    "loss.weights.state": Dim(0.1, 1.0, head="state"),
    "loss.weights.gps": Dim(0.0, 1.0, head="gps"),
    "loss.weights.cell": Dim(0.1, 1.0, head="cell"),
    "loss.weights.metric": Dim(0.0, 1.0, head="metric"),
    "loss.metric_loss": Dim(choices=METRIC_LOSSES, head="metric"),
    "loss.metric_d_pos_km": Dim(50.0, 1000.0, log=True, head="metric"),
    "loss.weights.vae": Dim(0.0, 2.0, head="vae"),
}


def override_keys(overrides: list[str]) -> set[str]:
    """The config keys of ``section.key=value`` overrides (held fixed: never searched)."""
    return {o.split("=", 1)[0].strip() for o in overrides if "=" in o}


def searched_keys(cfg: Config, finetune: bool, fixed: set[str], only: list[str] | None = None) -> list[str]:
    """The keys of :data:`SPACE` this study searches: those its model and trial kind use, minus ``fixed``,
    restricted to ``only`` when given (an unknown key there is an error naming it)."""
    unknown = sorted(set(only or ()) - set(SPACE))
    if unknown:
        raise ConfigError(f"--params {' '.join(unknown)}: not in the search space; choose from {list(SPACE)}")
    return [
        key
        for key, dim in SPACE.items()
        if (only is None or key in only)
        and key not in fixed
        and (dim.head is None or dim.head in cfg.model.heads)
        and (finetune or not dim.finetune)
    ]


def suggest(trial, keys: list[str]) -> dict:
    """``{key: value}`` drawn by ``trial`` for each searched key."""
    return {key: SPACE[key].suggest(trial, key) for key in keys}


def get_key(cfg: Config, key: str):
    """The value of a dotted key (``loss.weights.state``) in ``cfg``."""
    node = config_to_dict(cfg)
    for part in key.split("."):
        node = node[part]
    return node


def baseline(cfg: Config, keys: list[str]) -> dict:
    """The base config's own values of ``keys``: the study's first trial, to compare the best against."""
    return {key: get_key(cfg, key) for key in keys}


def apply_params(cfg: Config, params: dict, source: str = "trial parameters") -> Config:
    """``cfg`` with each dotted key of ``params`` set; validated like any config (errors name the key)."""
    tree = copy.deepcopy(config_to_dict(cfg))
    for key, value in params.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config_from_dict(tree, source)
