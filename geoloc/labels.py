"""Label encoder: original state index (non-consecutive, 0..49) <-> contiguous class 0..C-1."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class LabelEncoder:
    """Class ``c`` is the state with original index ``state_indices[c]``; built from the data."""

    state_indices: tuple[int, ...]
    state_names: tuple[str, ...]

    def __post_init__(self):
        if len(self.state_indices) != len(self.state_names):
            raise ValueError("state_indices and state_names differ in length")
        if len(set(self.state_indices)) != len(self.state_indices):
            raise ValueError(f"duplicated state index in {self.state_indices}")

    @classmethod
    def fit(cls, state_indices, names: dict[int, str] | None = None) -> LabelEncoder:
        """Build from the state indices that occur (any order, repeats allowed)."""
        uniq = sorted({int(i) for i in state_indices})
        names = names or {}
        return cls(tuple(uniq), tuple(names.get(i, str(i)) for i in uniq))

    @property
    def num_classes(self) -> int:
        return len(self.state_indices)

    def encode(self, state_idx) -> np.ndarray:
        """Original indices -> classes; raises ``KeyError`` naming the first unknown index."""
        lookup = {s: c for c, s in enumerate(self.state_indices)}
        arr = np.asarray(state_idx).reshape(-1)
        try:
            return np.array([lookup[int(s)] for s in arr], dtype=np.int64)
        except KeyError as err:
            raise KeyError(f"state index {err.args[0]} is not in the label encoder") from None

    def decode(self, classes) -> np.ndarray:
        """Classes -> original indices; -1 stays -1 (used for padding a top-k)."""
        table = np.asarray(self.state_indices + (-1,), dtype=np.int64)  # table[-1] == -1
        return table[np.asarray(classes, dtype=np.int64)]

    def to_dict(self) -> dict:
        return {"state_indices": list(self.state_indices), "state_names": list(self.state_names)}

    @classmethod
    def from_dict(cls, d: dict) -> LabelEncoder:
        return cls(tuple(int(i) for i in d["state_indices"]), tuple(d["state_names"]))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> LabelEncoder:
        return cls.from_dict(json.loads(Path(path).read_text()))
