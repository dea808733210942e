"""The study's pruner: Optuna's median rule, plus an optional floor (``--prune-below``).

A trial reports its val score after every epoch (the step is the epoch counted over both phases). The
median rule stops a trial whose best score so far is below the median of the earlier trials at that
epoch; the floor stops one that scores below a fixed value, for runs that diverge or learn nothing. Both
wait for ``startup`` finished trials (the baseline among them); the first ``warmup`` epochs of a trial
are never pruned (steps are epoch numbers, 1-based).
"""

from __future__ import annotations

import optuna
from optuna.pruners import BasePruner, MedianPruner
from optuna.trial import TrialState


class MedianOrFloorPruner(BasePruner):
    """Prune when the median rule says so, or (with ``floor``) when the last score is below ``floor``."""

    def __init__(self, startup: int = 5, warmup: int = 1, floor: float | None = None):
        self.median = MedianPruner(n_startup_trials=startup, n_warmup_steps=warmup + 1)
        self.startup, self.warmup, self.floor = startup, warmup, floor

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        if self.median.prune(study, trial):
            return True
        step = trial.last_step
        if self.floor is None or step is None or step <= self.warmup:
            return False
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        return len(finished) >= self.startup and trial.intermediate_values[step] < self.floor
