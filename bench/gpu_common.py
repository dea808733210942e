"""What every section of ``bench/gpu_check.py`` shares: the :class:`Section` it reports through, and
:func:`guarded`, which turns one failed measurement into an error row."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Section:
    """What a section's child process gets, and how it reports: ``row`` appends and saves at once."""

    name: str
    dry: bool
    work_dir: Path
    result_path: Path
    deadline: float  # time.monotonic() by which the section should be done
    context: dict  # what earlier sections provided (ceilings, batch sizes)
    args: dict  # the command-line options that matter to sections
    rows: list = field(default_factory=list)
    provides: dict = field(default_factory=dict)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def row(
        self, rid: str, what: str, value=None, unit: str = "", *, status: str = "ok", note: str = "", **data
    ) -> dict:
        r = {
            "id": rid,
            "what": what,
            "value": value,
            "unit": unit,
            "status": status,
            "note": note,
            "data": data,
        }
        self.rows.append(r)
        self.save()
        return r

    def skip(self, rid: str, what: str, reason: str, unit: str = "") -> dict:
        return self.row(rid, what, None, unit, status=f"skipped: {reason}")

    def error(self, rid: str, what: str, err: BaseException | str, unit: str = "") -> dict:
        text = (
            err
            if isinstance(err, str)
            else f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}"
        )
        return self.row(rid, what, None, unit, status=f"error: {text}")

    def provide(self, **values) -> None:
        self.provides.update(values)
        self.save()

    def save(self) -> None:
        tmp = self.result_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rows": self.rows, "provides": self.provides}, default=float))
        os.replace(tmp, self.result_path)


def guarded(section: Section, rid: str, what: str, fn, *a, **kw):
    """Run one measurement; any exception becomes an error row (the traceback goes to the log)."""
    try:
        return fn(*a, **kw)
    except Exception as err:  # noqa: BLE001 - one failed measurement must not end the section
        traceback.print_exc()
        section.error(rid, what, err)
        return None


# ----------------------------------------------------------------------------- process groups

_GROUPS: set[int] = set()  # process groups this process started and has not reaped yet


def run_group(cmd: list[str], timeout: float, **popen) -> int | None:
    """Run ``cmd`` in its own process group; its return code, or None when it ran past ``timeout``.

    On timeout the group gets SIGTERM first: ``accelerate launch`` (torch's elastic agent) then stops
    its ranks, which live in sessions of their own and would outlive a SIGKILL of the launcher.
    """
    proc = subprocess.Popen(cmd, start_new_session=True, **popen)
    _GROUPS.add(proc.pid)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(proc.pid, proc.wait)
        return None
    finally:
        _GROUPS.discard(proc.pid)


def stop_group(pgid: int, wait, grace: float = 10.0) -> None:
    """SIGTERM the group, SIGKILL it if still there after ``grace`` seconds; ``wait(timeout=)`` reaps."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        try:
            wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def stop_groups_on_sigterm() -> None:
    """A section told to stop (SIGTERM from gpu_check's parent) stops its launches first, then exits."""

    def handler(signum, frame):
        for pgid in list(_GROUPS):
            stop_group(pgid, lambda timeout: time.sleep(timeout), grace=5.0)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
