"""Shard layouts that break invariants: a split re-cut into shards of chosen sizes (one shard for many
ranks, ``world_size - 1`` shards, an odd number of uneven shards), the manifest updated to match."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

from geoloc.sharding.write import add_member

LAYOUTS = {  # 12 val / 12 test samples (the tiny_shards fixture) cut into these shard sizes
    "one": [12],  # one shard for all ranks: every rank but one has nothing to evaluate
    "two": [7, 5],  # world_size - 1 shards on 3 ranks
    "odd": [7, 4, 1],  # an odd number of uneven shards
}


def read_samples(paths: list[Path]) -> list[list[tuple[str, bytes]]]:
    """Every sample of the tars, in order: a list of its ``(member name, bytes)``."""
    samples, key = [], None
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                this = member.name.split(".", 1)[0]
                if this != key:
                    samples.append([])
                    key = this
                samples[-1].append((member.name, tar.extractfile(member).read()))
    return samples


def recut(src: Path, dst: Path, sizes: dict[str, list[int]]) -> Path:
    """A copy of shard directory ``src`` whose ``sizes`` splits are re-cut; manifest.json follows."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    for split, counts in sizes.items():
        old = sorted(dst.glob(f"{split}-*.tar"))
        samples = read_samples(old)
        assert sum(counts) == len(samples), (split, counts, len(samples))
        for path in old:
            path.unlink()
        shards, start = {}, 0
        for k, n in enumerate(counts):
            name = f"{split}-{k:06d}.tar"
            with tarfile.open(dst / name, "w", format=tarfile.PAX_FORMAT) as tar:
                for sample in samples[start : start + n]:
                    for member, data in sample:
                        add_member(tar, member, data)
            shards[name], start = n, start + n
        manifest["splits"][split] = {"count": len(samples), "shards": shards}
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dst


def layout_dirs(src: Path, root: Path) -> dict[str, Path]:
    """``{layout name: shard dir}`` with val and test re-cut per :data:`LAYOUTS`."""
    return {name: recut(src, root / name, {"val": sizes, "test": sizes}) for name, sizes in LAYOUTS.items()}
