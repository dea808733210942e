"""The evaluation report of ``infer.py --eval``: ``report.json`` plus three pictures.

``report.json`` holds every number of ``geoloc.predict.evaluate`` (the competition score, its parts and the
extra metrics) at the top level, so it matches the trainer's val metrics key for key, plus the run's
context. Pictures: the state confusion matrix, predicted vs true points on plain lat/lon axes with the
state centroids labelled (no outline file can be had offline here), and the histogram of errors in km.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from geoloc.geo import haversine_km
from geoloc.predict import Predictions, evaluate, point_predictions

REPORT_JSON = "report.json"
PICTURES = {"confusion": "confusion.png", "map": "map.png", "errors": "errors_km.png"}


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


def plot_map(pred: np.ndarray, true: np.ndarray, centroids: np.ndarray, names: list[str], path: Path) -> Path:
    """True (dots) and predicted (crosses) points joined by lines; state centroids labelled."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 6))
    ax.plot([true[:, 1], pred[:, 1]], [true[:, 0], pred[:, 0]], color="0.75", lw=0.5, zorder=1)
    ax.scatter(true[:, 1], true[:, 0], s=8, c="tab:blue", label="true", zorder=2)
    ax.scatter(pred[:, 1], pred[:, 0], s=10, c="tab:red", marker="x", label="predicted", zorder=3)
    ax.scatter(
        centroids[:, 1], centroids[:, 0], s=25, facecolors="none", edgecolors="k", label="state centroid"
    )
    for (lat, lon), name in zip(centroids, names):
        ax.annotate(name, (lon, lat), fontsize=7, xytext=(3, 3), textcoords="offset points")
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
    report = {
        **metrics,
        "confusion": {"states": list(encoder.state_indices), "names": names, "counts": cm.tolist()},
        "pictures": dict(PICTURES),
        "context": context or {},
    }
    (out_dir / REPORT_JSON).write_text(json.dumps(report, indent=2))
    return report
