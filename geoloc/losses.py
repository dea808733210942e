"""Training losses: soft-target cross-entropy, the GPS losses, and the :class:`Criterion` that sums the
heads' terms (each head picks its own, see :mod:`geoloc.heads`).

All are computed in float32 (logits and GPS may arrive in bf16 under autocast) and reduce to a scalar
mean over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from geoloc.geo import haversine_km
from geoloc.metrics import GPS_SCALE_KM  # the competition's scale: haversine loss = mean km / 5000

GPS_LOSSES = ("mse", "mae", "smooth_l1", "haversine")
LATLON_SCALE = (90.0, 180.0)  # lat / 90 and lon / 180 put both coordinates in [-1, 1]
SMOOTH_L1_BETA = 1.0 / 90.0  # quadratic below ~1 degree of latitude (~111 km), linear above


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``mean_b -sum_c t[b, c] * log_softmax(logits)[b, c]``: ``(B, C), (B, C) -> ()``."""
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
    return -(targets.float() * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def gps_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "haversine") -> torch.Tensor:
    """GPS loss of ``(B, 2)`` predictions against ``(B, 2)`` targets, degrees (lat, lon) -> scalar.

    mse | mae | smooth_l1 compare lat/90 and lon/180 (mean over both coordinates); haversine is the mean
    great-circle km / 5000, the quantity the competition's GPS score is made of.
    """
    pred, target = pred.float(), target.float()
    if kind == "haversine":
        return haversine_km(pred[:, 0], pred[:, 1], target[:, 0], target[:, 1]).mean() / GPS_SCALE_KM
    scale = pred.new_tensor(LATLON_SCALE)
    p, t = pred / scale, target / scale  # (B, 2) in [-1, 1]
    if kind == "mse":
        return F.mse_loss(p, t)
    if kind == "mae":
        return F.l1_loss(p, t)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(p, t, beta=SMOOTH_L1_BETA)
    raise ValueError(f"gps loss {kind!r}: choose one of {list(GPS_LOSSES)}")


class Criterion:
    """Every loss term of a model, by head name, and their weighted sum; built once per run.

    ``criterion(outputs, batch)`` -> ``{"loss": sum of weight * term, "loss_<head>": term, ...}`` (fp32
    scalars) for the heads in ``outputs``; the loop, the finiteness check and the logs take whatever terms
    it returns. ``weights`` maps head names to weights (``loss.weights``); ``targets`` holds what the terms
    need beyond the batch (:class:`geoloc.heads.Targets`).
    """

    def __init__(self, heads: list[str], weights: dict[str, float], targets):
        from geoloc.heads import HEADS

        missing = [h for h in heads if h not in weights]
        if missing:
            raise ValueError(f"loss.weights has no weight for head(s) {missing}")
        self.heads = {h: HEADS[h] for h in heads}
        self.weights, self.targets = {h: float(weights[h]) for h in heads}, targets

    def __call__(self, outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        terms = {f"loss_{h}": head.loss(outputs[h], batch, self.targets) for h, head in self.heads.items()}
        total = sum(self.weights[h] * terms[f"loss_{h}"] for h in self.heads)
        return {"loss": total, **terms}
