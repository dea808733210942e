"""A tqdm bar on the main process only, with loss, lr and samples/s in its postfix."""

from __future__ import annotations

import time

from tqdm.auto import tqdm


def progress_bar(total: int | None, accelerator, desc: str) -> tqdm:
    """A bar shown by the main process; other ranks get a disabled bar with the same interface."""
    return tqdm(total=total, desc=desc, disable=not accelerator.is_main_process, dynamic_ncols=True)


def postfix(loss: float, lr: float, samples_per_s: float) -> dict[str, str]:
    """Short strings for ``bar.set_postfix``: 4 significant digits of loss, lr in e-notation."""
    return {"loss": f"{loss:.4g}", "lr": f"{lr:.2e}", "samples/s": f"{samples_per_s:.1f}"}


class Throughput:
    """Samples per second since the last :meth:`rate` call (so the bar shows the recent speed)."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.start = clock()
        self.samples = 0

    def add(self, n: int) -> None:
        self.samples += n

    def rate(self) -> float:
        now = self.clock()
        rate = self.samples / max(now - self.start, 1e-9)
        self.start, self.samples = now, 0
        return rate
