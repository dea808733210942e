"""Several exported models as one module: weighted average of their decoded state probabilities and points.

Each member keeps its own preprocessing (input size, mean/std), decoder (its heads, cells, retrieval
index, see :mod:`geoloc.decoders`) and temperature, so the ensemble takes the loader's uint8 views and
``geoloc.predict.predict`` runs it with an identity preprocessor: the data are decoded once for all
members. With one member at temperature 1 the output is exactly that member's decoded output, so a
single-model run reports what the trainer reports.
"""

from __future__ import annotations

import torch
from torch import nn

AVERAGED = ("state_probs", "gps")  # the decoded values an ensemble averages over its members


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


def temper(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(log p / T)``: calibrated probabilities (the ranking is kept); (B, C) -> (B, C)."""
    if temperature == 1.0:
        return probs
    return torch.softmax(torch.log(probs.double().clamp_min(1e-300)) / temperature, dim=-1).to(probs.dtype)


class Ensemble(nn.Module):
    """``forward(images uint8 (B, V, 3, H, W), view_mask (B, V)) -> {"state_probs": (B, C), "gps": (B, 2)}``."""

    def __init__(self, models, preprocessors, decoders, weights=None, temperatures=None):
        super().__init__()
        if not models or not len(models) == len(preprocessors) == len(decoders):
            raise ValueError(f"need one preprocessor and decoder per model, got {len(models)}, "
                             f"{len(preprocessors)}, {len(decoders)}")  # fmt: skip
        self.members = nn.ModuleList(models)
        self.preprocessors = nn.ModuleList(preprocessors)
        self.decoders = list(decoders)
        self.weights = normalise_weights(weights, len(models))
        self.temperatures = [float(t) for t in (temperatures or [1.0] * len(models))]
        if len(self.temperatures) != len(models) or min(self.temperatures) <= 0:
            raise ValueError(f"temperatures {self.temperatures}: one positive value per model")

    def member_outputs(self, images: torch.Tensor, view_mask: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Each member's decoded (and tempered) outputs."""
        outs = []
        for model, pre, decode, t in zip(self.members, self.preprocessors, self.decoders, self.temperatures):
            out = decode(model(pre(images), view_mask))
            outs.append(out | {"state_probs": temper(out["state_probs"], t)})
        return outs

    def forward(self, images: torch.Tensor, view_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        outs = self.member_outputs(images, view_mask)
        if len(outs) == 1:  # exactly the member's output: no re-summing
            return outs[0]
        # float64 sums: a model averaged with itself rounds back to exactly its own float32 outputs
        averaged = {
            key: sum(w * o[key].double() for w, o in zip(self.weights, outs)).float() for key in AVERAGED
        }
        # values passed through by a decoder (e.g. the fused embedding, whose width differs between
        # members) are not averaged: the first member's are handed on
        return {**{k: v for k, v in outs[0].items() if k not in AVERAGED}, **averaged}


def identity(images: torch.Tensor) -> torch.Tensor:
    """The preprocessor ``predict`` gets for an ensemble: members preprocess for themselves."""
    return images
