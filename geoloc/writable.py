"""Output paths checked before any work: a run that cannot write its result fails at once, naming the flag.

Each tool calls these on its output flags before the expensive part (decoding every view, loading models,
building the embedding cache), so an unwritable ``--out`` costs seconds, not the whole run. The check
creates nothing: the nearest existing folder must be a folder where a file can be created (tried for real
with an anonymous temporary file, so read-only mounts and permissions both count, whoever runs it).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from geoloc.errors import GeolocError


class OutputPathError(GeolocError, ValueError):
    """An output path cannot be written; the message names the flag and the path."""


def nearest_existing(path: Path) -> Path:
    """``path`` itself when it exists, else its closest existing ancestor."""
    path = Path(path).absolute()
    return next(p for p in (path, *path.parents) if p.exists())


def folder_problem(folder: Path, target: Path | None = None) -> str | None:
    """Why no file can be written in ``folder`` (existing or to be created), else None; worded for
    ``target`` (the folder itself, or the file to be written in it)."""
    base = nearest_existing(folder)
    if not base.is_dir():
        target = Path(target or folder).absolute()
        return "is a file, not a folder" if base == target else f"lies under the file {base}"
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as err:
        return f"cannot write in {base} ({err.strerror or err})"
    return None


def check_dir_writable(path: str | Path, flag: str) -> None:
    """``path`` is a folder (or can be created as one) in which files can be written."""
    problem = folder_problem(Path(path))
    if problem:
        raise OutputPathError(f"{flag} {path}: {problem}")


def check_file_writable(path: str | Path, flag: str) -> None:
    """``path`` names a file (not a folder) whose folder exists or can be created, and is writable."""
    path = Path(path)
    problem = "is a folder; give a file name" if path.is_dir() else folder_problem(path.parent, path)
    if problem:
        raise OutputPathError(f"{flag} {path}: {problem}")
