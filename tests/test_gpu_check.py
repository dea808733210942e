"""bench/gpu_check.py: the prepared GPU check runs in its dry mode on a CPU and prints the whole table.

The dry run (tiny CLIP, tiny sizes) goes through every section's code; rows that need CUDA or are too
slow for a CPU must say ``skipped: <reason>``, every other row must carry a number, and no row may be
an error. The pure helpers (time budgets, the memory line, isolation of failures) are tested directly.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_check
from gpu_common import Section, guarded
from gpu_measure import linear_fit
from gpu_table import COLUMNS, goal_rows

ENV = {
    "DS_ACCELERATOR": "cpu",
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
# measured on a CPU: a number each
NUMBERS = {
    "0",
    "1a",
    "1b",
    "2a",
    "2b",
    "3a",
    "3b",
    "3c-1",
    "3c-2",
    "4a",
    "4b",
    "4e",
    "5a",
    "5b",
    "G1",
    "G2",
    "G3",
}
# need CUDA (allocator peaks, GPU JPEG decoding) or a GPU-sized model: skipped with a reason
SKIPPED = {"1am", "1bm", "5am", "5bm", "3d", "3e-1", "4c", "4d", "G4"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    cmd = [
        sys.executable,
        "bench/gpu_check.py",
        "--dry",
        "--out",
        str(out / "out"),
        "--work-dir",
        str(out / "work"),
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=900, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, out / "out"


def test_dry_run_prints_one_table_with_every_row_measured_or_skipped_with_a_reason(dry_run):
    proc, out = dry_run
    report = json.loads((out / "gpu_check.json").read_text())
    rows = {r["id"]: r for r in report["rows"]}
    assert set(rows) == NUMBERS | SKIPPED, sorted(set(rows) ^ (NUMBERS | SKIPPED))
    for rid in NUMBERS:
        assert rows[rid]["status"] == "ok", (rid, rows[rid])
        assert isinstance(rows[rid]["value"], (int, float)) and rows[rid]["value"] > 0, (rid, rows[rid])
    for rid in SKIPPED:
        status = rows[rid]["status"]
        assert status.startswith("skipped: ") and len(status) > len("skipped: ") + 5, (rid, status)
        assert rows[rid]["value"] is None
    # the table is printed last, and written as markdown: a header and one line per row
    table = (out / "gpu_check.md").read_text()
    assert proc.stdout.rstrip().endswith(table.rstrip())
    assert "| " + " | ".join(COLUMNS) + " |" in table
    assert sum(
        line.startswith(("| G", "| 0", "| 1", "| 2", "| 3", "| 4", "| 5")) for line in table.splitlines()
    ) == len(rows)
    for key in ("date", "command", "gpu", "torch", "cuda", "cpu", "python"):
        assert report["machine"][key], key
    assert (out / "gpu_check.log").stat().st_size > 0


def test_dry_run_launches_ddp_and_zero2_and_infers(dry_run):
    _, out = dry_run
    rows = {r["id"]: r for r in json.loads((out / "gpu_check.json").read_text())["rows"]}
    assert "MULTI_CPU" in rows["4a"]["note"] and "DEEPSPEED" in rows["4b"]["note"]
    assert rows["4a"]["value"] == rows["4b"]["value"] == 7  # 18 train samples: 3 cached + 4 fine-tune updates
    assert rows["4e"]["value"] == 6  # every test sample in the submission
    # MFU is computed against the matmul ceiling measured in the same run
    assert rows["1a"]["data"]["tflops"] > 0
    line = next(x for x in (out / "gpu_check.md").read_text().splitlines() if x.startswith("| 1a |"))
    assert "MFU" in line


def test_timeout_for_keeps_later_budgets_and_passes_unused_time_on():
    names = ["a", "b", "c"]
    budgets = {"a": 10, "b": 20, "c": 30}
    assert gpu_check.timeout_for("a", names, budgets, remaining=60) == 10  # exactly the plan
    assert gpu_check.timeout_for("b", names, budgets, remaining=58) == 28  # a finished 8 s early
    assert gpu_check.timeout_for("c", names, budgets, remaining=12) == 12  # never past the whole budget


def test_linear_fit_recovers_memory_per_sample_and_static_part():
    points = [(n, 5_000 + 700 * n) for n in (4, 8, 16)]
    slope, intercept = linear_fit(points)
    assert slope == pytest.approx(700) and intercept == pytest.approx(5_000)
    assert linear_fit(points[:1]) is None


def _section(tmp_path) -> Section:
    return Section("x", True, tmp_path, tmp_path / "result.json", 0.0, {}, {})


def test_a_failed_measurement_is_an_error_row_and_the_section_goes_on(tmp_path):
    section = _section(tmp_path)

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access\nmore lines")

    assert guarded(section, "9", "broken", broken) is None
    section.row("10", "next", 1.5, "images/s")
    saved = json.loads((tmp_path / "result.json").read_text())["rows"]
    assert [r["id"] for r in saved] == ["9", "10"]
    assert saved[0]["status"] == "error: RuntimeError: CUDA error: an illegal memory access"


@pytest.mark.parametrize("case", ["timeout", "crash"])
def test_a_section_that_hangs_or_crashes_becomes_an_error_row(tmp_path, case):
    args = gpu_check.parse_args(["--dry", "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path)])
    with open(tmp_path / "log", "w") as log:
        if case == "timeout":  # killed (with its process group) long before it could import torch
            got = gpu_check.run_section(args, "matmul", 0.2, {}, log, grace=0.0)
        else:  # the child cannot even start: a bad argument
            args.compile_scope = "nonsense"
            got = gpu_check.run_section(args, "matmul", 60, {}, log)
    (row,) = got["rows"]
    assert row["status"].startswith(
        "error: " + ("timed out" if case == "timeout" else "section process exited")
    )


def test_goal_rows_judge_the_best_measurement_against_the_goal():
    rows = [
        {"id": "1a", "status": "ok", "value": 400.0, "data": {"kind": "finetune", "tflops": 460.0}},
        {"id": "5a", "status": "ok", "value": 500.0, "data": {"kind": "finetune", "tflops": 575.0}},
        {"id": "3c-15", "status": "ok", "value": 2000.0, "data": {"kind": "e2e", "workers": 15}},
        {"id": "3c-8", "status": "ok", "value": 1200.0, "data": {"kind": "e2e", "workers": 8}},
    ]
    g1, g2, g3, g4 = goal_rows(rows, {"ceiling_tflops": 800.0}, dry=False)
    assert g1["value"] == 500.0 and g1["data"]["goal_met"] and "MFU 71.9%" in g1["data"]["versus"]
    assert g2["status"].startswith("error: no measurement")
    assert g3["value"] == 1200.0 and not g3["data"]["goal_met"] and "missed by 20%" in g3["note"]
    assert g4["status"].startswith("skipped: ")


# ----------------------------------------------------------------------------- GPU-only paths, faked


def test_batch_search_stops_at_the_first_size_that_does_not_fit(monkeypatch):
    import gpu_measure

    peaks = {4: 10e9, 8: 20e9, 16: None, 32: 80e9}  # 16 samples run out of memory
    monkeypatch.setattr(gpu_measure, "try_batch", lambda model, opt, arch, n, device: peaks[n])
    fits = gpu_measure.search_batch(None, None, "tiny", None, (4, 8, 16, 32), deadline=float("inf"))
    assert fits == [(4, 10e9), (8, 20e9)]


def test_timing_falls_back_to_a_smaller_batch_when_the_largest_runs_out_of_memory(monkeypatch):
    import gpu_measure

    class Opt:
        def zero_grad(self, set_to_none):
            pass

    def time_steps(model, opt, arch, n, device, seconds):
        if n == 8:
            raise gpu_measure.OOM("CUDA out of memory")
        return 0.5

    monkeypatch.setattr(gpu_measure, "time_steps", time_steps)
    monkeypatch.setattr(gpu_measure, "free", lambda device: None)
    assert gpu_measure.timed_largest(None, Opt(), "tiny", [4, 8], None, 1.0) == (4, 0.5)


def test_memory_row_turns_allocator_peaks_into_gb_per_sample_and_card_fits(tmp_path):
    import torch
    from gpu_measure import memory_row

    section = _section(tmp_path)
    fits = [(4, 6.7e9 + 4 * 2.75e9), (8, 6.7e9 + 8 * 2.75e9), (16, 6.7e9 + 16 * 2.75e9)]
    memory_row(
        section,
        "1am",
        "fine-tune step, vit, activation checkpointing off, eager",
        fits,
        torch.device("cuda"),
        False,
    )
    (row,) = section.rows
    assert row["value"] == pytest.approx(2.75) and row["data"]["static_gb"] == pytest.approx(6.7)
    assert "A100 40GB: 10 samples" in row["note"] and "H100 80GB: 23 samples" in row["note"]
    (g4,) = [g for g in goal_rows(section.rows, {}, dry=False) if g["id"] == "G4"]
    assert g4["status"] == "ok" and g4["value"] == pytest.approx(2.75) and "A100 40GB: 10" in g4["note"]
    assert g4["data"]["fits"] == {"A100 40GB": 10, "H100 80GB": 23}
    assert "A100 40GB: 8 fits (max 10)" in g4["data"]["versus"]


# ----------------------------------------------------------------------------- stopping launches


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for our purpose
        return f.read().split(")")[-1].split()[0] != "Z"


AGENT = """
import signal, subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
open(sys.argv[1], "w").write(str(worker.pid))
signal.signal(signal.SIGTERM, lambda *a: (worker.terminate(), worker.wait(), sys.exit(0)))
time.sleep(60)
"""


def test_a_launch_past_its_time_stops_its_ranks_too(tmp_path):
    """Like accelerate's elastic agent, the fake launcher's worker lives in its own session: only a
    SIGTERM to the launcher (before any SIGKILL) takes it down."""
    from gpu_common import run_group

    pid_file = tmp_path / "worker.pid"
    assert run_group([sys.executable, "-c", AGENT, str(pid_file)], timeout=3) is None
    assert not _alive(int(pid_file.read_text()))


def test_a_stopped_section_stops_its_running_launch(tmp_path):
    import signal
    import time

    pid_file = tmp_path / "worker.pid"
    section = (
        "import sys; sys.path.insert(0, 'bench'); from gpu_common import run_group, stop_groups_on_sigterm; "
        f"stop_groups_on_sigterm(); run_group([sys.executable, '-c', {AGENT!r}, {str(pid_file)!r}], timeout=60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", section], cwd=REPO)
    for _ in range(100):
        if pid_file.is_file() and pid_file.read_text():
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert not _alive(int(pid_file.read_text()))
