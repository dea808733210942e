"""Crash-safe training checkpoints on top of ``accelerator.save_state`` / ``load_state``.

Layout: ``RUN/checkpoints/<tag>/`` holds what ``save_state`` writes (weights, optimiser, scheduler and
registered objects, one RNG file per rank; DeepSpeed's own sharded files under DeepSpeed) plus
``trainer_state.json``: ``{"seq": int, "tag": str, "saved_at": iso time, "state": <trainer's dict>}``.

Atomicity: everything is written into ``<tag>.tmp`` and the main process renames it to ``<tag>`` only after
``trainer_state.json`` is complete, so the rename is the commit point. A crash at any earlier moment leaves
a ``.tmp`` directory, which never counts as a checkpoint, and the previous checkpoints untouched.

Order: ``seq`` (one more than the highest existing one) gives the creation order used by :meth:`latest`
and pruning; modification times are not used (copies and clock skew change them).

Collectives: every rank must call :meth:`save` and :meth:`load` (under DeepSpeed ``save_checkpoint`` is a
collective and hangs if only rank 0 calls it). ``RUN`` must be on a filesystem all ranks share.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path

from accelerate.utils import broadcast_object_list

STATE_FILE = "trainer_state.json"
_TAG = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")


def _read_meta(ckpt_dir: Path) -> dict | None:
    """The ``trainer_state.json`` wrapper of a finished checkpoint, or None (warned if unreadable)."""
    path = ckpt_dir / STATE_FILE
    if ckpt_dir.name.endswith(".tmp") or not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
        int(meta["seq"])
        return meta
    except (ValueError, KeyError, TypeError) as err:
        warnings.warn(f"ignoring checkpoint {ckpt_dir}: unreadable {STATE_FILE} ({err})", stacklevel=2)
        return None


def _finished(ckpt_root: Path) -> list[tuple[int, Path]]:
    """``(seq, dir)`` of every finished checkpoint under ``ckpt_root``, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [(meta["seq"], d) for d in ckpt_root.iterdir() if d.is_dir() and (meta := _read_meta(d))]
    return sorted(found)


def _write_json(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename commits the checkpoint


class CheckpointManager:
    """Saves to ``run_dir/checkpoints/<tag>``, keeps the newest ``keep``, finds and loads the latest."""

    def __init__(self, run_dir: str | Path, accelerator, keep: int):
        if keep < 1:
            raise ValueError(f"keep={keep}: must keep at least one checkpoint")
        if accelerator.project_configuration.automatic_checkpoint_naming:
            raise ValueError(
                "CheckpointManager names checkpoints itself: turn off automatic_checkpoint_naming"
            )
        self.dir = Path(run_dir) / "checkpoints"
        self.accelerator = accelerator
        self.keep = keep

    def save(self, tag: str, state: dict) -> Path:
        """Write a checkpoint of everything ``accelerator`` tracks plus ``state`` (JSON); all ranks call."""
        if not _TAG.match(tag) or tag.endswith(".tmp"):
            raise ValueError(
                f"checkpoint tag {tag!r}: use letters, digits, '_', '-', '.', not ending in .tmp"
            )
        try:
            json.dumps(state)  # checked on every rank, so a bad state fails everywhere, not a hang
        except (TypeError, ValueError) as err:
            raise ValueError(f"checkpoint {tag}: trainer state is not JSON-serialisable: {err}") from None
        acc, final, tmp = self.accelerator, self.dir / tag, self.dir / f"{tag}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed save of the same tag
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()  # every rank's files are in tmp before it is committed
        if acc.is_main_process:
            self._commit(tag, state, tmp, final)
            self._prune()
        acc.wait_for_everyone()
        return final

    def _commit(self, tag: str, state: dict, tmp: Path, final: Path) -> None:
        seq = max((seq for seq, _ in _finished(self.dir)), default=0) + 1
        saved_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        meta = {"seq": seq, "tag": tag, "saved_at": saved_at, "state": state}
        _write_json(tmp / STATE_FILE, json.dumps(meta, indent=2))
        if final.exists():  # re-saving a tag: move the old one aside (as .tmp, so it never counts)
            old = final.with_name(f"{tag}.old.tmp")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)

    def _prune(self) -> None:
        """Drop all but the newest ``keep`` finished checkpoints, and unfinished ``.tmp`` dirs."""
        for _, old in _finished(self.dir)[: -self.keep]:
            shutil.rmtree(old)
        for unfinished in self.dir.glob("*.tmp"):  # no save is running: every rank passed the barrier
            shutil.rmtree(unfinished, ignore_errors=True)

    def latest(self) -> Path | None:
        """The newest finished checkpoint (``.tmp`` dirs and dirs without trainer state ignored), or None."""
        found = _finished(self.dir)
        return found[-1][1] if found else None

    def resolve(self, path_or_latest: str | Path) -> Path:
        """``"latest"``, a checkpoint dir, or a tag under ``RUN/checkpoints`` -> a finished checkpoint dir."""
        if str(path_or_latest) == "latest":
            found = self.latest()
            if found is None:
                raise FileNotFoundError(
                    f"--resume latest: no finished checkpoint in {self.dir} "
                    "(directories ending in .tmp are interrupted saves and never count)"
                )
            return found
        path = Path(path_or_latest)
        if not path.exists() and (self.dir / path).exists():
            path = self.dir / path
        if _read_meta(path) is None:
            raise FileNotFoundError(
                f"--resume {path_or_latest}: {path} is not a finished checkpoint (no {STATE_FILE})"
            )
        return path

    def load(self, path_or_latest: str | Path = "latest") -> dict:
        """Restore everything ``accelerator`` tracks from a checkpoint; return its trainer state. All ranks call.

        The main process picks the directory and broadcasts it, so every rank loads the same one.
        """
        choice = [None]
        if self.accelerator.is_main_process:
            try:
                choice = [str(self.resolve(path_or_latest))]
            except FileNotFoundError as err:
                choice = [err]
        broadcast_object_list(choice)
        if isinstance(choice[0], Exception):
            raise choice[0]
        path = Path(choice[0])
        self.accelerator.load_state(str(path))
        return json.loads((path / STATE_FILE).read_text())["state"]
