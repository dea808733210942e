"""Near-duplicate samples across splits: a perceptual hash per view and an exact, sub-quadratic matcher.

The hash is ``imagehash.phash`` at 32x32 (the signs of the lowest 32x32 DCT coefficients of the view,
box-downscaled to 128 px grey, against their median): 1024 bits per view, stored as 16 uint64 words whose
first word is the *coarse* code, the 8x8 lowest frequencies. Re-encoding (another JPEG quality) and
slight resizing flip few bits; two different pictures differ in about half.

Two samples are near-duplicates when, over the view directions both have readable (at least
``MIN_SHARED_VIEWS``; north with north, east with east, ...),

    coarse bits differing  <= COARSE_PER_VIEW x shared views, and
    all bits differing     <= threshold x shared views        (``--dedup-threshold``, per view)

Which numbers (``bench/dedup.py`` part 3, BENCHMARKS.md; 2,500 generated samples): copies re-encoded
at JPEG quality 70-90 or resized 256 -> 240/272 px differ by at most 127 of 1024 bits per view (mean
over the 4 views; quality 50: up to 182, 84% within 128), distinct samples by at least 147, except
scenes the generator drew twice a few hundred metres apart (126, 138: pictures that differ only by
pixel noise). The coarse bound is what makes the search exact and fast (pigeonhole): each view's
coarse word is cut into ``COARSE_PER_VIEW + 1`` bands, so two samples within the coarse bound agree
exactly on at least one band of one shared view; only such pairs are compared bit by bit.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from geoloc import contract

MODES = ("report", "drop", "off")
HASH_SIDE = 32  # phash grid side: 32x32 = 1024 bits per view
COARSE_SIDE = 8  # the grid's top-left 8x8 (lowest frequencies): the coarse word
WORDS = HASH_SIDE * HASH_SIDE // 64  # uint64 words per view (16)
VIEW_BYTES = WORDS * 8
DEFAULT_THRESHOLD = 128  # differing bits per shared view (of 1024), from the measured distributions
COARSE_PER_VIEW = 4  # differing coarse bits per shared view (of 64)
MIN_SHARED_VIEWS = 2  # samples sharing fewer readable view directions are not compared
PAIR_CHUNK = 2_000_000  # candidate pairs checked per numpy batch: bounds the memory (~300 MB)


# ----------------------------------------------------------------------------- hashing (in the workers)

_COARSE = np.zeros((HASH_SIDE, HASH_SIDE), dtype=bool)
_COARSE[:COARSE_SIDE, :COARSE_SIDE] = True


def view_hash(image) -> bytes:
    """``VIEW_BYTES`` bytes of a decoded PIL image: the coarse 64 bits first, then the other 960.

    The view goes to grey and is box-downscaled to the hash's 128 px first: the same filter for any
    input size, and ~3x cheaper than the Lanczos resize ``imagehash`` would do (which then is a no-op)."""
    import imagehash  # only the hashing workers need it (and scipy behind it)

    side = HASH_SIDE * 4  # imagehash's pHash input side (hash_size x highfreq_factor 4)
    small = image.convert("L").resize((side, side), Image.Resampling.BOX)
    grid = imagehash.phash(small, hash_size=HASH_SIDE).hash  # (32, 32) bool
    bits = np.concatenate([grid[_COARSE], grid[~_COARSE]])  # (1024,): coarse block first
    return np.packbits(bits).tobytes()


def pack_sample(hashes: list[bytes | None]) -> bytes:
    """One sample's view hashes (VIEWS order, ``None`` for an unreadable view) -> one presence byte per
    view, then ``VIEW_BYTES`` per view (zeros where absent): what a worker sends back."""
    flags = bytes(h is not None for h in hashes)
    return flags + b"".join(h if h is not None else bytes(VIEW_BYTES) for h in hashes)


def hash_matrix(rows: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`pack_sample` rows -> codes ``(N, V, WORDS)`` uint64 and ``present`` ``(N, V)`` bool."""
    n, v = len(rows), len(contract.VIEWS)
    codes = np.zeros((n, v, WORDS), dtype=np.uint64)
    present = np.zeros((n, v), dtype=bool)
    for i, row in enumerate(rows):
        present[i] = np.frombuffer(row[:v], dtype=np.uint8).astype(bool)
        codes[i] = np.frombuffer(row[v:], dtype="<u8").reshape(v, WORDS)
    return codes, present


# ----------------------------------------------------------------------------- matching (pure numpy)


