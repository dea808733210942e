"""Hyper-parameter search over the training config with Optuna (``python -m geoloc.tune``).

- :mod:`geoloc.tune.space`: the searched keys and ranges (one row per config key), and how a trial's
  values become a :class:`geoloc.config.Config`;
- :mod:`geoloc.tune.trial`: one trial, trained in this process through ``geoloc.train.phases.run`` with
  an ``on_epoch`` hook that reports the val score and prunes;
- :mod:`geoloc.tune.study`: the study (storage, resume, heartbeats, the baseline trial), the trial loop
  on rank 0 and its mirror on the other ranks, the best config;
- :mod:`geoloc.tune.pruning`: the median rule with an optional floor;
- :mod:`geoloc.tune.cli`: the command line.

Nothing heavy is imported here: ``--help`` stays instant.
"""
