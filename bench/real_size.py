"""Real size on a CPU: a StreetCLIP-shaped ViT-L/14-336 (random weights) through the three CLIs, with the
wall time and the peak resident memory of every step.

    OMP_NUM_THREADS=2 python bench/real_size.py --work-dir /tmp/real_size

The pipeline ``tests/test_real_size.py`` checks, on a handful of generated samples (2 train, 1 val, 2
test after ``shard_dataset.py --val-fraction 0.34``):

  shard      shard_dataset.py
  train      train.py: one frozen epoch on the embedding cache (3 samples embedded), then one fine-tune
             epoch of 2 updates at ``train.finetune_batch_size=1``, activation checkpointing off
  train-ckpt train.py --phase finetune --init-from the first run's model: 2 updates with
             ``model.gradient_checkpointing=true``
  infer      infer.py on the first run's model -> submission.csv (2 rows)

Each step is a plain ``python`` process (one rank, fp32 on the CPU: no autocast there), measured with
``os.wait4``: its peak RSS is the largest of the process and its DataLoader workers. With a fine-tune
batch of one sample (4 views) the difference between ``train`` and ``train-ckpt`` is about what one
sample's fp32 activations cost. The ViT-L checkpoint (1.2 GB of fp32 weights) is built once and cached
in ``~/.cache/geoloc/test-vitl/<key>`` (``GEOLOC_TEST_CACHE`` moves it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ENV = {
    "DS_ACCELERATOR": "cpu",
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}
CHECKPOINT_VERSION = 1  # bump when build_clip's output changes
# 5 generated samples in 2 states: 3 labelled (-> 2 train + 1 val) and 2 test
DATA = {"n_train": 3, "n_test": 2, "num_states": 2, "seed": 0, "val_fraction": 0.34}
TRAIN = (
    "--preset",
    "smoke",
    "train.epochs_frozen=1",
    "train.epochs_finetune=1",
    "train.finetune_batch_size=1",
    "train.finetune_grad_accum=1",
    "train.eval_batch_size=4",
    "train.save_every_steps=1000",
    "train.keep_checkpoints=1",
    "data.num_workers=1",
)


@dataclass
class Step:
    name: str
    rc: int | None  # None: killed at its timeout
    seconds: float
    peak_rss_gb: float
    log: Path


# ----------------------------------------------------------------------------- the checkpoint


def checkpoint_key() -> str:
    from geoloc.tiny_clip import STREETCLIP_VISION

    payload = json.dumps({"vision": STREETCLIP_VISION, "version": CHECKPOINT_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def vitl_checkpoint(cache: str | Path | None = None) -> Path:
    """The StreetCLIP-shaped checkpoint, built once (temp dir + rename, so a crash leaves no half)."""
    from geoloc.tiny_clip import STREETCLIP_VISION, build_clip

    root = Path(cache or os.environ.get("GEOLOC_TEST_CACHE", "~/.cache/geoloc/test-vitl")).expanduser()
    path = root / checkpoint_key()
    if (path / "model.safetensors").is_file() and (path / "preprocessor_config.json").is_file():
        return path
    tmp = root / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    build_clip(tmp, STREETCLIP_VISION)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- running a step


def run_measured(name: str, cmd: list[str], log: Path, timeout: float, threads: int = 2) -> Step:
    """Run ``cmd`` from the repository root; its peak RSS from ``os.wait4`` (process + reaped children)."""
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": str(threads)}
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        killed = threading.Event()
        timer = threading.Timer(timeout, lambda: (killed.set(), os.killpg(proc.pid, signal.SIGKILL)))
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    rc = None if killed.is_set() else proc.returncode
    return Step(name, rc, time.monotonic() - t0, usage.ru_maxrss / 1e6, log)  # ru_maxrss is in KiB on Linux


def commands(paths: dict) -> dict[str, list[str]]:
    """The four CLI steps, in order."""
    py, shards = sys.executable, str(paths["shards"])
    common = [*TRAIN, f"model.backbone={paths['clip']}", f"train.cache_dir={paths['cache']}"]
    return {
        "shard": [py, "shard_dataset.py", "--data-root", str(paths["root"]), "--out", shards,
                  "--val-fraction", str(DATA["val_fraction"]), "--samples-per-shard", "1", "--workers", "1"],
        "train": [py, "train.py", "--shards", shards, "--output-dir", str(paths["run"]), *common],
        "train-ckpt": [py, "train.py", "--shards", shards, "--output-dir", str(paths["run_ckpt"]),
                       "--phase", "finetune", "--init-from", str(paths["run"] / "model"), *common,
                       "model.gradient_checkpointing=true"],
        "infer": [py, "infer.py", "--model", str(paths["run"] / "model"), "--shards", shards, "--out",
                  str(paths["submission"]), "--no-progress", "--batch-size", "4", "--num-workers", "1"],
    }  # fmt: skip


def pipeline(work: Path, clip: Path, timeout: float = 1800) -> dict:
    """Data -> shards -> train (ckpt off) -> train (ckpt on, phase 2 only) -> infer; paths and steps."""
    from geoloc.synth import generate_dataset

    work.mkdir(parents=True, exist_ok=True)
    root = generate_dataset(work / "data", DATA["n_train"], DATA["n_test"], DATA["seed"], DATA["num_states"])
    paths = {"root": root, "shards": work / "shards", "run": work / "run", "run_ckpt": work / "run_ckpt",
             "cache": work / "cache", "submission": work / "submission.csv", "clip": clip}  # fmt: skip
    steps = {}
    for name, cmd in commands(paths).items():
        steps[name] = run_measured(name, cmd, work / f"{name}.log", timeout)
        if steps[name].rc != 0:
            break  # the later steps need this one's output
    return {"paths": paths, "steps": steps}


# ----------------------------------------------------------------------------- report


def report(result: dict, build_s: float | None) -> str:
    lines = ["| step | rc | seconds | peak RSS (GB) |", "|---|---:|---:|---:|"]
    if build_s is not None:
        lines.append(f"| build the ViT-L checkpoint (once, cached) | 0 | {build_s:.0f} | - |")
    for s in result["steps"].values():
        lines.append(f"| {s.name} | {s.rc} | {s.seconds:.1f} | {s.peak_rss_gb:.2f} |")
    steps = result["steps"]
    if {"train", "train-ckpt"} <= steps.keys():
        diff = steps["train"].peak_rss_gb - steps["train-ckpt"].peak_rss_gb
        lines.append(
            f"\npeak RSS, checkpointing off - on, 1 sample (4 views) a fine-tune step: {diff:.2f} GB (fp32)"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--work-dir", type=Path, default=Path("/tmp/geoloc_real_size"), help="scratch (about 12 GB)"
    )
    p.add_argument("--keep", action="store_true", help="keep the work dir (checkpoints are 3.6 GB each)")
    args = p.parse_args(argv)
    shutil.rmtree(args.work_dir, ignore_errors=True)
    t0 = time.monotonic()
    existed = (
        Path(os.environ.get("GEOLOC_TEST_CACHE", "~/.cache/geoloc/test-vitl")).expanduser() / checkpoint_key()
    ).is_dir()
    clip = vitl_checkpoint()
    build_s = None if existed else time.monotonic() - t0
    result = pipeline(args.work_dir, clip)
    print(f"cpu: {os.cpu_count()} cores; checkpoint {clip}")
    print(report(result, build_s))
    if not args.keep:
        shutil.rmtree(args.work_dir, ignore_errors=True)
    return 0 if all(s.rc == 0 for s in result["steps"].values()) and len(result["steps"]) == 4 else 1


if __name__ == "__main__":
    sys.exit(main())
