"""Section 4 of ``bench/gpu_check.py``: real ``accelerate launch`` runs of train.py, then infer.py.

One GPU, bf16, with the shipped configs (``4xa100.yaml`` = DDP, ``4xa100_zero2.yaml`` = DeepSpeed ZeRO-2,
each with ``--num_processes 1``): a tiny CLIP for a few hundred optimiser updates, a StreetCLIP-shaped
ViT-L/14-336 (random weights, ``geoloc.tiny_clip.build_clip``) for a few, then ``infer.py`` on the ViT-L
model. These catch what only CUDA runs: pinned memory and non_blocking copies, autocast dtypes, NCCL
start-up (with one rank accelerate initialises the process group but wraps no DDP), the DeepSpeed engine
and its ops. Each row counts the updates logged in ``metrics.jsonl`` against the expected number and
checks the exported model; the infer row checks the submission's rows.

Dry mode: the tiny runs only, 1 + 1 epochs, on the CPU (DDP config with ``ACCELERATE_USE_CPU=1``, ZeRO-2
with ``DS_ACCELERATOR=cpu``); the ViT-L rows are skipped (tests/test_real_size.py runs ViT-L through the
CLIs on a CPU).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from gpu_common import guarded, run_group

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"ddp": "accelerate_configs/4xa100.yaml", "zero2": "accelerate_configs/4xa100_zero2.yaml"}
GPU_DATA = {"n_train": 96, "n_test": 16, "per_shard": 6}  # 72 train, 24 val after --val-fraction 0.25
DRY_DATA = {"n_train": 24, "n_test": 6, "per_shard": 3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(kind: str, on_gpu: bool) -> tuple[list[str], dict, tuple[str, ...]]:
    """accelerate launch prefix, extra environment and variables to drop, for ddp | zero2 | plain."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--main_process_port",
        str(free_port()),
        "--num_processes",
        "1",
    ]
    if kind == "plain":
        config = "accelerate_configs/1gpu.yaml" if on_gpu else "accelerate_configs/cpu.yaml"
        return cmd + ["--config_file", config], {}, ()
    cmd += ["--config_file", CONFIGS[kind]]
    if kind == "zero2":  # the JSON takes bf16 from the launcher (README); ACCELERATE_USE_CPU would drop DS
        return (
            cmd + ["--mixed_precision", "bf16"],
            {} if on_gpu else {"DS_ACCELERATOR": "cpu"},
            ("ACCELERATE_USE_CPU",),
        )
    return cmd, {} if on_gpu else {"ACCELERATE_USE_CPU": "1"}, ()


