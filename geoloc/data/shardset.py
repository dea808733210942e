"""A sharded data set as its ``manifest.json`` describes it: what train.py and infer.py read shards through.

The manifest is the source of truth. :meth:`ShardSet.urls` gives exactly the shards it lists for a split
(a stray ``train-*.tar`` copied into the directory is ignored with a warning, a listed one that is missing
is an error), shard names are checked against the names ``shard_dataset.py`` writes before they are put
into a ``{shard}`` URL template (a name like ``x.tar; rm -rf ~`` inside a ``pipe:`` command never runs),
and every field read is validated, naming the manifest and the key. Eval loaders get each shard's
expected sample count, so a truncated shard is caught (``geoloc.data.stages.read_tars``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geoloc.errors import ShardError

log = logging.getLogger(__package__)

SHARD_NAME = r"{split}-\d{{6}}\.tar"  # what shard_dataset.py writes: train-000000.tar
SUPPORTED_VERSIONS = (1,)


def _fail(where: str, key: str, what: str) -> ShardError:
    return ShardError(f"{where}: {key}: {what}")


def _check_split(where: str, split: str, info) -> None:
    key = f"splits.{split}"
    if not isinstance(info, dict) or not isinstance(info.get("shards"), dict):
        raise _fail(where, key, "expected {'count': int, 'shards': {name: count}}")
    pattern = re.compile(SHARD_NAME.format(split=re.escape(split)))
    for name, n in info["shards"].items():
        if not isinstance(name, str) or not pattern.fullmatch(name):
            raise _fail(where, f"{key}.shards", f"{name!r} is not a shard name shard_dataset.py writes")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise _fail(where, f"{key}.shards.{name}", f"sample count {n!r} is not an integer >= 0")
    count = info.get("count")
    if not isinstance(count, int) or count != sum(info["shards"].values()):
        raise _fail(where, f"{key}.count", f"{count!r} is not the sum of its shards' counts")


def check_manifest(manifest, where: str) -> dict:
    """``manifest`` if it is a manifest this code can trust; else :class:`ShardError` naming the key."""
    if not isinstance(manifest, dict):
        raise ShardError(f"{where}: not a JSON object")
    if manifest.get("version") not in SUPPORTED_VERSIONS:
        raise _fail(where, "version", f"{manifest.get('version')!r}, expected one of {SUPPORTED_VERSIONS}")
    if not isinstance(manifest.get("splits"), dict):
        raise _fail(where, "splits", "missing or not an object")
    for split, info in manifest["splits"].items():
        _check_split(where, split, info)
    enc = manifest.get("label_encoder")
    if not isinstance(enc, dict) or not isinstance(enc.get("state_indices"), list):
        raise _fail(where, "label_encoder", "missing or without state_indices")
    if not all(isinstance(i, int) for i in enc["state_indices"]) or len(enc.get("state_names", [])) != len(
        enc["state_indices"]
    ):
        raise _fail(where, "label_encoder", "state_indices must be integers, one state name each")
    name = manifest.get("labels_file")
    if name is not None and (
        not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", "..")
    ):
        raise _fail(where, "labels_file", f"{name!r} must be a file name beside the manifest")
    return manifest


def read_json_url(url: str) -> dict:
    """A JSON file from a local path or any URL WebDataset opens (``pipe:``, ``https://``)."""
    import webdataset as wds

    try:
        with wds.gopen(url) as stream:
            return json.loads(stream.read())
    except Exception as err:  # noqa: BLE001 - every failure is reported with the URL
        raise ShardError(f"{url}: cannot read the shard manifest ({type(err).__name__}: {err})") from None


def manifest_location(spec: str, manifest: str | None) -> str | None:
    """Where manifest.json is: given explicitly (any path or URL), else beside local shards."""
    if manifest:
        return str(manifest)
    folder = Path(spec) if Path(spec).is_dir() else Path(spec).parent
    return str(folder / "manifest.json") if (folder / "manifest.json").is_file() else None


# ----------------------------------------------------------------------------- labels


def _json_members(url: str):
    """The parsed ``.json`` members of one shard, streamed (local path or any URL WebDataset opens)."""
    import webdataset as wds

    with wds.gopen(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".json"):
                yield json.loads(tar.extractfile(member).read())


def scan_labels(urls: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Original state index ``(N,)`` and lat/lon ``(N, 2)`` of every labelled sample in ``urls``."""
    states, latlon = [], []
    for url in urls:
        for meta in _json_members(url):
            if meta.get("state_idx") is None:
                raise ShardError(f"{url}: sample {meta.get('sample_id')!r} has no state_idx")
            states.append(int(meta["state_idx"]))
            latlon.append((float(meta["lat"]), float(meta["lon"])))
    return np.asarray(states, dtype=np.int64), np.asarray(latlon, dtype=np.float64).reshape(-1, 2)


# ----------------------------------------------------------------------------- the shard set


@dataclass(frozen=True)
class ShardSet:
    """Shards (``spec``: a directory, a brace pattern, or a URL template with ``{shard}``/``{split}``) and
    their validated manifest (read from ``location``)."""

    spec: str
    manifest: dict
    location: str

    @classmethod
    def open(cls, spec, manifest: str | None = None) -> ShardSet:
        """Find (beside local shards, or ``manifest``), read and validate the manifest."""
        location = manifest_location(str(spec), manifest)
        if location is None:
            raise ShardError(
                f"{spec}: no manifest.json beside the shards; write them with shard_dataset.py, or pass "
                "--manifest PATH_OR_URL when the shards are URLs"
            )
        return cls(str(spec), check_manifest(read_json_url(location), location), location)

    def _split(self, split: str) -> dict:
        if split not in self.manifest["splits"]:
            raise ShardError(f"{self.location}: no split {split!r} (has {sorted(self.manifest['splits'])})")
        return self.manifest["splits"][split]

    def count(self, split: str) -> int:
        return int(self._split(split)["count"])

    def shard_counts(self, split: str) -> dict[str, int]:
        """``{shard file name: samples}`` of a split."""
        return dict(self._split(split)["shards"])

    @property
    def encoder(self):
        from geoloc.labels import LabelEncoder

        return LabelEncoder.from_dict(self.manifest["label_encoder"])

    def urls(self, split: str) -> list[str]:
        """The split's shard URLs, exactly those the manifest lists, in name order."""
        from geoloc.data.specs import resolve_shards

        self._split(split)
        try:
            return resolve_shards(self.spec, split, self.manifest)
        except (FileNotFoundError, ValueError) as err:
            raise ShardError(str(err)) from None

    def labels(self, split: str, accelerator=None) -> tuple[np.ndarray, np.ndarray]:
        """Original state indices ``(N,)`` and lat/lon ``(N, 2)`` of a labelled split: from ``labels.csv``
        beside a local manifest (cheap), else streamed from the shards (spread over the ranks)."""
        found = self._sidecar_labels(split)
        if found is not None and len(found[0]) == self.count(split):
            return found
        return gathered_labels(accelerator, self.urls(split))

    def _sidecar_labels(self, split: str) -> tuple[np.ndarray, np.ndarray] | None:
        import pandas as pd

        name = self.manifest.get("labels_file")
        path = Path(self.location).parent / name if name and Path(self.location).is_file() else None
        if path is None or not path.is_file():
            return None
        try:
            table = pd.read_csv(path, dtype={"sample_id": str})
            table = table[table["split"] == split]
            return table["state_idx"].to_numpy(np.int64), table[["lat", "lon"]].to_numpy(np.float64)
        except (ValueError, KeyError) as err:  # unreadable: the shards themselves are the fallback
            log.warning("%s: unreadable (%s); reading the labels from the shards", path, err)
            return None


def gathered_labels(accelerator, urls: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`scan_labels` with the shards spread over the ranks, gathered on every rank."""
    if accelerator is None or accelerator.num_processes == 1:
        return scan_labels(urls)
    from accelerate.utils import gather_object

    rank, world = accelerator.process_index, accelerator.num_processes
    parts = gather_object([scan_labels(urls[rank::world])])
    return np.concatenate([s for s, _ in parts]), np.concatenate([ll for _, ll in parts])
