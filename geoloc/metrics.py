"""Competition metrics (numpy): weighted top-5 state score, GPS score, km statistics, prior baseline.

State predictions are ORIGINAL state indices (as in the submission), ``-1`` meaning "no prediction".
Final score = 0.7 * weighted top-5 + 0.3 * max(0, 1 - mean_km / 5000).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from geoloc.geo import haversine_km

TOP5_WEIGHTS = (1.0, 0.6, 0.4, 0.25, 0.15)
CLS_SHARE, GPS_SHARE = 0.7, 0.3
GPS_SCALE_KM = 5000.0
WITHIN_KM = (25, 200, 750)


def _first_match(pred_top5, true) -> tuple[np.ndarray, np.ndarray]:
    """``(N, 5), (N,) -> hit (N,) bool, pos (N,) int``: position of the first entry equal to the truth.

    Only the first match counts, so a later duplicate of the true state never scores; -1 never matches.
    """
    pred, true = np.asarray(pred_top5, dtype=np.int64), np.asarray(true, dtype=np.int64)
    if pred.ndim != 2 or pred.shape[1] != len(TOP5_WEIGHTS) or true.shape != (pred.shape[0],):
        raise ValueError(f"expected pred_top5 (N, 5) and true (N,), got {pred.shape} and {true.shape}")
    match = (pred == true[:, None]) & (pred >= 0)  # (N, 5)
    return match.any(axis=1), match.argmax(axis=1)


def weighted_top5(pred_top5, true) -> float:
    """Mean over samples of the weight of the first position matching the truth (0 when none does)."""
    hit, pos = _first_match(pred_top5, true)
    return float(np.where(hit, np.asarray(TOP5_WEIGHTS)[pos], 0.0).mean())


def position_match_rates(pred_top5, true) -> list[float]:
    """``[rate_1, .., rate_5]``: share of samples whose first match is at position k (they sum to top-5)."""
    hit, pos = _first_match(pred_top5, true)
    return [float((hit & (pos == k)).mean()) for k in range(len(TOP5_WEIGHTS))]


def gps_score(mean_km: float) -> float:
    """``max(0, 1 - mean_km / 5000)``."""
    return float(max(0.0, 1.0 - mean_km / GPS_SCALE_KM))


def _check_latlon(name: str, latlon) -> np.ndarray:
    latlon = np.asarray(latlon, dtype=np.float64)
    if latlon.ndim != 2 or latlon.shape[1] != 2:
        raise ValueError(f"{name} must be (N, 2), got {latlon.shape}")
    bad = np.flatnonzero(~np.isfinite(latlon).all(axis=1))
    if bad.size:
        raise ValueError(f"{name}: non-finite coordinates in rows {bad[:10].tolist()}")
    return latlon


def competition_metrics(pred_top5, true_state, pred_latlon, true_latlon) -> dict[str, float]:
    """Score and its parts for N samples: ``(N, 5), (N,), (N, 2), (N, 2) -> dict`` of plain floats."""
    pred_ll, true_ll = _check_latlon("pred_latlon", pred_latlon), _check_latlon("true_latlon", true_latlon)
    n = len(true_ll)
    if n == 0 or len(pred_ll) != n:
        raise ValueError(f"need N > 0 samples with matching lengths, got {len(pred_ll)} and {n}")
    km = haversine_km(pred_ll[:, 0], pred_ll[:, 1], true_ll[:, 0], true_ll[:, 1])  # (N,)
    rates = position_match_rates(pred_top5, true_state)
    cls, gps = weighted_top5(pred_top5, true_state), gps_score(float(km.mean()))
    out = {"score": CLS_SHARE * cls + GPS_SHARE * gps, "cls_score": cls, "gps_score": gps}
    out |= {"top1_acc": rates[0], "top5_acc": float(sum(rates))}
    out |= {f"match_rate_{k + 1}": r for k, r in enumerate(rates)}
    out |= {"mean_km": km.mean(), "median_km": np.median(km), "p90_km": np.quantile(km, 0.9)}
    out |= {f"within_{r}km": (km <= r).mean() for r in WITHIN_KM}
    return {k: float(v) for k, v in out.items()} | {"n": float(n)}


def top5_from_probs(probs, encoder) -> np.ndarray:
    """``(N, C)`` class scores -> ``(N, 5)`` int64 ORIGINAL state indices, best first, -1 padded if C < 5.

    Ties go to the lowest class (stable sort), so equal scores give a reproducible order.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != encoder.num_classes:
        raise ValueError(f"probs must be (N, {encoder.num_classes}), got {probs.shape}")
    k = len(TOP5_WEIGHTS)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # (N, min(C, 5)) classes
    order = np.pad(order, ((0, 0), (0, k - order.shape[1])), constant_values=-1)
    return encoder.decode(order)


@dataclass(frozen=True)
class Prior:
    """The prior baseline: the 5 most frequent training states (-1 padded) and the mean GPS point."""

    top5: tuple[int, ...]
    lat: float
    lon: float

    @classmethod
    def fit(cls, state_idx, latlon) -> Prior:
        """From training labels: ``(N,)`` original state indices and ``(N, 2)`` degrees.

        Frequency ties go to the lowest state index.
        """
        latlon = _check_latlon("latlon", latlon)
        states, counts = np.unique(np.asarray(state_idx, dtype=np.int64), return_counts=True)
        if len(states) == 0 or len(latlon) != int(counts.sum()) or states[0] < 0:
            raise ValueError(
                f"need N > 0 labels >= 0 and N coordinates, got states {states} and {latlon.shape}"
            )
        top = states[np.argsort(-counts, kind="stable")][: len(TOP5_WEIGHTS)].tolist()
        top += [-1] * (len(TOP5_WEIGHTS) - len(top))
        return cls(tuple(top), float(latlon[:, 0].mean()), float(latlon[:, 1].mean()))

    def predict(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The same guess for ``n`` samples: top5 ``(n, 5)`` int64 and latlon ``(n, 2)`` float64."""
        top5 = np.tile(np.asarray(self.top5, dtype=np.int64), (n, 1))
        return top5, np.tile([self.lat, self.lon], (n, 1)).astype(np.float64)

    def to_dict(self) -> dict:
        return {"top5": list(self.top5), "lat": self.lat, "lon": self.lon}

    @classmethod
    def from_dict(cls, d: dict) -> Prior:
        return cls(tuple(int(s) for s in d["top5"]), float(d["lat"]), float(d["lon"]))
