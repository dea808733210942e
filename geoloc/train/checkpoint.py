"""Crash-safe training checkpoints that never unpickle arbitrary objects.

Layout of ``RUN/checkpoints/<tag>/``:

- ``trainer_state.json``: ``{"seq", "tag", "saved_at", "state": <trainer's dict>, "run": <what the run
  was: config, labels, shards, world size>, "scheduler": <its state dict>, "ema": {decay, num_updates},
  "stateful": {name: <JSON state of a registered object, e.g. the loss's bandit>},
  "files": {relative path: [size, sha256]}}`` (plain JSON);
- ``rng-rank<R>.safetensors``: each rank's RNG states (torch CPU/CUDA as tensors, python and numpy as JSON
  in the metadata);
- without DeepSpeed: ``model.safetensors`` (the prepared module's weights) and ``optimizer.pt`` (the
  optimiser's state dict: tensors, numbers, strings; read back with ``torch.load(weights_only=True)``);
  ``ema.safetensors`` when EMA is on;
- under DeepSpeed: ``pytorch_model/`` as the engine writes it (every rank its partitions). Its ``.pt``
  files are pickles: before the engine reads them, each is opened with ``weights_only=True`` and only
  the three DeepSpeed classes its checkpoints hold are allowed, so a planted pickle is refused naming
  the file and the global, and nothing in it runs.

Atomicity: everything is written into ``<tag>.tmp``; the main process renames it to ``<tag>`` after
``trainer_state.json`` (with the size and hash of every file) is on disk, so the rename is the commit
point. A ``.tmp`` directory never counts, and a finished-looking one whose files are missing or of
another size is skipped by :meth:`CheckpointManager.latest` (warned) and refused by ``load`` (a hash
mismatch too).

Order: ``seq`` (one more than the highest existing one) gives the creation order used by ``latest`` and
pruning; modification times are not used (copies and clock skew change them).

Collectives: every rank must call :meth:`save` and :meth:`load` (under DeepSpeed saving is a collective).
``RUN`` must be on a filesystem all ranks share.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from geoloc.distributed import eval_module
from geoloc.errors import CheckpointError
from geoloc.fileio import file_sha256

STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
EMA_FILE = "ema.safetensors"
ENGINE_DIR = "pytorch_model"  # DeepSpeed's checkpoint (tag) folder, as accelerate names it
RNG_FILE = "rng-rank{rank}.safetensors"
_TAG = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")


def _deepspeed_globals() -> list:
    """The classes DeepSpeed's own checkpoint pickles hold (ZeRO stage enum, loss scaler, fragment
    addresses); everything else a pickle names is refused."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


# ----------------------------------------------------------------------------- files


def _file_table(folder: Path) -> dict[str, list]:
    """``{relative path: [size, sha256]}`` of every file under ``folder`` except the state file."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != STATE_FILE)
    return {str(p.relative_to(folder)): [p.stat().st_size, file_sha256(p)] for p in files}


def damaged_files(folder: Path, table: dict, hashes: bool) -> list[str]:
    """Files of ``table`` missing from ``folder`` or of another size (and, with ``hashes``, content)."""
    bad = []
    for rel, (size, digest) in table.items():
        path = folder / rel
        if not path.is_file() or path.stat().st_size != size or (hashes and file_sha256(path) != digest):
            bad.append(rel)
    return bad


def _write_json(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename commits the checkpoint


def load_weights_only(path: Path, allowed: list = (), **kw):
    """``torch.load`` that unpickles only tensors, containers, numbers, strings and ``allowed`` classes.

    Anything else (a planted ``os.system`` reduce, any class) is refused naming the file and the global.
    """
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True, **kw)
    except Exception as err:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointError(
            f"{path}: refused to load (not a plain tensor checkpoint): {_why(err)}"
        ) from None


def _why(err: Exception) -> str:
    """The telling line of a failed weights-only load (torch puts ``Unsupported global: ...`` deep inside)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    telling = [line for line in lines if "global" in line.lower() or "WeightsUnpickler" in line]
    return (telling or lines or [type(err).__name__])[0]


# ----------------------------------------------------------------------------- RNG


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's RNG states as safetensors tensors + metadata (python and numpy as JSON)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    meta = {
        "python": json.dumps(random.getstate()),
        "numpy": json.dumps([kind, keys.tolist(), pos, has_gauss, gauss]),
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    version, internal, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda{i}"] for i in range(len(tensors) - 1)]  # keys torch, cuda0, cuda1, ...
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# ----------------------------------------------------------------------------- the manager


