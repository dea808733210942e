"""The evaluation report of ``infer.py --eval``: ``report.json`` plus four pictures.

``report.json`` holds every number of ``geoloc.predict.evaluate`` (the competition score, its parts and the
extra metrics) at the top level, so it matches the trainer's val metrics key for key, plus the run's
context. Pictures: the state confusion matrix, predicted vs true points on lat/lon axes over the real state
outlines (the Census boundary file shipped in ``plotly-geo``, via ``geoloc.geography``, simplified to
``OUTLINE_TOLERANCE_DEG`` for speed) with the state centroids labelled, and the histogram of errors in km.
The map shows the data's extent plus a margin, so Alaska and Hawaii appear only when the data go there.
When the predictions carry the fused embeddings (``values["embedding"]``, which ``--eval`` asks for),
``embeddings.png`` shows their 2-D t-SNE coloured by true state: do samples of one state cluster, which
states mix? Beyond ``EMBEDDING_POINTS`` samples a seeded random subsample is drawn (the title says so).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from geoloc.geo import haversine_km
from geoloc.predict import Predictions, evaluate, point_predictions

REPORT_JSON = "report.json"
PICTURES = {"confusion": "confusion.png", "map": "map.png", "errors": "errors_km.png"}
OUTLINE_TOLERANCE_DEG = 0.05  # ~5 km: invisible at report size, 10x fewer vertices than the file
MAP_MARGIN_DEG = 2.0
EMBEDDING_PICTURE = "embeddings.png"
EMBEDDING_POINTS = 5000  # t-SNE cost grows ~N log N (5,000 x 768-d: ~2 min on 2 busy cores); more: subsampled
EMBEDDING_LEGEND = 12  # states named in the legend: the most frequent among the points drawn
PCA_DIMS = 50  # t-SNE runs on the first principal components (the usual first step; much faster)


def confusion_matrix(true_cls: np.ndarray, pred_cls: np.ndarray, num_classes: int) -> np.ndarray:
    """``(C, C)`` int64 counts, rows = true class, columns = top-1 predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(true_cls, np.int64), np.asarray(pred_cls, np.int64)), 1)
    return cm


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(cm: np.ndarray, names: list[str], path: Path) -> Path:
    """Row-normalised confusion matrix, counts written in the cells when there are few classes."""
    plt = _pyplot()
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.35 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted state (top 1)")
    ax.set_ylabel("true state")
    if len(names) <= 20:
        for (i, j), n in np.ndenumerate(cm):
            if n:
                ax.text(
                    j,
                    i,
                    str(n),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="black" if rates[i, j] < 0.6 else "white",
                )
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true state's samples")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def state_outline_rings() -> list[np.ndarray]:
    """Every state's outer rings ``(M, 2)`` lon/lat, simplified; empty (with a warning) without plotly-geo."""
    try:
        from geoloc.geography import all_outline_rings

        return [ring for rings in all_outline_rings(OUTLINE_TOLERANCE_DEG).values() for ring in rings]
    except (ImportError, OSError, ValueError) as err:
        warnings.warn(f"report map drawn without state outlines: {err}", stacklevel=2)
        return []


def draw_outlines(ax, rings: list[np.ndarray]):
    """Add the rings as one grey ``LineCollection`` behind everything, without touching the axes limits."""
    from matplotlib.collections import LineCollection

    lines = LineCollection(rings, colors="0.55", linewidths=0.5, zorder=0, label="_state outlines")
    ax.add_collection(lines, autolim=False)  # the Aleutians at +179 deg must not stretch the view
    return lines


def map_extent(*point_sets: np.ndarray, margin: float = MAP_MARGIN_DEG) -> tuple[float, float, float, float]:
    """(lon_min, lon_max, lat_min, lat_max) of all finite points ``(N, 2)`` lat/lon, plus ``margin`` degrees."""
    pts = np.concatenate([np.asarray(p, np.float64).reshape(-1, 2) for p in point_sets])
    pts = pts[np.isfinite(pts).all(1)]
    if not len(pts):
        return (-125.0, -66.0, 24.0, 50.0)  # contiguous US
    (lat0, lon0), (lat1, lon1) = pts.min(0), pts.max(0)
    return (lon0 - margin, lon1 + margin, lat0 - margin, lat1 + margin)


