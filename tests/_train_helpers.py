"""Launch ``train.py`` from tests: one plain process, or two real gloo ranks (DDP or DeepSpeed ZeRO-2/3)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(kind: str) -> tuple[list[str], dict]:
    """Command prefix and extra environment for ``kind``: python | ddp | zero2 | zero3."""
    if kind == "python":
        return [sys.executable], {}
    accel = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port())]
    if kind == "ddp":  # `--cpu --num_processes 2` would silently start ONE process (ENVIRONMENT-NOTES)
        return accel + ["--multi_gpu", "--num_processes", "2"], {"ACCELERATE_USE_CPU": "1"}
    config = REPO / "accelerate_configs" / f"4xa100_{kind}.yaml"  # the shipped configs, 2 ranks instead of 4
    return accel + ["--config_file", str(config), "--num_processes", "2", "--mixed_precision", "bf16"], {}


def train_args(shards, clip_dir, out_dir, cache_dir, *overrides: str) -> list[str]:
    return [
        "train.py", "--shards", str(shards), "--output-dir", str(out_dir), "--preset", "smoke",
        f"model.backbone={clip_dir}", f"train.cache_dir={cache_dir}", *overrides,
    ]  # fmt: skip


def run_train(
    args: list[str], kind: str = "python", timeout: int = 600, drop_env: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """Run train.py from the repository root; stdout and stderr are captured (as text)."""
    prefix, extra = launcher(kind)
    env = {k: v for k, v in {**os.environ, **ENV, **extra}.items() if k not in drop_env}
    return subprocess.run(
        prefix + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def check(proc: subprocess.CompletedProcess, rc: int = 0) -> subprocess.CompletedProcess:
    assert proc.returncode == rc, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def val_records(run_dir) -> dict[int, dict]:
    """``{step: record}`` of the val lines (a resumed run's later line for a step wins)."""
    return {r["step"]: r for r in read_metrics(run_dir) if "val/score" in r}


def export_meta(run_dir) -> dict:
    return json.loads((Path(run_dir) / "model" / "geoloc.json").read_text())
