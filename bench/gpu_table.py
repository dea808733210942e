"""The table of ``bench/gpu_check.py``: ratios against the ceilings measured in the same run, the goal
rows, and the files written to ``--out`` (markdown, JSON)."""

from __future__ import annotations

import json
from pathlib import Path

GOAL_FINETUNE = 430.0  # images/s per GPU (~50% MFU at 1.15 TFLOP per training image)
GOAL_EMBED = 1500.0  # images/s per GPU: embedding pass, and inference end to end
GOAL_WORKERS = 8  # loader workers (CPU cores) per GPU allowed for the inference goal
COLUMNS = ("id", "measurement", "result", "vs ceiling / goal", "status", "notes")


def _ok(rows: list[dict], kind: str) -> list[dict]:
    return [
        r for r in rows if r["status"] == "ok" and r["data"].get("kind") == kind and r["value"] is not None
    ]


def mfu(row: dict, context: dict) -> str:
    """Model FLOP/s of the row over the matmul ceiling measured in the same run (same device)."""
    ceiling, datasheet = context.get("ceiling_tflops"), context.get("datasheet_tflops")
    tflops = row["data"].get("tflops")
    if not ceiling or tflops is None:
        return ""
    text = f"MFU {tflops / ceiling:.1%} ({tflops:.3g} of {ceiling:.3g} TFLOP/s measured)"
    return text + (f", {tflops / datasheet:.1%} of the datasheet's {datasheet:.0f}" if datasheet else "")


def versus(row: dict, context: dict) -> str:
    """The row's own ratio text (set by its section) or its MFU."""
    return row["data"].get("versus") or mfu(row, context)


def _best(rows: list[dict], kind: str, keep=lambda r: True) -> dict | None:
    return max((r for r in _ok(rows, kind) if keep(r)), key=lambda r: r["value"], default=None)


def goal_row(rid: str, what: str, best: dict | None, goal: float, context: dict, dry: bool) -> dict:
    row = {"id": rid, "what": what, "value": None, "unit": "images/s", "note": "", "data": {}}
    if best is None:
        return {**row, "status": "error: no measurement to judge (see the rows above)"}
    met = best["value"] >= goal
    verdict = "met" if met else f"missed by {1 - best['value'] / goal:.0%}"
    note = f"best: row {best['id']}; " + ("dry mode: tiny CLIP on CPU, not a verdict" if dry else verdict)
    return {
        **row,
        "value": best["value"],
        "status": "ok",
        "note": note,
        "data": {
            "versus": f"{best['value'] / goal:.2f} x goal {goal:.0f}; {mfu(best, context)}".rstrip("; "),
            "goal_met": met,
        },
    }


def batch_goal_row(rows: list[dict], dry: bool) -> dict:
    """Phase-2 default batch against the measured memory line (activation checkpointing off)."""
    from geoloc.config import TrainConfig

    t = TrainConfig()
    row = {
        "id": "G4",
        "what": f"phase-2 default {t.finetune_batch_size} x {t.finetune_grad_accum} from measured memory",
        "value": None,
        "unit": "GB/sample",
        "note": "",
        "data": {},
    }
    mem = [r for r in _ok(rows, "memory") if not r["data"].get("checkpointing")]
    if not mem:
        reason = "needs the CUDA allocator (row 1am)" if dry else "no memory line measured (row 1am)"
        return {**row, "status": f"skipped: {reason}"}
    m = mem[0]
    fits = {
        card: cards_fit(m["value"], m["data"]["static_gb"], gb)
        for card, gb in (("A100 40GB", 40), ("H100 80GB", 80))
    }
    verdict = ", ".join(
        f"{card}: {t.finetune_batch_size} {'fits' if n >= t.finetune_batch_size else 'does NOT fit'} "
        f"(max {n})"
        for card, n in fits.items()
    )
    return {
        **row,
        "value": m["value"],
        "status": "ok",
        "note": m["note"],
        "data": {"versus": verdict, "fits": fits},
    }


def cards_fit(gb_per_sample: float, static_gb: float, card_gb: float, headroom: float = 0.1) -> int:
    """Places per forward that fit a card of ``card_gb`` with ``headroom`` of it kept free."""
    return max(int((card_gb * (1 - headroom) - static_gb) // gb_per_sample), 0)


def goal_rows(rows: list[dict], context: dict, dry: bool) -> list[dict]:
    e2e = _best(rows, "e2e", lambda r: r["data"].get("workers", 99) <= GOAL_WORKERS)
    return [
        goal_row(
            "G1",
            f"goal: fine-tune >= {GOAL_FINETUNE:.0f} images/s per GPU",
            _best(rows, "finetune"),
            GOAL_FINETUNE,
            context,
            dry,
        ),
        goal_row(
            "G2",
            f"goal: embedding pass >= {GOAL_EMBED:.0f} images/s",
            _best(rows, "embed"),
            GOAL_EMBED,
            context,
            dry,
        ),
        goal_row(
            "G3",
            f"goal: inference end to end >= {GOAL_EMBED:.0f} images/s, <= {GOAL_WORKERS} workers",
            e2e,
            GOAL_EMBED,
            context,
            dry,
        ),
        batch_goal_row(rows, dry),
    ]


# ----------------------------------------------------------------------------- output


def _cell(text) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def result_text(row: dict) -> str:
    value = row["value"]
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f} {row['unit']}" if abs(value) >= 10 else f"{value:.3g} {row['unit']}"
    return f"{value} {row['unit']}"


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"## GPU check, {m['date']}", ""]
    lines += [f"- {k}: {_cell(v)}" for k, v in m.items() if k != "date"]
    lines += [f"- section seconds: {report['seconds']}", ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in report["rows"]:
        cells = (r["id"], r["what"], result_text(r), versus(r, report["context"]), r["status"], r["note"])
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(report: dict, out: Path) -> str:
    """Write gpu_check.md and gpu_check.json to ``out``; returns the markdown (printed last)."""
    text = markdown(report)
    (out / "gpu_check.md").write_text(text)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=float))
    return text
