"""Shard specs: where the shards of a split are (directory, brace pattern, URL template or list).

Local specs are checked here, so that a typo fails at start-up naming the spec, not in a DataLoader
worker. Remote URLs (``pipe:``, ``s3://``, ...) are passed to WebDataset as they are.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import webdataset as wds

log = logging.getLogger(__package__)
_URL_SCHEMES = ("pipe:", "http://", "https://", "gs://", "s3://", "ais://", "hf://", "file:")


def _is_url(spec: str) -> bool:
    return spec.startswith(_URL_SCHEMES)


def manifest_names(manifest: dict, split: str) -> list[str]:
    """The split's shard file names from a manifest, checked against the names the sharder writes: they
    go into URL templates (``pipe:`` commands), so nothing else may pass."""
    pattern = re.compile(rf"{re.escape(split)}-\d{{6}}\.tar")
    names = sorted(manifest["splits"][split]["shards"])
    bad = [n for n in names if not pattern.fullmatch(str(n))]
    if bad:
        raise ValueError(
            f"manifest: split {split!r} lists {bad[:3]}: not shard names shard_dataset.py writes"
        )
    return names


def _from_directory(folder: str, split: str, manifest: dict | None) -> list[str]:
    """The manifest's shards of ``split`` in ``folder`` (all must exist; unlisted tars are warned about and
    ignored); without a manifest, every ``{split}-*.tar`` there."""
    found = sorted(str(p) for p in Path(folder).glob(f"{split}-*.tar"))
    if manifest is None:
        if not found:
            raise FileNotFoundError(f"{folder}: no '{split}-*.tar' shards in this directory")
        return found
    listed = [os.path.join(folder, n) for n in manifest_names(manifest, split)]
    missing = [p for p in listed if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"{folder}: {len(missing)} shard(s) of manifest.json not found, e.g. {missing[:3]}"
        )
    stray = sorted(set(found) - set(listed))
    if stray:
        log.warning(
            "%s: ignoring %d %s tar(s) not listed in manifest.json: %s", folder, len(stray), split, stray[:5]
        )
    return listed


def resolve_shards(spec: str | list[str], split: str, manifest: dict | None = None) -> list[str]:
    """Shard URLs from a directory (``DIR/{split}-*.tar``), a brace pattern, a URL, or a list.

    A directory gives the shards its manifest lists (``manifest``, else ``manifest.json`` found beside
    them). Remote shards: ``{split}`` in the spec is replaced by the split name, and ``{shard}`` by each
    shard file name the manifest lists for that split, e.g. ``'pipe:aws s3 cp s3://bucket/shards/{shard} -'``
    (train and val then never mix).
    """
    if isinstance(spec, (list, tuple)):
        return [str(s) for s in spec]
    spec = str(spec)
    if "{shard}" in spec:
        if manifest is None:
            raise ValueError(f"{spec}: a '{{shard}}' template needs the shard manifest (--manifest)")
        return [spec.replace("{shard}", name) for name in manifest_names(manifest, split)]
    spec = spec.replace("{split}", split)
    if os.path.isdir(spec):
        if manifest is None and (found := read_manifest(spec)) is not None:
            from geoloc.data.shardset import check_manifest

            manifest = check_manifest(found, os.path.join(spec, "manifest.json"))
        return _from_directory(spec, split, manifest)
    shards = wds.shardlists.expand_urls(spec)  # braces and '::' lists, as WebDataset reads them
    if not _is_url(spec):
        missing = [s for s in shards if not os.path.isfile(s)]
        if missing:
            raise FileNotFoundError(f"{spec}: {len(missing)} shard(s) not found, e.g. {missing[:3]}")
    return shards


def read_manifest(spec: str | list[str]) -> dict | None:
    """``manifest.json`` beside local shards (spec a directory or a local pattern/list), else None."""
    first = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    if not isinstance(first, (str, os.PathLike)) or _is_url(str(first)):
        return None
    folder = Path(first) if os.path.isdir(first) else Path(first).parent
    path = folder / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        from geoloc.errors import ShardError

        raise ShardError(f"{path}: not valid JSON ({err})") from None
