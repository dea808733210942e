"""Metrics: always a JSON-lines file and a curves plot in the run dir; wandb via accelerate's trackers.

``RUN/metrics.jsonl`` gets one line per :meth:`MetricsLogger.log` call, written by the main process only:
``{"step": int, "time": unix seconds, <metric>: float, ...}``. Tensors become floats; non-finite values
are written as ``null`` so the file stays strict JSON. The file is appended to, so a resumed run continues
it; :func:`plot_curves` keeps the last value logged for a step, which is the resumed run's.

wandb: the Accelerator must be built with ``log_with=log_with(report_to)``; the logger then calls
``init_trackers`` with the run dir as wandb's ``dir``. ``WANDB_MODE=offline`` writes ``RUN/wandb/offline-run-*``
without network; ``WANDB_MODE=disabled`` turns it into a no-op.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

REPORT_TO = ("none", "wandb")
PROJECT = "geoloc"

# Panel of each metric in curves.png: the first pattern that matches the key wins.
FAMILIES = (
    ("losses", re.compile(r"loss")),
    ("learning rate", re.compile(r"(^|/)lr")),
    ("distance (km)", re.compile(r"(mean|median|p90)_km|km_")),
    # rates in [0, 1] share a panel; counts (val/n) go to "other" so they do not squash the axis
    ("val score and parts", re.compile(r"^val/(?!n$)")),
    ("throughput", re.compile(r"per_s|/s$|samples_s")),
)


def log_with(report_to: str) -> list[str] | None:
    """The ``Accelerator(log_with=...)`` argument for ``--report-to``."""
    if report_to not in REPORT_TO:
        raise ValueError(f"--report-to {report_to!r}: choose one of {list(REPORT_TO)}")
    return None if report_to == "none" else [report_to]


def _scalar(value) -> float | None:
    """A metric value as a JSON-safe float (tensors and numpy scalars included; non-finite -> None)."""
    value = float(value.item() if hasattr(value, "item") else value)
    return value if math.isfinite(value) else None


def metrics_line(metrics: dict, step: int, now: float) -> str:
    """One JSON line: ``step``, ``time`` and the metrics as floats."""
    record = {"step": int(step), "time": round(now, 3)}
    record.update({key: _scalar(value) for key, value in metrics.items()})
    return json.dumps(record)


class MetricsLogger:
    """Writes ``RUN/metrics.jsonl`` (main process) and forwards to accelerate trackers when enabled."""

    def __init__(self, run_dir: str | Path, accelerator, report_to: str = "none", config: dict | None = None):
        wanted = log_with(report_to)
        if wanted and not accelerator.log_with:
            raise ValueError(f"--report-to {report_to}: build the Accelerator with log_with={wanted}")
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.accelerator = accelerator
        self.tracking = wanted is not None
        if accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.tracking:
            # wandb reads WANDB_RUN_GROUP / WANDB_NAME only at its first setup in a process: a process that
            # runs several runs (the tuner's trials) passes them to every init
            names = {
                k: os.environ[v]
                for k, v in (("group", "WANDB_RUN_GROUP"), ("name", "WANDB_NAME"))
                if os.environ.get(v)
            }
            init_kwargs = {"wandb": {"dir": str(self.run_dir), **names}}
            accelerator.init_trackers(PROJECT, config=config or {}, init_kwargs=init_kwargs)

    def log(self, metrics: dict, step: int) -> None:
        """Record ``metrics`` at optimiser step ``step``; safe to call on every rank."""
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(metrics_line(metrics, step, time.time()) + "\n")
        if self.tracking:
            self.accelerator.log({k: _scalar(v) for k, v in metrics.items()}, step=step)

    def finish(self) -> Path | None:
        """End the trackers and draw ``RUN/curves.png`` (main process); returns the plot path there."""
        if self.tracking:
            self.accelerator.end_training()
        if not self.accelerator.is_main_process or not self.path.is_file():
            return None
        return plot_curves(self.path, self.run_dir / "curves.png")


def read_series(jsonl_path: str | Path) -> dict[str, dict[int, float]]:
    """``{metric: {step: value}}`` from a metrics file; a later line for the same step wins (resume)."""
    series: dict[str, dict[int, float]] = {}
    for lineno, line in enumerate(Path(jsonl_path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record.pop("step"))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{jsonl_path}:{lineno}: not a metrics record ({err})") from None
        record.pop("time", None)
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, {})[step] = float(value)
    return series


def family(key: str) -> str:
    """The curves.png panel of a metric key."""
    return next((name for name, pattern in FAMILIES if pattern.search(key)), "other")


def plot_curves(jsonl_path: str | Path, png_path: str | Path) -> Path:
    """One panel per metric family (losses, lr, km, val score and parts, throughput, other) against step."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    series = read_series(jsonl_path)
    panels: dict[str, list[str]] = {}
    for key in sorted(series):
        panels.setdefault(family(key), []).append(key)
    order = [name for name, _ in FAMILIES] + ["other"]
    names = [name for name in order if name in panels] or ["(no metrics yet)"]
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 2.6 * len(names)), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        for key in panels.get(name, []):
            steps = sorted(series[key])
            ax.plot(
                steps, [series[key][s] for s in steps], marker="." if len(steps) < 50 else None, label=key
            )
        ax.set_title(name)
        values = [v for key in panels.get(name, []) for v in series[key].values()]
        if name == "learning rate" and values and min(values) > 0:
            ax.set_yscale("log")  # backbone and head lrs differ by ~100x
        ax.grid(alpha=0.3)
        if panels.get(name):
            ax.legend(
                fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0)
            )  # outside: never hides a curve
    axes[-1, 0].set_xlabel("optimiser step")
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