def band_edges(coarse_per_view: int) -> list[tuple[int, int]]:
    """``coarse_per_view + 1`` near-equal bit ranges of the 64-bit coarse word (pigeonhole bands)."""
    edges = np.linspace(0, 64, coarse_per_view + 2).round().astype(int)
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def check_pairs(codes, present, i, j, threshold: int, coarse_per_view: int, min_views: int):
    """The pairs ``(i[k], j[k])`` within both bounds: ``(i, j, differing bits, shared views)`` arrays."""
    shared = present[i] & present[j]  # (K, V)
    views = shared.sum(1)
    coarse = (np.bitwise_count(codes[i, :, 0] ^ codes[j, :, 0]) * shared).sum(1)  # (K,)
    keep = np.flatnonzero((views >= min_views) & (coarse <= coarse_per_view * views))
    i, j, shared, views = i[keep], j[keep], shared[keep], views[keep]
    bits = np.zeros(len(i), dtype=np.int64)
    for s in range(0, len(i), PAIR_CHUNK // 16):  # (K, V, WORDS) gathers: 512 bytes a pair
        part = slice(s, s + PAIR_CHUNK // 16)
        per_view = np.bitwise_count(codes[i[part]] ^ codes[j[part]]).sum(-1)  # (k, V)
        bits[part] = (per_view * shared[part]).sum(1)
    keep = bits <= threshold * views
    return i[keep], j[keep], bits[keep], views[keep]


def run_pairs(members: np.ndarray, run_end: np.ndarray):
    """Position-chunks of all ``(members[p], members[q])``, ``p < q`` in the same run of equal keys;
    ``run_end[p]`` is one past the last position of ``p``'s run."""
    counts = run_end - np.arange(len(members)) - 1  # partners after each position
    bounds = np.searchsorted(np.cumsum(counts), np.arange(PAIR_CHUNK, counts.sum() + PAIR_CHUNK, PAIR_CHUNK))
    start = 0
    for stop in np.minimum(bounds + 1, len(members)).tolist() + [len(members)]:
        pos, c = np.arange(start, stop), counts[start:stop]
        if c.sum():
            first = np.repeat(pos, c)
            second = first + 1 + np.arange(c.sum()) - np.repeat(np.cumsum(c) - c, c)
            yield members[first], members[second]
        start = stop


def band_candidates(codes, present, view: int, lo: int, hi: int):
    """Pairs of samples (both with ``view``) whose coarse words agree exactly on bits ``[lo, hi)``."""
    members = np.flatnonzero(present[:, view])
    keys = (codes[members, view, 0] >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
    order = np.argsort(keys, kind="stable")
    members, keys = members[order], keys[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])  # first position of each run
    run_end = np.repeat(np.r_[starts[1:], len(keys)], np.diff(np.r_[starts, len(keys)]))
    yield from run_pairs(members, run_end)


def near_pairs(
    codes: np.ndarray,
    present: np.ndarray,
    query: np.ndarray,
    threshold: int = DEFAULT_THRESHOLD,
    coarse_per_view: int = COARSE_PER_VIEW,
    min_views: int = MIN_SHARED_VIEWS,
):
    """Every near-duplicate pair with at least one ``query`` sample, exactly as :func:`brute_force_pairs`.

    ``codes`` ``(N, V, WORDS)`` uint64, ``present`` ``(N, V)`` bool, ``query`` ``(N,)`` bool. Returns
    ``(i, j, bits, views)`` int arrays, ``i < j``, sorted by ``(i, j)``. Candidates are the pairs agreeing
    on one coarse band of one shared view: a pair within the coarse bound always is (pigeonhole)."""
    n = len(codes)
    found = []
    for view in range(codes.shape[1]):
        for lo, hi in band_edges(coarse_per_view):
            for a, b in band_candidates(codes, present, view, lo, hi):
                i, j = np.minimum(a, b), np.maximum(a, b)
                wanted = query[i] | query[j]
                found.append(
                    check_pairs(codes, present, i[wanted], j[wanted], threshold, coarse_per_view, min_views)
                )
    if not found:
        return tuple(np.zeros(0, dtype=np.int64) for _ in range(4))
    i, j, bits, views = (np.concatenate(x).astype(np.int64) for x in zip(*found))
    _, first = np.unique(i * n + j, return_index=True)  # a pair found in several bands counts once
    return i[first], j[first], bits[first], views[first]


def brute_force_pairs(
    codes,
    present,
    query,
    threshold=DEFAULT_THRESHOLD,
    coarse_per_view=COARSE_PER_VIEW,
    min_views=MIN_SHARED_VIEWS,
):
    """The same pairs as :func:`near_pairs` by comparing every pair (O(N^2)): the tests' and the bench's
    reference."""
    found = []
    for i in range(len(codes) - 1):
        j = np.arange(i + 1, len(codes))
        j = j[query[i] | query[j]]
        found.append(
            check_pairs(codes, present, np.full(len(j), i), j, threshold, coarse_per_view, min_views)
        )
    if not found:
        return tuple(np.zeros(0, dtype=np.int64) for _ in range(4))
    return tuple(np.concatenate(x).astype(np.int64) for x in zip(*found))
