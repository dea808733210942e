"""Decode every view of every sample before anything is planned or written (in worker processes).

A labelled sample with a missing or undecodable view is skipped (or, ``--strict``, an error); a test
sample is kept and its unreadable views are recorded. Problem texts name the view and its file and are
deterministic, since they go into ``manifest.json``. With ``hashing`` the same pass also computes each
readable view's perceptual hash (``dedup.view_hash``) from the image it already decoded: 128 bytes a view
come back from the worker, never pixels.
"""

from __future__ import annotations

import io
import re
from dataclasses import replace
from functools import partial
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from geoloc import contract
from geoloc.sharding.dedup import pack_sample, view_hash
from geoloc.sharding.rows import BAD_IMAGE, MISSING_VIEW, Sample, fail_or_skip, skip_entry

CHECK_CHUNK = 16  # samples per worker task while checking: fewer round trips, results still in order
OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")  # "<_io.BytesIO object at 0x7f..>"


def inspect_view(path: str | None, view: str, hashing: bool = False) -> tuple[str | None, bytes | None]:
    """``(None, hash or None)`` for an image PIL fully decodes (any mode or format), else ``(why not,
    None)`` naming the file. The text is deterministic (no object addresses): it goes into the manifest."""
    if path is None:
        return f"{MISSING_VIEW}: {view} view: the CSV names no file", None
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return f"{MISSING_VIEW}: {view} view: {path}: {err.strerror or err}", None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decodes every pixel: a truncated JPEG fails here, not at open()
            return None, view_hash(img) if hashing else None
    except Exception as err:  # noqa: BLE001 -- PIL raises OSError, SyntaxError, ValueError, struct.error...
        # e.g. "cannot identify image file <_io.BytesIO object at 0x7f..>": the address changes per run
        message = OBJECT_REPR.sub("", str(err))
        return f"{BAD_IMAGE}: {view} view: {path}: {type(err).__name__}: {message}", None


def view_problem(path: str | None, view: str) -> str | None:
    """None for an image PIL fully decodes (any mode or format), else why not, naming the file."""
    return inspect_view(path, view)[0]


def check_sample(sample: Sample, hashing: bool = False):
    """``(skip reason, (), None)`` for a labelled sample with a bad view, else ``(None, ((view, problem),
    ..), hashes)`` listing a test sample's unreadable views; ``hashes`` is ``dedup.pack_sample`` of its
    views (None unless ``hashing``). Returns only text and hash bytes, so workers send back little."""
    bad, hashes, known = [], [], dict(sample.view_problems)  # a refused path is never opened
    for view, path in zip(contract.VIEWS, sample.paths):
        problem, code = (known[view], None) if view in known else inspect_view(path, view, hashing)
        if problem and sample.split != "test":
            return problem, (), None  # the reason names the view and its file
        if problem:
            bad.append((view, problem))
        hashes.append(code)
    return None, tuple(bad), pack_sample(hashes) if hashing else None


def check_samples(samples: list[Sample], imap, strict: bool, progress: bool, hashing: bool = False):
    """``(kept samples, skip entries, missing-view records, hashes)``; kept test samples carry their
    missing views, ``hashes`` has one ``dedup.pack_sample`` row per kept sample (``None`` without
    ``hashing``). ``strict`` raises at the first bad labelled sample (in sample order, whatever the
    workers)."""
    kept, skipped, missing, hashes = [], [], [], []
    checks = imap(partial(check_sample, hashing=hashing), samples, CHECK_CHUNK)
    bar = tqdm(checks, total=len(samples), unit="sample", desc="checking", disable=not progress)
    for sample, (problem, bad_views, code) in zip(samples, bar):
        if problem:
            skipped.append(fail_or_skip(strict, skip_entry(sample.sample_id, sample.split, problem)))
            continue
        missing += [
            {"sample_id": sample.sample_id, "split": sample.split, "view": view, "reason": why}
            for view, why in bad_views
        ]
        kept.append(replace(sample, missing_views=tuple(view for view, _ in bad_views)))
        hashes.append(code)
    return kept, skipped, missing, hashes if hashing else None
