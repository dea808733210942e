"""Shard specs: where the shards of a split are (directory, brace pattern, URL template or list).

Local specs are checked here, so that a typo fails at start-up naming the spec, not in a DataLoader
worker. Remote URLs (``pipe:``, ``s3://``, ...) are passed to WebDataset as they are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import webdataset as wds

_URL_SCHEMES = ("pipe:", "http://", "https://", "gs://", "s3://", "ais://", "hf://", "file:")


def _is_url(spec: str) -> bool:
    return spec.startswith(_URL_SCHEMES)


def resolve_shards(spec: str | list[str], split: str, manifest: dict | None = None) -> list[str]:
    """Shard URLs from a directory (``DIR/{split}-*.tar``), a brace pattern, a URL, or a list.

    Remote shards: ``{split}`` in the spec is replaced by the split name, and ``{shard}`` by each shard
    file name the manifest lists for that split, e.g.
    ``'pipe:aws s3 cp s3://bucket/shards/{shard} -'`` (train and val then never mix).
    """
    if isinstance(spec, (list, tuple)):
        return [str(s) for s in spec]
    spec = str(spec)
    if "{shard}" in spec:
        if manifest is None:
            raise ValueError(f"{spec}: a '{{shard}}' template needs the shard manifest (--manifest)")
        return [spec.replace("{shard}", name) for name in sorted(manifest["splits"][split]["shards"])]
    spec = spec.replace("{split}", split)
    if os.path.isdir(spec):
        shards = sorted(str(p) for p in Path(spec).glob(f"{split}-*.tar"))
        if not shards:
            raise FileNotFoundError(f"{spec}: no '{split}-*.tar' shards in this directory")
        return shards
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
    return json.loads(path.read_text()) if path.is_file() else None
