"""Geocells nested in states (after PIGEON): small clusters of training points that never cross a border.

Cells are built inside each state separately from the training points' 3-D unit vectors with scikit-learn
``KMeans``: a group of more than ``max_size`` points is clustered into about one cluster per
``(min_size + max_size) / 2`` points, every cluster under ``min_size`` is merged into the cluster with the
nearest centre, and each cluster still over ``max_size`` is split the same way again (when merging leaves a
single cluster, a balanced 2-means bisection, whose cut is moved along the axis between the two centres so
both halves keep ``min_size``, is used instead); groups of at most ``max_size`` points are cells. The rule:

- a state with at most ``max_size`` training points is ONE cell (so, since ``max_size >= 2 * min_size - 1``
  is required, every state with fewer than ``2 * min_size`` points is one cell);
- every other state is cut into cells of ``min_size..max_size`` points each, guaranteed;
- the only cells under ``min_size`` are states that have fewer than ``min_size`` points in all.

Cell ids are contiguous, ordered by state index then by the bisection order, and deterministic for a
seed. ``GeoCells`` holds per cell: the state (ORIGINAL index), the centroid (spherical mean, degrees) and
the member count; it maps cell probabilities to state probabilities, makes PIGEON's haversine-smoothed
cell targets and assigns new labelled points to the nearest cell of their own state.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from geoloc.geo import soft_labels_sample

DEFAULT_MIN_SIZE, DEFAULT_MAX_SIZE = 30, 60


def to_unit(latlon) -> np.ndarray:
    """``(N, 2)`` degrees -> ``(N, 3)`` unit vectors (float64)."""
    rad = np.deg2rad(np.asarray(latlon, np.float64).reshape(-1, 2))
    lat, lon = rad[:, 0], rad[:, 1]
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=1)


def to_latlon(xyz) -> np.ndarray:
    """``(N, 3)`` vectors (any length > 0) -> ``(N, 2)`` degrees."""
    xyz = np.asarray(xyz, np.float64)
    lat = np.arctan2(xyz[:, 2], np.hypot(xyz[:, 0], xyz[:, 1]))
    return np.rad2deg(np.stack([lat, np.arctan2(xyz[:, 1], xyz[:, 0])], axis=1))


def spherical_mean(latlon) -> np.ndarray:
    """The normalised mean unit vector of points, as ``(2,)`` degrees (no trouble at the antimeridian)."""
    return to_latlon(to_unit(latlon).mean(0, keepdims=True))[0]


def _kmeans(xyz: np.ndarray, k: int, seed: int):
    from sklearn.cluster import KMeans

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate points make "fewer distinct clusters" warnings
        return KMeans(n_clusters=k, n_init=1, random_state=seed).fit(xyz)


def _bisect(xyz: np.ndarray, min_size: int, seed: int) -> list[np.ndarray]:
    """Balanced 2-means: two row-index groups, both >= min_size (needs len(xyz) >= 2 * min_size)."""
    km = _kmeans(xyz, 2, seed)
    score = xyz @ (km.cluster_centers_[1] - km.cluster_centers_[0])  # (n,): low = near centre 0
    order = np.argsort(score, kind="stable")
    first = int(np.clip((km.labels_ == 0).sum(), min_size, len(xyz) - min_size))
    return [np.sort(order[:first]), np.sort(order[first:])]


def _merge_small(xyz: np.ndarray, labels: np.ndarray, min_size: int) -> list[np.ndarray]:
    """Row-index groups of a clustering, the smallest group under ``min_size`` merged into the group with
    the nearest centre, again and again until none is under ``min_size`` (or one group is left)."""
    groups = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    centres = [xyz[g].mean(0) for g in groups]
    while len(groups) > 1:
        small = min(range(len(groups)), key=lambda i: (len(groups[i]), i))
        if len(groups[small]) >= min_size:
            break
        sims = [c @ centres[small] if i != small else -np.inf for i, c in enumerate(centres)]
        target = int(np.argmax(sims))
        groups[target] = np.sort(np.concatenate([groups[target], groups[small]]))
        centres[target] = xyz[groups[target]].mean(0)
        del groups[small], centres[small]
    return groups


def _split(xyz: np.ndarray, min_size: int, max_size: int, seed: int) -> list[np.ndarray]:
    """Split a group of more than ``max_size`` points into >= 2 groups of >= ``min_size`` each.

    KMeans with about one cluster per ``(min_size + max_size) / 2`` points, small clusters merged into
    their nearest neighbour; if that leaves one group, a balanced bisection (always possible, since
    ``len > max_size >= 2 * min_size - 1``).
    """
    k = max(2, round(2 * len(xyz) / (min_size + max_size)))
    groups = _merge_small(xyz, _kmeans(xyz, k, seed).labels_, min_size)
    return groups if len(groups) >= 2 else _bisect(xyz, min_size, seed)


def split_state(xyz: np.ndarray, min_size: int, max_size: int, seed: int) -> list[np.ndarray]:
    """Member row indices of each cell of one state's points ``(n, 3)``; every group over ``max_size``
    is split again (each split makes strictly smaller groups, so this ends)."""
    cells, stack = [], [np.arange(len(xyz))]
    while stack:  # depth first, groups in order: a deterministic cell order
        rows = stack.pop()
        if len(rows) <= max_size:
            cells.append(rows)
            continue
        stack.extend(rows[g] for g in reversed(_split(xyz[rows], min_size, max_size, seed)))
    return cells


@dataclass(frozen=True, eq=False)
class GeoCells:
    """Cells nested in states. ``state`` (K,) original state index, ``centroid`` (K, 2) degrees,
    ``count`` (K,) training members; ``min_size``/``max_size``/``seed`` record how they were built."""

    state: np.ndarray
    centroid: np.ndarray
    count: np.ndarray
    min_size: int = DEFAULT_MIN_SIZE
    max_size: int = DEFAULT_MAX_SIZE
    seed: int = 0

    @property
    def num_cells(self) -> int:
        return len(self.state)

    @property
    def cell_to_state(self) -> np.ndarray:
        """``(K,)`` ORIGINAL state index (0..49) of each cell."""
        return self.state

    def cell_to_class(self, encoder) -> np.ndarray:
        """``(K,)`` contiguous class of each cell's state, under a ``LabelEncoder``."""
        return encoder.encode(self.state)

    def state_probs(self, cell_probs, encoder):
        """``(N, K)`` cell probabilities -> ``(N, C)`` state (class) probabilities; numpy or torch."""
        return sum_by_group(cell_probs, self.cell_to_class(encoder), encoder.num_classes)

    def soft_targets(self, latlon: torch.Tensor, true_cell: torch.Tensor, tau_km: float = 75.0):
        """PIGEON's smoothed targets ``p_i ∝ exp(-(d(cell_i, x) - d(cell_true, x)) / tau)``: (B, K) float32."""
        return cell_soft_targets(latlon, true_cell, self.centroid, tau_km)

    def assign(self, latlon, state) -> np.ndarray:
        """Cell id ``(N,)`` of labelled points: the nearest centroid among the cells of the point's state."""
        return assign_to_cells(latlon, state, self.centroid, self.state)

    def to_dict(self) -> dict:
        """JSON-safe: plain ints and floats."""
        return {
            "version": 1,
            "min_size": int(self.min_size),
            "max_size": int(self.max_size),
            "seed": int(self.seed),
            "state": [int(s) for s in self.state],
            "centroid": [[float(a), float(b)] for a, b in self.centroid],
            "count": [int(c) for c in self.count],
        }

    @classmethod
    def from_dict(cls, d: dict) -> GeoCells:
        """Inverse of ``to_dict``; a clear error naming the key for a malformed dict."""
        return cls(**_parse_dict(d))