def _read_meta(ckpt_dir: Path) -> dict | None:
    """The ``trainer_state.json`` of a finished checkpoint, or None (warned if unreadable)."""
    path = ckpt_dir / STATE_FILE
    if ckpt_dir.name.endswith(".tmp") or not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
        int(meta["seq"])
        dict(meta["files"])
        return meta
    except (ValueError, KeyError, TypeError) as err:
        warnings.warn(f"ignoring checkpoint {ckpt_dir}: unreadable {STATE_FILE} ({err!r})", stacklevel=2)
        return None


def _finished(ckpt_root: Path) -> list[tuple[int, Path]]:
    """``(seq, dir)`` of every finished checkpoint under ``ckpt_root``, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [(meta["seq"], d) for d in ckpt_root.iterdir() if d.is_dir() and (meta := _read_meta(d))]
    return sorted(found)


class CheckpointManager:
    """Saves to ``run_dir/checkpoints/<tag>``, keeps the newest ``keep``, finds and loads the latest.

    ``run_info`` (JSON) describes the run (config, labels, shards, world size); it is saved with every
    checkpoint so that a resume can check it continues the same run (:mod:`geoloc.train.resume`).
    ``stateful``: objects with a JSON ``state_dict()`` / ``load_state_dict()`` (the same on every rank,
    e.g. the criterion) saved with every checkpoint and restored on load.
    """

    def __init__(
        self, run_dir: str | Path, accelerator, keep: int, run_info: dict | None = None, stateful=None
    ):
        if keep < 1:
            raise ValueError(f"keep={keep}: must keep at least one checkpoint")
        self.dir = Path(run_dir) / "checkpoints"
        self.accelerator = accelerator
        self.keep = keep
        self.run_info = run_info or {}
        self.stateful = dict(stateful or {})

    @property
    def deepspeed(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.DEEPSPEED

    # ------------------------------------------------------------------ saving

    def save(self, tag: str, state: dict, parts) -> Path:
        """Write ``parts`` (``.model``, ``.optimizer``, ``.scheduler``, ``.ema`` as prepared) and ``state``
        (JSON) as checkpoint ``tag``; every rank calls."""
        if not _TAG.match(tag) or tag.endswith(".tmp"):
            raise ValueError(
                f"checkpoint tag {tag!r}: use letters, digits, '_', '-', '.', not ending in .tmp"
            )
        extra = {name: obj.state_dict() for name, obj in self.stateful.items()}
        try:
            json.dumps([state, extra])  # checked on every rank, so a bad state fails everywhere, not a hang
        except (TypeError, ValueError) as err:
            raise ValueError(f"checkpoint {tag}: trainer state is not JSON-serialisable: {err}") from None
        acc, final, tmp = self.accelerator, self.dir / tag, self.dir / f"{tag}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed save of the same tag
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        self._write_parts(tmp, parts)
        acc.wait_for_everyone()  # every rank's files are in tmp before it is committed
        if acc.is_main_process:
            self._commit(tag, {"state": state, "stateful": extra}, parts, tmp, final)
            self._prune()
        acc.wait_for_everyone()
        return final

    def _write_parts(self, folder: Path, parts) -> None:
        from safetensors.torch import save_file

        from geoloc.faults import fault_point

        acc = self.accelerator
        tensors, meta = rng_state()
        save_file(tensors, folder / RNG_FILE.format(rank=acc.process_index), metadata=meta)
        if self.deepspeed:  # a collective: each rank writes its partitions
            parts.model.save_checkpoint(str(folder), ENGINE_DIR, save_latest=False)
        elif acc.is_main_process:
            weights = eval_module(parts.model).state_dict()
            save_file(
                {k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}, folder / MODEL_FILE
            )
            torch.save(parts.optimizer.state_dict(), folder / OPTIMIZER_FILE)
        if parts.ema is not None and acc.is_main_process:
            save_file({k: v.contiguous() for k, v in parts.ema.shadow.items()}, folder / EMA_FILE)
        fault_point("checkpoint.written")

    def _commit(self, tag: str, states: dict, parts, tmp: Path, final: Path) -> None:
        seq = max((seq for seq, _ in _finished(self.dir)), default=0) + 1
        ema = parts.ema
        meta = {
            "seq": seq, "tag": tag, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "state": states["state"], "run": self.run_info, "scheduler": parts.scheduler.state_dict(),
            "stateful": states["stateful"],
            "ema": None if ema is None else {"decay": ema.decay, "num_updates": ema.num_updates},
            "files": _file_table(tmp),
        }  # fmt: skip
        _write_json(tmp / STATE_FILE, json.dumps(meta, indent=1))
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

    # ------------------------------------------------------------------ finding

    def latest(self) -> Path | None:
        """The newest finished checkpoint whose files are all there with their recorded sizes, or None.

        ``.tmp`` dirs never count; a damaged one (a partial copy, a truncated file) is skipped with a
        warning, so an older complete one is used.
        """
        for _, path in reversed(_finished(self.dir)):
            bad = damaged_files(path, _read_meta(path)["files"], hashes=False)
            if not bad:
                return path
            warnings.warn(f"skipping damaged checkpoint {path}: missing or resized {bad[:5]}", stacklevel=2)
        return None

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

    def verify(self, path: Path) -> dict:
        """The checkpoint's meta after checking every file's size and hash and (DeepSpeed) its pickles."""
        meta = _read_meta(path)
        bad = damaged_files(path, meta["files"], hashes=True)
        if bad:
            raise CheckpointError(
                f"{path}: files missing or changed since the checkpoint was written: {bad[:5]}"
            )
        engine = path / ENGINE_DIR
        if engine.is_dir():
            allowed = _deepspeed_globals()
            for pt in sorted(engine.glob("*.pt")):
                load_weights_only(pt, allowed, mmap=True)  # raises on anything but plain data
        return meta

    # ------------------------------------------------------------------ loading

    def choose(self, path_or_latest: str | Path) -> tuple[Path, dict]:
        """Resolve + verify on the main process, broadcast, so every rank loads the same checkpoint."""
        from accelerate.utils import broadcast_object_list

        choice = [None]
        if self.accelerator.is_main_process:
            try:
                path = self.resolve(path_or_latest)
                choice = [(str(path), self.verify(path))]
            except (FileNotFoundError, CheckpointError) as err:
                choice = [err]
        broadcast_object_list(choice)
        if isinstance(choice[0], Exception):
            raise choice[0]
        return Path(choice[0][0]), choice[0][1]

    def load(self, path_or_latest: str | Path, parts) -> dict:
        """Restore ``parts`` and this rank's RNG from a checkpoint; return its trainer state. All ranks call."""
        path, meta = self.choose(path_or_latest)
        self._load_parts(path, meta, parts)
        return meta["state"]

    def _load_parts(self, path: Path, meta: dict, parts) -> None:
        from safetensors.torch import load_file

        if self.deepspeed:  # its pickles were verified by the main process (verify)
            parts.model.load_checkpoint(
                str(path), ENGINE_DIR, load_optimizer_states=True, load_lr_scheduler_states=False
            )
        else:
            eval_module(parts.model).load_state_dict(load_file(path / MODEL_FILE))
            parts.optimizer.load_state_dict(load_weights_only(path / OPTIMIZER_FILE))
        parts.scheduler.load_state_dict(meta["scheduler"])
        if (parts.ema is None) != (meta["ema"] is None):
            raise CheckpointError(f"{path}: checkpoint and run disagree on EMA (train.ema_decay)")
        if parts.ema is not None:
            parts.ema.load_state_dict({**meta["ema"], "shadow": load_file(path / EMA_FILE)})
        self._load_stateful(path, meta.get("stateful") or {})
        rng = path / RNG_FILE.format(rank=self.accelerator.process_index)
        if rng.is_file():  # absent when resuming on more ranks: those keep their fresh seeds
            from safetensors import safe_open

            with safe_open(rng, "pt") as f:
                set_rng_state({k: f.get_tensor(k) for k in f.keys()}, f.metadata())  # noqa: SIM118

    def _load_stateful(self, path: Path, saved: dict) -> None:
        """Restore every registered object from the checkpoint's ``stateful`` (an absent entry is ``{}``)."""
        for name, obj in self.stateful.items():
            try:
                obj.load_state_dict(saved.get(name, {}))
            except (KeyError, TypeError, ValueError) as err:
                raise CheckpointError(f"{path}: {STATE_FILE} key 'stateful.{name}': {err}") from None
