"""One prepared GPU check: every figure the project needs from one H100/H200, in one command, one table.

    python bench/gpu_check.py --out $OUT              # on the GPU machine: about 7.5 minutes
    python bench/gpu_check.py --dry --out /tmp/gc     # tiny CLIP, tiny sizes, any CPU: what CI runs

Sections, in this order (each a child process with its own time budget, so a crash, an OOM or a hang in
one becomes an error row and the rest still run; ``--budget`` caps the whole; time a section leaves
unused goes to the later ones):

  0 matmul    the ceiling: an 8192^3 bf16 matmul, TFLOP/s (random data, median of timed runs)
  1 finetune  ViT-L/14-336 fine-tune step (4 views a sample, bf16 autocast, SDPA attention, AdamW) with
              and without activation checkpointing: the largest batch that fits (searched upwards),
              images/s and MFU against (0) at that batch, the attention kernel used, and peak memory
              per sample (slope of the allocator's peak over the batches tried) with what that
              predicts for a 40 GB A100 and an 80 GB H100
  2 embed     the frozen phase's embedding pass (no_grad, bf16, on-device preprocessing): images/s
  3 infer     inference end to end from shards (``geoloc.predict.predict`` over ``make_eval_loader``)
              with N loader workers vs the CPU decode ceiling per core and the GPU compute ceiling;
              batched JPEG decoding on the GPU (torchvision ``decode_jpeg``): its ceiling, and a
              prototype loader that ships JPEG bytes and decodes them on the GPU, end to end
  4 launch    real ``accelerate launch`` of train.py on one GPU in bf16 with the DDP config and the
              ZeRO-2 config (tiny CLIP for a few hundred steps, ViT-L for a few), then infer.py: the
              CUDA-only paths (pinned memory, non_blocking copies, autocast dtypes, NCCL init,
              DeepSpeed engine)
  5 compile   (1) again under ``torch.compile`` (the encoder blocks by default, ``--compile-scope``)

then the goals (fine-tune >= 430 images/s per GPU, embedding and inference >= 1,500 images/s with at
most 8 loader workers, the phase-2 batch from measured memory). ``--out DIR`` gets ``gpu_check.md``
(the table), ``gpu_check.json`` (rows + machine) and ``gpu_check.log`` (every section's output).

Dry mode (``--dry``): the same code with the tiny CLIP, a few samples and CPU-sized budgets; what needs
CUDA (allocator peaks, GPU decoding) and what is too slow for CPU CI (inductor compile: dry compiles
with the ``eager`` backend, which still traces the model) prints ``skipped: reason`` instead.
Runs on torch 2.11 (the GPU machine) and 2.13 (CI). Needs webdataset (+ braceexpand), omegaconf
(+ antlr4) and, for the ZeRO-2 row, deepspeed (+ hjson, pydantic): ``bench/gpu_wheels.sh`` prepares
wheels for a machine without network; BENCHMARKS.md gives the device command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for _p in (str(BENCH), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

# name -> (module, function, budget seconds on a GPU, budget seconds in dry mode)
SECTIONS = {
    "matmul": ("gpu_measure", "section_matmul", 25, 30),
    "finetune": ("gpu_measure", "section_finetune", 85, 90),
    "embed": ("gpu_measure", "section_embed", 30, 45),
    "infer": ("gpu_infer", "section_infer", 80, 120),
    "launch": ("gpu_launch", "section_launch", 150, 300),
    "compile": ("gpu_measure", "section_compile", 90, 90),
}
DEFAULT_BUDGET_S = 460  # the ceiling is 8 minutes on one H100/H200
DRY_BUDGET_S = 600


# ----------------------------------------------------------------------------- child


def run_child(args) -> int:
    import importlib

    from gpu_common import Section, stop_groups_on_sigterm

    stop_groups_on_sigterm()
    module, func, _, _ = SECTIONS[args.section]
    section = Section(
        args.section,
        args.dry,
        Path(args.work_dir),
        Path(args.result),
        time.monotonic() + args.section_budget,
        json.loads(args.context),
        vars(args),
    )
    section.save()
    getattr(importlib.import_module(module), func)(section)
    return 0


# ----------------------------------------------------------------------------- parent


def section_budgets(names: list[str], dry: bool) -> dict[str, float]:
    return {n: SECTIONS[n][3 if dry else 2] for n in names}


def timeout_for(name: str, names: list[str], budgets: dict[str, float], remaining: float) -> float:
    """A section's time: its own budget, or more when earlier sections left time over (the later
    sections' budgets stay reserved); never more than what is left of the whole."""
    later = sum(budgets[n] for n in names[names.index(name) + 1 :])
    return min(remaining, max(budgets[name], remaining - later))