def _parse_dict(d: dict) -> dict:
    if not isinstance(d, dict) or d.get("version") != 1:
        raise ValueError(f"geocells: expected a dict with version 1, got {type(d).__name__} {str(d)[:80]}")
    missing = [k for k in ("state", "centroid", "count", "min_size", "max_size", "seed") if k not in d]
    if missing:
        raise ValueError(f"geocells: missing key(s) {missing}")
    try:
        state = np.asarray(d["state"], dtype=np.int64).reshape(-1)
        centroid = np.asarray(d["centroid"], dtype=np.float64).reshape(-1, 2)
        count = np.asarray(d["count"], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise ValueError(f"geocells: state/centroid/count are not numeric lists: {err}") from None
    if not (len(state) == len(centroid) == len(count)) or not np.isfinite(centroid).all():
        raise ValueError(f"geocells: {len(state)} states, {len(centroid)} centroids, {len(count)} counts")
    sizes = {k: int(d[k]) for k in ("min_size", "max_size", "seed")}
    return {"state": state, "centroid": centroid, "count": count, **sizes}


def build_geocells(
    latlon, state, min_size: int = DEFAULT_MIN_SIZE, max_size: int = DEFAULT_MAX_SIZE, seed: int = 0
) -> tuple[GeoCells, np.ndarray]:
    """Cells of training points ``(N, 2)`` degrees with original state indices ``(N,)``.

    Returns the cells and each training point's cell id ``(N,)`` (its member cell, which is not always
    its nearest centroid). See the module docstring for the size rule.
    """
    latlon, state = np.asarray(latlon, np.float64).reshape(-1, 2), np.asarray(state, np.int64).reshape(-1)
    if len(latlon) != len(state):
        raise ValueError(f"{len(latlon)} points but {len(state)} state labels")
    if not 1 <= min_size or max_size < 2 * min_size - 1:
        raise ValueError(f"need 1 <= min_size and max_size >= 2 * min_size - 1; got {min_size}, {max_size}")
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    xyz = to_unit(latlon)
    member = np.empty(len(state), dtype=np.int64)
    states, centroids, counts = [], [], []
    with threadpool_limits(1):  # many small KMeans: threads only add start-up and contention
        groups = [(s, rows, split_state(xyz[rows], min_size, max_size, seed)) for s, rows in _by_state(state)]
    for s, rows, parts in groups:
        for cell_rows in parts:
            member[rows[cell_rows]] = len(states)
            states.append(int(s))
            centroids.append(to_latlon(xyz[rows[cell_rows]].mean(0, keepdims=True))[0])
            counts.append(len(cell_rows))
    cells = GeoCells(
        np.asarray(states, np.int64), np.asarray(centroids).reshape(-1, 2), np.asarray(counts, np.int64),
        min_size, max_size, seed,
    )  # fmt: skip
    return cells, member


def _by_state(state: np.ndarray):
    """(state, row indices) per distinct state, in sorted state order: cell ids grouped by state."""
    return [(int(s), np.flatnonzero(state == s)) for s in np.unique(state)]


def assign_to_cells(latlon, state, centroid, cell_state, chunk: int = 4096) -> np.ndarray:
    """Nearest same-state cell ``(N,)`` of points ``(N, 2)`` with states ``(N,)``; cells ``(K, 2)``, ``(K,)``.

    Nearest by great-circle distance (largest dot product of unit vectors), in chunks of rows so memory
    stays ``chunk x K``. A state with no cell is an error naming it.
    """
    state = np.asarray(state, np.int64).reshape(-1)
    unknown = sorted(set(state.tolist()) - set(np.asarray(cell_state).tolist()))
    if unknown:
        raise ValueError(f"state index(es) {unknown[:10]} have no geocell (not in the training data?)")
    xyz, cxyz = to_unit(latlon), to_unit(centroid)  # (N, 3), (K, 3)
    out = np.empty(len(state), dtype=np.int64)
    for lo in range(0, len(state), chunk):
        sims = xyz[lo : lo + chunk] @ cxyz.T  # (n, K)
        sims[state[lo : lo + chunk, None] != np.asarray(cell_state)[None, :]] = -np.inf
        out[lo : lo + chunk] = sims.argmax(1)
    return out


def sum_by_group(probs, group, num_groups: int):
    """``(N, K)`` -> ``(N, G)``: column k added into column ``group[k]``. numpy in -> numpy out, torch -> torch."""
    if isinstance(probs, torch.Tensor):
        index = torch.as_tensor(np.asarray(group), dtype=torch.long, device=probs.device)
        out = probs.new_zeros(probs.shape[0], num_groups)
        return out.index_add_(1, index, probs)
    probs = np.asarray(probs)
    out = np.zeros((probs.shape[0], num_groups), dtype=probs.dtype)
    np.add.at(out.T, np.asarray(group), probs.T)  # rows of out.T are groups: columns added in order
    return out


def cell_soft_targets(latlon: torch.Tensor, true_cell: torch.Tensor, centroid, tau_km: float = 75.0):
    """``(B, 2)`` points, ``(B,)`` true cells, ``(K, 2)`` centroids -> ``(B, K)`` float32 targets.

    ``exp(-(d(cell_i, x) - d(cell_true, x)) / tau)`` normalised per row (softmax, so no overflow however
    far the cells): the state-level ``geoloc.geo.soft_labels_sample`` applied to cells.
    """
    return soft_labels_sample(true_cell, latlon, centroid, tau_km)
