"""Several exported models as one module: weighted average of probabilities and of GPS points.

Each member keeps its own preprocessing (input size, mean/std) and temperature, so the ensemble takes
the loader's uint8 views and ``geoloc.predict.predict`` runs it with an identity preprocessor: the data
are decoded once for all members. With one member the output is that member's own logits (divided by
its temperature), so a single-model run reports exactly what the trainer reports.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class EnsembleOutput(NamedTuple):
    logits: torch.Tensor  # (B, C): log of the averaged probabilities (softmax gives them back)
    gps: torch.Tensor  # (B, 2) weighted mean lat/lon in degrees


def normalise_weights(weights, n: int) -> list[float]:
    """``None`` -> equal weights; else ``n`` non-negative numbers with a positive sum, scaled to sum 1."""
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"{len(weights)} weight(s) for {n} model(s): give one weight per --model")
    if min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"weights {weights}: must be >= 0 with a positive sum")
    return [w / sum(weights) for w in weights]


def check_same_labels(encoders: list, names: list[str]) -> None:
    """Members must predict the same classes in the same order, or averaging mixes states."""
    first = encoders[0].state_indices
    for enc, name in zip(encoders[1:], names[1:]):
        if enc.state_indices != first:
            raise ValueError(
                f"{name}: its states {list(enc.state_indices)} differ from {names[0]}'s {list(first)}; "
                "ensembled models must be trained on the same label encoder"
            )


class Ensemble(nn.Module):
    """``forward(images uint8 (B, V, 3, H, W), view_mask (B, V)) -> EnsembleOutput``."""

    def __init__(self, models, preprocessors, weights=None, temperatures=None):
        super().__init__()
        if not models or len(models) != len(preprocessors):
            raise ValueError(f"need one preprocessor per model, got {len(models)} and {len(preprocessors)}")
        self.members = nn.ModuleList(models)
        self.preprocessors = nn.ModuleList(preprocessors)
        self.weights = normalise_weights(weights, len(models))
        self.temperatures = [float(t) for t in (temperatures or [1.0] * len(models))]
        if len(self.temperatures) != len(models) or min(self.temperatures) <= 0:
            raise ValueError(f"temperatures {self.temperatures}: one positive value per model")

    def forward(self, images: torch.Tensor, view_mask: torch.Tensor) -> EnsembleOutput:
        outs = [m(pre(images), view_mask) for m, pre in zip(self.members, self.preprocessors)]
        if len(outs) == 1:  # exactly the member's logits: no log/exp round trip
            return EnsembleOutput(outs[0].logits / self.temperatures[0], outs[0].gps)
        # float64 sums: a model averaged with itself rounds back to exactly its own float32 outputs
        probs = sum(w * torch.softmax(o.logits.double() / t, dim=-1) for w, t, o in self._zip(outs))  # (B, C)
        gps = sum(w * o.gps.double() for w, _, o in self._zip(outs)).float()  # (B, 2)
        return EnsembleOutput(torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny)), gps)

    def _zip(self, outs):
        return zip(self.weights, self.temperatures, outs)


def identity(images: torch.Tensor) -> torch.Tensor:
    """The preprocessor ``predict`` gets for an ensemble: members preprocess for themselves."""
    return images