def plot_map(pred: np.ndarray, true: np.ndarray, centroids: np.ndarray, names: list[str], path: Path) -> Path:
    """True (dots) and predicted (crosses) points joined by lines over the state outlines; centroids labelled."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 6))
    draw_outlines(ax, state_outline_rings())
    ax.plot([true[:, 1], pred[:, 1]], [true[:, 0], pred[:, 0]], color="0.75", lw=0.5, zorder=1)
    ax.scatter(true[:, 1], true[:, 0], s=8, c="tab:blue", label="true", zorder=2)
    ax.scatter(pred[:, 1], pred[:, 0], s=10, c="tab:red", marker="x", label="predicted", zorder=3)
    ax.scatter(
        centroids[:, 1], centroids[:, 0], s=25, facecolors="none", edgecolors="k", label="state centroid"
    )
    for (lat, lon), name in zip(centroids, names):
        ax.annotate(name, (lon, lat), fontsize=7, xytext=(3, 3), textcoords="offset points")
    lon0, lon1, lat0, lat1 = map_extent(true, pred, centroids)
    ax.set_xlim(lon0, lon1)
    ax.set_ylim(lat0, lat1)
    ax.set_xlabel("longitude (deg)")
    ax.set_ylabel("latitude (deg)")
    ax.set_aspect(1 / np.cos(np.deg2rad(np.nanmean(true[:, 0]))))  # equal km per degree at the mean latitude
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_errors(km: np.ndarray, path: Path) -> Path:
    """Histogram of the distance errors with the mean and median marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(km, bins=min(50, max(5, len(km) // 4)), color="tab:blue", alpha=0.8)
    for value, label, style in ((km.mean(), "mean", "-"), (np.median(km), "median", "--")):
        ax.axvline(value, color="k", ls=style, label=f"{label} {value:.0f} km")
    ax.set_xlabel("error (km)")
    ax.set_ylabel("samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def subsample(n: int, cap: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most ``cap`` of ``n`` rows: all of them, or a seeded random choice (so the
    same predictions, sorted by sample id, always give the same points)."""
    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=cap, replace=False))


def project_2d(x: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """``(N, D) -> (N, 2)`` and the method's name: t-SNE (after PCA to ``PCA_DIMS``), or plain PCA for
    fewer than 5 points (t-SNE's perplexity needs more)."""
    from sklearn.decomposition import PCA

    x = np.asarray(x, np.float64)
    n = len(x)
    if n < 5:
        xy = np.zeros((n, 2))
        if n > 1:
            pcs = PCA(n_components=min(2, n - 1, x.shape[1])).fit_transform(x)  # (N, <=2)
            xy[:, : pcs.shape[1]] = pcs
        return xy, "PCA"
    from sklearn.manifold import TSNE

    if x.shape[1] > PCA_DIMS and n > PCA_DIMS:
        x = PCA(n_components=PCA_DIMS, random_state=seed).fit_transform(x)
    tsne = TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3), init="pca", random_state=seed)
    return tsne.fit_transform(x), "t-SNE"


def _state_colours(num_classes: int) -> np.ndarray:
    """(C, 4) RGBA, distinct for up to 20 states, spread over a wide colour map beyond."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20" if num_classes <= 20 else "turbo"]
    return cmap(np.arange(num_classes) if num_classes <= 20 else np.linspace(0, 1, num_classes))


def plot_embeddings(
    emb: np.ndarray,
    classes: np.ndarray,
    names: list[str],
    path: Path,
    cap: int = EMBEDDING_POINTS,
    seed: int = 0,
) -> dict:
    """2-D projection of ``emb`` (N, D) coloured by true class (N,); rows with non-finite values (samples
    without a view) are left out. Returns what was drawn: ``points``, ``of``, ``method``, ``legend``."""
    plt = _pyplot()
    ok = np.isfinite(emb).all(axis=1)
    emb, classes = emb[ok], np.asarray(classes)[ok]
    idx = subsample(len(emb), cap, seed)
    xy, method = project_2d(emb[idx], seed)
    cls = classes[idx]
    counts = np.bincount(cls, minlength=len(names))
    legend = [int(c) for c in np.argsort(-counts, kind="stable")[:EMBEDDING_LEGEND] if counts[c]]
    colours = _state_colours(len(names))
    fig, ax = plt.subplots(figsize=(8, 7))
    ax.scatter(xy[:, 0], xy[:, 1], s=6 if len(xy) > 1000 else 14, c=colours[cls], linewidths=0)
    for c in legend:  # legend entries only: empty scatters in the states' colours
        ax.scatter([], [], s=20, color=colours[c], label=f"{names[c]} ({counts[c]})")
    drawn = f"{len(idx):,} of {len(emb):,} samples" + (
        " (seeded random subsample)" if len(idx) < len(emb) else ""
    )
    ax.set_title(f"{method} of the fused embeddings, coloured by true state\n{drawn}", fontsize=10)
    ax.set_xticks([]), ax.set_yticks([])
    if legend:
        title = f"{len(legend)} most frequent states" if len(legend) < (counts > 0).sum() else "states"
        title += " (samples drawn)"
        ax.legend(title=title, fontsize=7, title_fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return {"points": len(idx), "of": len(emb), "method": method, "legend": [names[c] for c in legend]}


def write_report(
    out_dir: str | Path, preds: Predictions, encoder, centroids, prior=None, context=None
) -> dict:
    """Evaluate ``preds`` (labelled rows), draw the pictures, write ``report.json``; returns the report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = evaluate(preds, encoder, prior)
    lab = preds.take(preds.labelled)
    top5, latlon = point_predictions(lab, encoder, prior)
    true = lab.latlon.astype(np.float64)
    km = haversine_km(latlon[:, 0], latlon[:, 1], true[:, 0], true[:, 1])
    names = list(encoder.state_names)
    pred_cls = encoder.encode(np.where(top5[:, 0] >= 0, top5[:, 0], encoder.state_indices[0]))
    cm = confusion_matrix(lab.label, pred_cls, encoder.num_classes)
    plot_confusion(cm, names, out_dir / PICTURES["confusion"])
    plot_map(latlon, true, np.asarray(centroids, dtype=np.float64), names, out_dir / PICTURES["map"])
    plot_errors(km, out_dir / PICTURES["errors"])
    pictures, extra = dict(PICTURES), {}
    if "embedding" in lab.values:  # asked for by infer.py --eval (geoloc.infer.run)
        extra["embeddings"] = plot_embeddings(
            lab.values["embedding"], lab.label, names, out_dir / EMBEDDING_PICTURE
        )
        pictures["embeddings"] = EMBEDDING_PICTURE
    report = {
        **metrics,
        "confusion": {"states": list(encoder.state_indices), "names": names, "counts": cm.tolist()},
        "pictures": pictures,
        **extra,
        "context": context or {},
    }
    (out_dir / REPORT_JSON).write_text(json.dumps(report, indent=2))
    return report
