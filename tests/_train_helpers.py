"""Launch ``train.py`` from tests: one plain process, or N real gloo ranks (DDP or DeepSpeed ZeRO-2/3).

Every launch runs under a hard timeout (a hang fails the test naming the launch, with each rank's last
collectives) and with ``GEOLOC_TRACE_COLLECTIVES`` set: :func:`check` then requires every rank to have
made the same sequence of collectives (the invariant in ARCHITECTURE.md).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(kind: str, nproc: int = 2) -> tuple[list[str], dict]:
    """Command prefix and extra environment for ``kind``: python | ddp | zero2 | zero3, ``nproc`` ranks."""
    if kind == "python":
        return [sys.executable], {}
    accel = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port())]
    if kind == "ddp":  # `--cpu --num_processes 2` would silently start ONE process (ENVIRONMENT-NOTES)
        return accel + ["--multi_gpu", "--num_processes", str(nproc)], {"ACCELERATE_USE_CPU": "1"}
    config = (
        REPO / "accelerate_configs" / f"4xa100_{kind}.yaml"
    )  # the shipped configs, nproc ranks instead of 4
    return accel + [
        "--config_file",
        str(config),
        "--num_processes",
        str(nproc),
        "--mixed_precision",
        "bf16",
    ], {}


def train_args(shards, clip_dir, out_dir, cache_dir, *overrides: str) -> list[str]:
    return [
        "train.py", "--shards", str(shards), "--output-dir", str(out_dir), "--preset", "smoke",
        f"model.backbone={clip_dir}", f"train.cache_dir={cache_dir}", *overrides,
    ]  # fmt: skip


def read_trace(folder) -> dict[int, list[str]]:
    return {int(f.stem[4:]): f.read_text().splitlines() for f in sorted(Path(folder).glob("rank*.log"))}


def launch(
    cmd: list[str],
    label: str,
    timeout: int = 600,
    env_extra: dict | None = None,
    drop_env: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """Run ``cmd`` from the repository root under a hard timeout, tracing collectives.

    A hang fails the calling test naming ``label`` and each rank's last collectives. The ranks of a
    killed launcher stop by themselves (geoloc.distributed.start_parent_watchdog).
    """
    trace = tempfile.mkdtemp(prefix="trace-")
    env = {**os.environ, **ENV, **(env_extra or {}), "GEOLOC_TRACE_COLLECTIVES": trace}
    env = {k: v for k, v in env.items() if k not in drop_env}
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as err:
        last = {r: lines[-3:] for r, lines in read_trace(trace).items()}
        out = (err.stderr or b"")[-3000:]
        pytest.fail(
            f"{label}: no end after {timeout} s (a hang?); last collectives per rank: {last}\n{out!r}"
        )
    proc.label, proc.trace = label, read_trace(trace)
    return proc


def run_train(
    args: list[str], kind: str = "python", timeout: int = 600, drop_env: tuple[str, ...] = (), nproc: int = 2,
    label: str | None = None, env: dict | None = None,
) -> subprocess.CompletedProcess:  # fmt: skip
    """Run train.py (``kind`` launcher, ``nproc`` ranks); stdout and stderr are captured (as text)."""
    prefix, extra = launcher(kind, nproc)
    name = label or f"train.py {kind} x{nproc if kind != 'python' else 1}"
    return launch(prefix + args, name, timeout, {**extra, **(env or {})}, drop_env)


def same_collectives(proc) -> None:
    """Every rank made the same collectives in the same order, from the same lines."""
    traces = proc.trace
    if len(traces) < 2:
        return
    first = traces[min(traces)]
    for rank, lines in traces.items():
        if lines != first:
            diff = next(
                (i for i, (a, b) in enumerate(zip(first, lines)) if a != b), min(len(first), len(lines))
            )
            raise AssertionError(
                f"{proc.label}: rank {rank} made other collectives than rank {min(traces)} from call {diff}: "
                f"{lines[diff : diff + 3]} vs {first[diff : diff + 3]} ({len(lines)} vs {len(first)} calls)"
            )


def check(proc: subprocess.CompletedProcess, rc: int = 0) -> subprocess.CompletedProcess:
    assert proc.returncode == rc, (
        f"{getattr(proc, 'label', '')} rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    if rc == 0 and hasattr(proc, "trace"):
        same_collectives(proc)
    return proc


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def val_records(run_dir) -> dict[int, dict]:
    """``{step: record}`` of the val lines (a resumed run's later line for a step wins)."""
    return {r["step"]: r for r in read_metrics(run_dir) if "val/score" in r}


def export_meta(run_dir) -> dict:
    return json.loads((Path(run_dir) / "model" / "geoloc.json").read_text())
