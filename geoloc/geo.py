"""Geo core: haversine distance, state centroids, the centroid distance matrix, haversine-smoothed labels.

Coordinates are always degrees (latitude, longitude) and distances kilometres. ``haversine_km`` and
``distance_matrix`` work on numpy arrays and on torch tensors alike (they return the kind they got);
the soft labels are torch only, since they are training targets.
"""

from __future__ import annotations

import numpy as np
import torch

EARTH_RADIUS_KM = 6371.0088  # IUGG mean Earth radius
SOFT_LABEL_MODES = ("state", "sample")


def _safe_sqrt_torch(x: torch.Tensor) -> torch.Tensor:
    """sqrt with a zero (not NaN/inf) gradient at 0: the double-where trick keeps d/dx sqrt(0) out."""
    pos = x > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, x, torch.ones_like(x))), torch.zeros_like(x))


def _backend(*vals):
    """(module, sqrt, vals as one kind): torch tensors on the first tensor's device if any is a tensor."""
    ref = next((v for v in vals if isinstance(v, torch.Tensor)), None)
    if ref is None:
        return np, np.sqrt, [np.asarray(v, dtype=np.float64) for v in vals]
    dtype = ref.dtype if ref.is_floating_point() else torch.float32
    return torch, _safe_sqrt_torch, [torch.as_tensor(v, dtype=dtype, device=ref.device) for v in vals]


def haversine_km(lat1, lon1, lat2, lon2):
    """Great-circle distance in km between points in degrees; broadcasts, numpy or torch in -> same out.

    Written as ``2R * atan2(sqrt(a), sqrt(1 - a))`` with ``a`` clamped to [0, 1], so it is exact at zero
    distance (0) and at antipodes (pi * R), and (torch) its gradient is finite at both ends.
    """
    xp, sqrt, (lat1, lon1, lat2, lon2) = _backend(lat1, lon1, lat2, lon2)
    phi1, phi2 = xp.deg2rad(lat1), xp.deg2rad(lat2)
    dphi, dlmb = phi2 - phi1, xp.deg2rad(lon2 - lon1)
    a = xp.sin(dphi / 2) ** 2 + xp.cos(phi1) * xp.cos(phi2) * xp.sin(dlmb / 2) ** 2
    a = xp.clip(a, 0.0, 1.0)  # rounding can push a just outside [0, 1] near zero and at antipodes
    return 2 * EARTH_RADIUS_KM * xp.arctan2(sqrt(a), sqrt(1 - a))


def state_centroids(lat, lon, classes, num_classes: int) -> np.ndarray:
    """Mean (lat, lon) of the training points of each class: ``(N,), (N,), (N,) -> (C, 2)`` float64.

    A plain coordinate mean is fine for US states (none straddles the antimeridian in the data).
    """
    lat, lon = np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64)
    classes = np.asarray(classes, dtype=np.int64)
    if not (lat.shape == lon.shape == classes.shape):
        raise ValueError(f"lat {lat.shape}, lon {lon.shape} and classes {classes.shape} differ in shape")
    if classes.size and (classes.min() < 0 or classes.max() >= num_classes):
        raise ValueError(f"classes must lie in [0, {num_classes}), got {classes.min()}..{classes.max()}")
    counts = np.bincount(classes, minlength=num_classes)
    if (counts == 0).any():
        raise ValueError(f"class(es) {np.flatnonzero(counts == 0).tolist()} have no training point")
    sums = np.stack([np.bincount(classes, w, num_classes) for w in (lat, lon)], axis=1)  # (C, 2)
    return sums / counts[:, None]


def distance_matrix(centroids):
    """Pairwise haversine km between centroids: ``(C, 2) -> (C, C)`` (numpy or torch), zero diagonal."""
    lat, lon = centroids[:, 0], centroids[:, 1]
    return haversine_km(lat[:, None], lon[:, None], lat[None, :], lon[None, :])


def soft_labels_state(true_cls: torch.Tensor, dist, tau_km: float = 75.0) -> torch.Tensor:
    """``state`` mode: ``p_i ∝ exp(-d(state_i, true) / tau)``; ``(B,), (C, C) -> (B, C)`` float32."""
    dist = torch.as_tensor(dist, dtype=torch.float32, device=true_cls.device)
    _check_classes(true_cls, dist.shape[0])
    return torch.softmax(-dist[true_cls] / tau_km, dim=-1)  # softmax subtracts the row max: no overflow


def soft_labels_sample(true_cls: torch.Tensor, latlon: torch.Tensor, centroids, tau_km: float = 75.0):
    """``sample`` mode (PIGEON): ``p_i ∝ exp(-(d(c_i, x) - d(c_true, x)) / tau)``, x = the sample's point.

    Shapes ``(B,), (B, 2), (C, 2) -> (B, C)`` float32. The anchor ``d(c_true, x)`` is the TRUE state's
    (not the nearest centroid's); it is a per-row constant, so after normalising it only fixes the scale
    of the exponent, and softmax subtracts the row max before ``exp`` so nothing overflows.
    """
    centroids = torch.as_tensor(centroids, dtype=torch.float32, device=true_cls.device)
    _check_classes(true_cls, centroids.shape[0])
    x = latlon.to(torch.float32)
    d = haversine_km(x[:, None, 0], x[:, None, 1], centroids[None, :, 0], centroids[None, :, 1])  # (B, C)
    d_true = d.gather(1, true_cls[:, None])  # (B, 1)
    return torch.softmax(-(d - d_true) / tau_km, dim=-1)


def make_soft_labels(mode: str, true_cls, latlon, centroids, dist, tau_km: float = 75.0) -> torch.Tensor:
    """Dispatch on ``mode`` ("state" uses ``dist``; "sample" uses ``latlon`` and ``centroids``) -> (B, C)."""
    if mode == "state":
        return soft_labels_state(true_cls, dist, tau_km)
    if mode == "sample":
        return soft_labels_sample(true_cls, latlon, centroids, tau_km)
    raise ValueError(f"soft label mode {mode!r}: choose one of {list(SOFT_LABEL_MODES)}")


def _check_classes(true_cls: torch.Tensor, num_classes: int) -> None:
    """Reject unlabelled (-1) or out-of-range classes, which indexing would silently wrap around."""
    bad = (true_cls < 0) | (true_cls >= num_classes)
    if bad.any():
        rows = torch.nonzero(bad).flatten().tolist()
        raise ValueError(f"batch rows {rows[:10]} have class outside [0, {num_classes}) (unlabelled?)")
