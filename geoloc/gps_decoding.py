"""GPS decoding for the mean-distance metric: the point that minimises the EXPECTED great-circle distance.

Given a posterior over candidate points (geocell centroids, neighbours' locations), the point with the
lowest expected haversine distance is the weighted geometric median on the sphere, not the most likely
candidate and not the weighted mean. ``spherical_median`` finds it with Weiszfeld iterations in the tangent
plane (the Riemannian Weiszfeld algorithm: step to the weighted mean of the log-mapped points, with weights
``w_k / d_k``, then map back), batched in torch on 3-D unit vectors, so the antimeridian is nothing special.
``bayes_point`` applies it to the top-k cells of a cell posterior; ``argmax_centroid`` is the plain decoding
it is compared with. Inputs are degrees (lat, lon); numpy in -> numpy out, torch in -> torch out.
"""

from __future__ import annotations

import numpy as np
import torch

from geoloc.geo import EARTH_RADIUS_KM

EPS = 1e-12


def _as_tensor(x, dtype=torch.float64) -> torch.Tensor:
    return x.to(dtype) if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x), dtype=dtype)


def _like(result: torch.Tensor, ref):
    """Return ``result`` as the kind of ``ref``: numpy float64, or a tensor of ref's dtype and device."""
    if isinstance(ref, torch.Tensor):
        return result.to(dtype=ref.dtype if ref.is_floating_point() else torch.float32, device=ref.device)
    return result.cpu().numpy()


def unit(latlon: torch.Tensor) -> torch.Tensor:
    """``(..., 2)`` degrees -> ``(..., 3)`` unit vectors."""
    lat, lon = torch.deg2rad(latlon[..., 0]), torch.deg2rad(latlon[..., 1])
    return torch.stack([lat.cos() * lon.cos(), lat.cos() * lon.sin(), lat.sin()], dim=-1)


def degrees(xyz: torch.Tensor) -> torch.Tensor:
    """``(..., 3)`` non-zero vectors -> ``(..., 2)`` degrees lat/lon."""
    lat = torch.atan2(xyz[..., 2], torch.hypot(xyz[..., 0], xyz[..., 1]))
    return torch.rad2deg(torch.stack([lat, torch.atan2(xyz[..., 1], xyz[..., 0])], dim=-1))


def _angle(x: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Great-circle angle between ``x`` (N, 3) and each of ``pts`` (N, K, 3) -> (N, K) radians (stable)."""
    cross = torch.linalg.vector_norm(torch.cross(pts, x[:, None, :].expand_as(pts), dim=-1), dim=-1)
    return torch.atan2(cross, (pts * x[:, None, :]).sum(-1))


def _start(pts: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted mean direction (N, 3); the heaviest point where the mean vector vanishes."""
    mean = (w[..., None] * pts).sum(1)  # (N, 3)
    heaviest = pts[torch.arange(len(pts)), w.argmax(1)]
    norm = torch.linalg.vector_norm(mean, dim=-1, keepdim=True)
    return torch.where(norm > 1e-9, mean / norm.clamp_min(EPS), heaviest)


def _weiszfeld_step(x: torch.Tensor, pts: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """One Riemannian Weiszfeld step: ``x`` (N, 3), ``pts`` (N, K, 3), ``w`` (N, K) -> new ``x`` (N, 3)."""
    d = _angle(x, pts)  # (N, K)
    tangent = pts - (pts * x[:, None, :]).sum(-1, keepdim=True) * x[:, None, :]  # (N, K, 3), norm sin d
    log = tangent * (d / torch.sin(d).clamp_min(EPS))[..., None]  # log map: length d towards the point
    coef = w / d.clamp_min(1e-10)  # (N, K): Weiszfeld weights; a point at x itself weighs 1e10 and wins
    step = (coef[..., None] * log).sum(1) / coef.sum(1, keepdim=True).clamp_min(EPS)  # (N, 3)
    length = torch.linalg.vector_norm(step, dim=-1, keepdim=True)
    direction = step / length.clamp_min(EPS)
    new = torch.cos(length) * x + torch.sin(length) * direction  # exp map
    return new / torch.linalg.vector_norm(new, dim=-1, keepdim=True)


def spherical_median(points, weights=None, iters: int = 100, tol_deg: float = 1e-7):
    """Weighted geometric median on the sphere: ``(N, K, 2)`` degrees, ``(N, K)`` weights -> ``(N, 2)``.

    Minimises ``sum_k w_k * haversine(x, p_k)`` per row. Weights need not be normalised; zero weights
    ignore a point (padding). Runs in float64 until no row moves more than ``tol_deg`` or ``iters``.
    """
    pts = unit(_as_tensor(points))  # (N, K, 3)
    w = torch.ones(pts.shape[:2], dtype=pts.dtype) if weights is None else _as_tensor(weights)
    if pts.dim() != 3 or w.shape != pts.shape[:2]:
        raise ValueError(
            f"need points (N, K, 2) and weights (N, K); got {tuple(pts.shape[:-1])}+2, {tuple(w.shape)}"
        )
    w = w.to(pts.device).clamp_min(0)
    if (w.sum(1) <= 0).any():
        raise ValueError("spherical_median: every row needs a positive total weight")
    x = _start(pts, w)
    for _ in range(iters):
        new = _weiszfeld_step(x, pts, w)
        moved = torch.rad2deg(_angle(x, new[:, None, :])).max()
        x = new
        if moved < tol_deg:
            break
    return _like(degrees(x), points)


def expected_distance_km(candidate, points, weights):
    """``sum_k w_k * haversine(candidate, p_k) / sum_k w_k``: ``(N, 2), (N, K, 2), (N, K) -> (N,)`` km."""
    x = unit(_as_tensor(candidate))  # (N, 3)
    pts, w = unit(_as_tensor(points)), _as_tensor(weights)
    d = _angle(x, pts) * EARTH_RADIUS_KM  # (N, K)
    return _like((w * d).sum(1) / w.sum(1), points)


def bayes_point(cell_probs, centroids, top_k: int | None = 10):
    """The point of least expected distance under a cell posterior: ``(N, K), (K, 2) -> (N, 2)`` degrees.

    Only the ``top_k`` most likely cells of each row count (all with None): the long tail of tiny
    probabilities costs time and, with an over-smoothed head, drags the point towards the middle.
    """
    probs, cent = _as_tensor(cell_probs), _as_tensor(centroids)
    k = probs.shape[1] if top_k is None else min(top_k, probs.shape[1])
    w, idx = probs.topk(k, dim=1)  # (N, k)
    return _like(spherical_median(cent[idx], w), cell_probs)


def argmax_centroid(cell_probs, centroids):
    """The centroid of each row's most likely cell: ``(N, K), (K, 2) -> (N, 2)`` degrees."""
    probs, cent = _as_tensor(cell_probs), _as_tensor(centroids)
    return _like(cent[probs.argmax(1)], cell_probs)