def run(
    cmd: list[str], extra: dict, drop: tuple[str, ...], timeout: float, log: Path
) -> tuple[int | None, float]:
    """Run from the repository root, output to ``log``; (return code or None on timeout, seconds)."""
    env = {k: v for k, v in {**os.environ, **extra}.items() if k not in drop}
    t0 = time.monotonic()
    with open(log, "w") as out:
        rc = run_group(cmd, timeout, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    return rc, time.monotonic() - t0


def failure(log: Path, rc) -> str:
    """The most telling line of a failed run's output; its last 80 lines go to gpu_check.log."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    print(f"----- {log.name} (last 80 lines) -----", *lines[-80:], sep="\n", flush=True)
    hits = [ln for ln in lines if "Error" in ln or "error:" in ln]
    last = (hits or lines or ["no output"])[-1][:300]
    return f"{'timed out' if rc is None else f'rc {rc}'}: {last} (log {log.name})"


# ----------------------------------------------------------------------------- data and backbones


def prepare(section) -> dict:
    """Generated data root -> shard_dataset.py (the CLI) -> shards; the tiny CLIP; paths in a dict."""
    from geoloc.synth import generate_dataset
    from geoloc.tiny_clip import build_tiny_clip

    work = section.work_dir / "launch"
    sizes = DRY_DATA if section.dry else GPU_DATA
    root = generate_dataset(
        work / "data", n_train=sizes["n_train"], n_test=sizes["n_test"], seed=0, num_states=6
    )
    shards = work / "shards"
    cmd = [
        sys.executable,
        "shard_dataset.py",
        "--data-root",
        str(root),
        "--out",
        str(shards),
        "--val-fraction",
        "0.25",
        "--samples-per-shard",
        str(sizes["per_shard"]),
        "--workers",
        "2",
    ]
    rc, _ = run(cmd, {}, (), 300, work / "shard.log")
    if rc != 0:
        raise RuntimeError(failure(work / "shard.log", rc))
    counts = {k: v["count"] for k, v in json.loads((shards / "manifest.json").read_text())["splits"].items()}
    return {"work": work, "shards": shards, "counts": counts, "tiny": build_tiny_clip(work / "tiny_clip")}


def streetclip_dir(work: Path) -> Path:
    from geoloc.tiny_clip import STREETCLIP_VISION, build_clip

    return build_clip(work / "vitl_clip", STREETCLIP_VISION)


# ----------------------------------------------------------------------------- train runs


def expected_updates(
    counts: dict, frozen_epochs: int, frozen_batch: int, ft_epochs: int, ft_batch: int
) -> int:
    """Updates of a one-rank run without accumulation (cached phase 1: ceil; phase 2: full batches)."""
    n = counts["train"]
    return frozen_epochs * max(1, math.ceil(n / frozen_batch)) + ft_epochs * (n // ft_batch)


def train_overrides(
    data: dict, backbone: Path, epochs: tuple[int, int], batches: tuple[int, int]
) -> list[str]:
    return [
        "--preset",
        "smoke",
        f"model.backbone={backbone}",
        f"train.cache_dir={data['work'] / 'cache'}",
        f"train.epochs_frozen={epochs[0]}",
        f"train.epochs_finetune={epochs[1]}",
        f"train.frozen_batch_size={batches[0]}",
        f"train.finetune_batch_size={batches[1]}",
        "train.finetune_grad_accum=1",
        "train.save_every_steps=100000",
        "train.keep_checkpoints=1",
        "train.patience=0",
        "data.num_workers=2",
    ]


def train_row(section, rid: str, kind: str, data: dict, backbone: Path, epochs, batches, cap: float) -> None:
    what = f"accelerate launch train.py, {CONFIGS[kind].split('/')[-1]} x 1 process, {backbone.name}"
    on_gpu = torch.cuda.is_available()
    out_dir = data["work"] / f"run_{rid}"
    prefix, extra, drop = launch(kind, on_gpu)
    cmd = prefix + [
        "train.py",
        "--shards",
        str(data["shards"]),
        "--output-dir",
        str(out_dir),
        *train_overrides(data, backbone, epochs, batches),
    ]
    rc, seconds = run(
        cmd, extra, drop, max(10.0, min(cap, section.remaining() - 5)), data["work"] / f"{rid}.log"
    )
    if rc != 0:
        section.error(rid, what, failure(data["work"] / f"{rid}.log", rc), "updates")
        return
    lines = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    updates = sum("train/loss" in r for r in lines)
    want = expected_updates(data["counts"], *[e for pair in zip(epochs, batches) for e in pair])
    best = max((r["val/score"] for r in lines if "val/score" in r), default=float("nan"))
    ran_as = exported_as(out_dir)
    status = (
        "ok"
        if updates == want and ran_as == expected_type(kind, on_gpu)
        else (
            f"error: {updates} updates logged (expected {want}), "
            f"ran as {ran_as} (expected {expected_type(kind, on_gpu)})"
        )
    )
    section.row(
        rid,
        what,
        updates,
        "updates",
        status=status,
        kind="launch",
        run_dir=str(out_dir),
        note=f"{seconds:.0f} s incl. start-up; {ran_as}; best val score {best:.3f}; "
        f"epochs {epochs[0]}+{epochs[1]}",
    )


def expected_type(kind: str, on_gpu: bool) -> str:
    return "DEEPSPEED" if kind == "zero2" else ("MULTI_GPU" if on_gpu else "MULTI_CPU")


def exported_as(run_dir: Path) -> str:
    """The accelerate distributed type the exported model was trained under, or why there is none."""
    meta = run_dir / "model" / "geoloc.json"
    if not meta.is_file():
        return "no exported model"
    return json.loads(meta.read_text())["extra"].get("distributed_type", "?").split(".")[-1]


def infer_row(section, rid: str, data: dict, run_id: str, cap: float) -> None:
    what = f"accelerate launch infer.py on the model of {run_id}"
    model = data["work"] / f"run_{run_id}" / "model"
    if not model.is_dir():
        section.skip(rid, what, f"no model from {run_id}", "rows")
        return
    out = data["work"] / f"submission_{run_id}.csv"
    prefix, extra, drop = launch("plain", torch.cuda.is_available())
    cmd = prefix + [
        "infer.py",
        "--model",
        str(model),
        "--shards",
        str(data["shards"]),
        "--out",
        str(out),
        "--no-progress",
    ]
    rc, seconds = run(
        cmd, extra, drop, max(10.0, min(cap, section.remaining() - 5)), data["work"] / f"{rid}.log"
    )
    if rc != 0:
        section.error(rid, what, failure(data["work"] / f"{rid}.log", rc), "rows")
        return
    rows = len(out.read_text().splitlines()) - 1
    want = data["counts"]["test"]
    status = "ok" if rows == want else f"error: {rows} rows, {want} test samples"
    section.row(
        rid, what, rows, "rows", status=status, note=f"{seconds:.0f} s incl. start-up; validated on write"
    )


# (row id, config, backbone, (frozen, fine-tune) epochs, (frozen, fine-tune) batch, time cap in seconds)
GPU_RUNS = (
    ("4a", "ddp", "tiny", (8, 8), (8, 4), 60),  # 72 + 144 = 216 updates
    ("4b", "zero2", "tiny", (4, 4), (8, 4), 60),  # 108 updates
    ("4c", "ddp", "vitl", (1, 1), (8, 8), 75),  # 9 + 9 updates
    ("4d", "zero2", "vitl", (1, 1), (8, 8), 75),
)
DRY_RUNS = (
    ("4a", "ddp", "tiny", (1, 1), (8, 4), 150),  # 3 + 4 updates
    ("4b", "zero2", "tiny", (1, 1), (8, 4), 240),  # DeepSpeed builds its CPU comm op on first use (~60 s)
)


def section_launch(section) -> None:
    data = guarded(section, "4", "data and tiny CLIP for the launches", prepare, section)
    if data is None:
        return
    backbones = {"tiny": data["tiny"]}
    if section.dry:
        for rid, kind in (("4c", "DDP"), ("4d", "ZeRO-2")):
            reason = "dry mode (ViT-L needs a GPU; tests/test_real_size.py runs it through the CLIs on a CPU)"
            section.skip(rid, f"accelerate launch train.py, {kind}, ViT-L/14-336", reason, "updates")
    else:
        backbones["vitl"] = guarded(
            section, "4c", "StreetCLIP-shaped checkpoint", streetclip_dir, data["work"]
        )
    for rid, kind, backbone, epochs, batches, cap in DRY_RUNS if section.dry else GPU_RUNS:
        if backbones[backbone] is not None:
            run = (section, rid, kind, data, backbones[backbone], epochs, batches, cap)
            guarded(section, rid, f"train.py {kind} {backbone}", train_row, *run)
    source = "4c" if backbones.get("vitl") is not None else "4a"
    guarded(section, "4e", "infer.py", infer_row, section, "4e", data, source, 90 if section.dry else 40)
