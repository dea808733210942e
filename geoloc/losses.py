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
    scalars) for the heads in ``outputs``, plus whatever further named values a head's loss returns beside
    its term (e.g. ``loss_vae_rec``, ``band_hard``), which are logged, not summed; the loop, the finiteness
    check and the logs take whatever terms it returns. ``weights`` maps head names to weights
    (``loss.weights``); ``targets`` holds what the terms need beyond the batch
    (:class:`geoloc.heads.Targets`). A criterion with state (the metric head's bandit) saves it with every
    checkpoint (:meth:`state_dict`, JSON).
    """

    def __init__(self, heads: list[str], weights: dict[str, float], targets):
        from geoloc.heads import HEADS

        missing = [h for h in heads if h not in weights]
        if missing:
            raise ValueError(f"loss.weights has no weight for head(s) {missing}")
        self.heads = {h: HEADS[h] for h in heads}
        self.weights, self.targets = {h: float(weights[h]) for h in heads}, targets
        self.needs_thumbnails = any(head.needs_thumbnails for head in self.heads.values())

    def __call__(self, outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        terms, total = {}, 0.0
        for h, head in self.heads.items():
            term, extra = _split_term(head.loss(outputs[h], batch, self.targets))
            clash = sorted(extra.keys() & (terms.keys() | {"loss", *(f"loss_{n}" for n in self.heads)}))
            if clash:
                raise ValueError(f"head {h!r}: its loss returns names already taken: {clash}")
            terms |= {f"loss_{h}": term, **extra}
            total = total + self.weights[h] * term
        return {"loss": total, **terms}

    def loss_batch(self, batch: dict, device) -> dict[str, torch.Tensor]:
        """What the terms read from a loader or cache batch, on ``device``: ``label`` (B,), ``latlon`` (B, 2);
        for a head that reconstructs views also ``view_mask`` (B, V) and ``thumb`` (B, V, 3, T, T) uint8
        (the cache's, or made from the batch's ``images``)."""
        out = {"label": batch["label"].to(device), "latlon": batch["latlon"].to(device)}
        if self.needs_thumbnails:
            from geoloc.heads import thumbnails

            if "thumb" not in batch and "images" not in batch:
                raise ValueError("a head of this run reconstructs views, but the batch has no thumbnails")
            out["view_mask"] = batch["view_mask"].to(device)
            out["thumb"] = (
                batch["thumb"].to(device) if "thumb" in batch else thumbnails(batch["images"].to(device))
            )
        return out

    def state_dict(self) -> dict:
        """The JSON state a resumed run needs ({} for stateless terms)."""
        metric = getattr(self.targets, "metric", None)
        return {} if metric is None else {"metric": metric.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        metric = getattr(self.targets, "metric", None)
        if (metric is None) != ("metric" not in state):
            raise ValueError(f"saved loss state has {sorted(state)}, this run's terms need "
                             f"{sorted(self.state_dict())}")  # fmt: skip
        if metric is not None:
            metric.load_state_dict(state["metric"])


def _split_term(value) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A head's loss: a term, or ``{"loss": term, name: value, ...}`` -> (term, the named values)."""
    if isinstance(value, dict):
        return value["loss"], {k: v for k, v in value.items() if k != "loss"}
    return value, {}
