"""Planned shards -> ``{split}-NNNNNN.tar`` files, each written whole or not at all (in worker processes).

Per sample the tar holds ``<key>.{north,east,south,west}.jpg`` (the original bytes, never re-encoded)
and ``<key>.json``; header fields are fixed, so a shard's bytes depend only on its content. Every file
is written to ``NAME.tmp`` and renamed. Before a run writes, the files an earlier run left in the output
directory (its shards, temporaries, manifest and labels) are removed; other files are left alone.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from geoloc import contract
from geoloc.sharding.rows import Sample
from geoloc.writable import OutputPathError, check_dir_writable

# the files a run owns in its output directory
MANIFEST = "manifest.json"
LABELS = "labels.csv"  # beside the manifest: labels of train+val, so a trainer need not stream every tar
SHARD_RE = re.compile(r"^(train|val|test)-\d{6}\.tar$")
TMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class ShardTask:
    out_dir: str
    name: str  # e.g. "train-000003.tar"
    samples: tuple[Sample, ...]  # checked samples only, so never empty


def check_out_dir(root: Path, out: Path) -> None:
    """Refuse an output directory that is the data root or lies in one of its image folders (a rerun there
    would replace the root's own files), or where nothing can be written; creates nothing."""
    out_real = out.resolve()
    if out_real == root.resolve():
        raise OutputPathError(
            f"--out {out}: is the data root {root}; write the shards to a folder of their own"
        )
    for folder in (contract.TRAIN_IMAGES, contract.TEST_IMAGES):
        images = (root / folder).resolve()
        if out_real == images or images in out_real.parents:
            raise OutputPathError(f"--out {out}: lies in the data root's image folder {root / folder}")
    check_dir_writable(out, "--out")


def write_atomic(path: Path, write) -> None:
    """``write(file)`` into ``path.tmp``, flush to disk, then rename: ``path`` is never half-written.

    A failed write removes its temporary; one left by a killed worker is removed by ``shard_dataset``."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def sample_json(sample: Sample) -> bytes:
    meta = {
        "sample_id": sample.sample_id,
        "state_idx": sample.state_idx,
        "lat": sample.lat,
        "lon": sample.lon,
        "missing_views": list(sample.missing_views),
    }
    return json.dumps(meta).encode()


def view_bytes(path: str) -> bytes:
    """A checked view's bytes, read again; an error if the file went away since it was checked."""
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise contract.DataContractError(
            f"{path}: unreadable ({err.strerror or err}) though it was readable when checked: "
            "the data root changed during the run; rerun"
        ) from err


def sample_members(sample: Sample) -> list[tuple[str, bytes]]:
    """Tar members of one checked sample: its readable views (original bytes) and its json."""
    key = contract.sample_key(sample.sample_id)
    members = [
        (f"{key}.{view}.jpg", view_bytes(path))
        for view, path in zip(contract.VIEWS, sample.paths)
        if view not in sample.missing_views
    ]
    return members + [(f"{key}.json", sample_json(sample))]


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Fixed header fields (mtime, owner, mode): the shard's bytes depend only on its content."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(task: ShardTask) -> str:
    """Write one planned shard of checked samples; returns its name."""

    def write(f):
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for sample in task.samples:
                for name, data in sample_members(sample):
                    add_member(tar, name, data)

    write_atomic(Path(task.out_dir) / task.name, write)
    return task.name


def is_temporary(name: str) -> bool:
    stem = name.removesuffix(TMP_SUFFIX)
    return name != stem and bool(SHARD_RE.match(stem) or stem == MANIFEST)


def remove_temporaries(out_dir: Path) -> None:
    """Temporaries of a failed run: a worker terminated mid-write cannot remove its own."""
    for path in out_dir.glob(f"*{TMP_SUFFIX}"):
        if is_temporary(path.name):
            path.unlink(missing_ok=True)


def remove_stale(out_dir: Path, keep: set[str]) -> None:
    """Drop the manifest, temporaries and shards not in this run's plan; other files are left alone."""
    for path in out_dir.iterdir():
        stale_shard = SHARD_RE.match(path.name) and path.name not in keep
        if path.name in (MANIFEST, LABELS) or stale_shard or is_temporary(path.name):
            path.unlink()


def write_shards(out: Path, plan: list[tuple[str, tuple]], imap, progress: bool) -> None:
    """Replace an earlier run's files in ``out`` by the planned shards (the manifest comes later)."""
    out.mkdir(parents=True, exist_ok=True)
    remove_stale(out, {name for _, (name, _) in plan})
    tasks = [ShardTask(str(out), name, samples) for _, (name, samples) in plan]
    with tqdm(
        total=sum(len(t.samples) for t in tasks), unit="sample", desc="writing", disable=not progress
    ) as bar:
        for task, _ in zip(tasks, imap(write_shard, tasks, 1)):
            bar.update(len(task.samples))
