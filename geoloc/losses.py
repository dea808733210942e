"""Training losses: soft-target cross-entropy on the state head, a GPS loss, and their weighted sum.

All are computed in float32 (logits and GPS may arrive in bf16 under autocast) and reduce to a scalar
mean over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from geoloc.config import LossConfig
from geoloc.geo import haversine_km

GPS_LOSSES = ("mse", "mae", "smooth_l1", "haversine")
GPS_SCALE_KM = 5000.0  # the competition's GPS scale: haversine loss = mean km / 5000
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


def combined_loss(
    logits: torch.Tensor,
    gps: torch.Tensor,
    label: torch.Tensor,
    latlon: torch.Tensor,
    soft_targets: torch.Tensor | None,
    cfg: LossConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``cfg.cls_weight * CE + cfg.gps_weight * GPS`` and its terms (detached, for logging).

    Shapes: logits ``(B, C)``, gps ``(B, 2)``, label ``(B,)``, latlon ``(B, 2)``, soft_targets ``(B, C)``
    or None (then one-hot of ``label``).
    """
    if soft_targets is None:
        soft_targets = F.one_hot(label, logits.shape[-1]).float()
    cls = soft_cross_entropy(logits, soft_targets)
    reg = gps_loss(gps, latlon, cfg.gps_loss)
    total = cfg.cls_weight * cls + cfg.gps_weight * reg
    return total, {"loss_cls": cls.detach(), "loss_gps": reg.detach(), "loss": total.detach()}
