"""Small file helpers shared by the sharder, the checkpoints and the model export (no heavy imports)."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 24  # 16 MiB: a ViT-L model file (~1.2 GB) is hashed without holding it in memory


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
