"""The user-facing errors of geoloc, in one place.

Every error a command prints without a traceback derives from :class:`GeolocError`; its message names
the file, row, sample, shard or key at fault. The CLIs catch ``GeolocError`` and exit non-zero.
"""

from __future__ import annotations


class GeolocError(Exception):
    """A problem the user can fix (bad input, bad flag, a dead rank); the message says what and where."""


class TrainingError(GeolocError, RuntimeError):
    """A run cannot go on (bad input, non-finite loss, ...); the message says what and where."""


class RunInterrupted(TrainingError):
    """``--stop-after-steps`` ended the run early, as a crash would (tests of ``--resume``)."""


class ShardError(GeolocError, ValueError):
    """A shard or manifest is not what the manifest promises (bad name, short or truncated shard)."""


class CheckpointError(GeolocError, ValueError):
    """A checkpoint cannot be trusted or does not fit the run (unsafe pickle, other data, other config)."""