def child_command(args, name: str, result: Path, timeout: float, context: dict) -> list[str]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--section",
        name,
        "--result",
        str(result),
        "--section-budget",
        f"{timeout:.0f}",
        "--context",
        json.dumps(context),
        "--work-dir",
        str(args.work_dir),
        "--compile-scope",
        args.compile_scope,
    ]
    return cmd + (["--dry"] if args.dry else [])


def run_section(args, name: str, timeout: float, context: dict, log, grace: float = 15.0) -> dict:
    """The section's rows and provided values; a crash or timeout adds an error row.

    The child gets ``timeout`` as its deadline and its long loops check it; ``grace`` seconds later the
    parent kills its whole process group (launches included), keeping the rows saved so far.
    """
    from gpu_common import stop_group

    result = Path(args.work_dir) / f"result_{name}.json"
    result.unlink(missing_ok=True)
    log.write(f"\n===== section {name} (timeout {timeout:.0f} s) =====\n")
    log.flush()
    start = time.monotonic()
    proc = subprocess.Popen(
        child_command(args, name, result, timeout, context),
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        rc = proc.wait(timeout=timeout + grace)
    except subprocess.TimeoutExpired:
        stop_group(proc.pid, proc.wait)  # SIGTERM: the section stops its launches; then SIGKILL
        rc = None
    got = json.loads(result.read_text()) if result.is_file() else {"rows": [], "provides": {}}
    elapsed = time.monotonic() - start
    if rc is None:
        got["rows"].append(_failure_row(name, f"timed out after {elapsed:.0f} s (budget {timeout:.0f} s)"))
    elif rc != 0:
        got["rows"].append(_failure_row(name, f"section process exited with {rc} (see gpu_check.log)"))
    got["seconds"] = elapsed
    return got


def _failure_row(name: str, status: str) -> dict:
    return {
        "id": name,
        "what": f"section {name}",
        "value": None,
        "unit": "",
        "status": f"error: {status}",
        "note": "",
        "data": {},
    }


def machine_info(dry: bool) -> dict:
    import torch
    from train_step import cpu_name

    info = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "mode": "dry (tiny CLIP, CPU-sized)" if dry else "full",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "cpu": f"{cpu_name()}, {os.cpu_count()} cores visible",
        "gpu": "none",
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = (
            f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, "
            f"{p.multi_processor_count} SMs"
        )
    for pkg in ("transformers", "accelerate", "deepspeed", "webdataset", "torchvision"):
        info[pkg] = _version(pkg)
    return info


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "not installed"


def run_all(args) -> dict:
    names = [n for n in SECTIONS if not args.only or n in args.only]
    budgets = section_budgets(names, args.dry)
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    context, rows, seconds = {}, [], {}
    with open(Path(args.out) / "gpu_check.log", "w") as log:
        for name in names:
            remaining = deadline - time.monotonic()
            if remaining < 5:
                rows.append({**_failure_row(name, ""), "status": "skipped: total budget spent"})
                continue
            got = run_section(args, name, timeout_for(name, names, budgets, remaining), context, log)
            rows += got["rows"]
            context.update(got["provides"])
            seconds[name] = round(got["seconds"], 1)
            print(f"[gpu_check] {name}: {len(got['rows'])} rows in {got['seconds']:.0f} s", flush=True)
    from gpu_table import goal_rows

    rows += goal_rows(rows, context, args.dry)
    return {"machine": machine_info(args.dry), "rows": rows, "context": context, "seconds": seconds}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="tiny CLIP, tiny sizes (any CPU; what CI runs)")
    p.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.{md,json,log}")
    p.add_argument("--work-dir", default=None, help="scratch folder (default: OUT/../gpu_check_work)")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"seconds for the whole check (default {DEFAULT_BUDGET_S}; dry {DRY_BUDGET_S})",
    )
    p.add_argument("--only", nargs="+", choices=list(SECTIONS), help="run only these sections")
    p.add_argument(
        "--compile-scope",
        choices=("blocks", "backbone"),
        default="blocks",
        help="torch.compile each encoder block (fast to compile) or the whole backbone "
        "(what model.compile=true does)",
    )
    # child-process options (set by the parent)
    p.add_argument("--section", choices=list(SECTIONS), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--section-budget", type=float, default=60.0, help=argparse.SUPPRESS)
    p.add_argument("--context", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.budget = args.budget or (DRY_BUDGET_S if args.dry else DEFAULT_BUDGET_S)
    args.work_dir = args.work_dir or str(Path(args.out).resolve().parent / "gpu_check_work")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.section:
        return run_child(args)
    from gpu_table import write_outputs

    report = run_all(args)
    print(write_outputs(report, Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
