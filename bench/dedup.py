"""Near-duplicate detection cost: the matcher at competition scale, and shard_dataset --dedup report vs off.

    OMP_NUM_THREADS=1 python bench/dedup.py [--n-train 66000] [--n-test 16000] [--naive-n 3000] \\
        [--data-train 2000] [--data-test 500] [--workers 2] [--work-dir DIR]     # repo root

(1) Matching: random 1024-bit view hashes for ``n_train + n_test`` samples x 4 views, with 1% of the
    train samples planted as near copies of test samples (per view 0-3 coarse and 10-100 other bits
    flipped: the spread measured on re-encoded and resized generated views). Times
    ``dedup.near_pairs`` (banded, exact) on all of them, and the naive all-pairs numpy popcount
    (``dedup.brute_force_pairs``) on a ``--naive-n`` subsample, where both run and must agree; the naive
    time is extrapolated to the full size by the pair count (it is quadratic). The naive baseline is
    blocked (256 rows against all later ones: one (256, n, 4) XOR + popcount of the coarse words, then
    all bits of the survivors), the fastest plain numpy all-pairs found here. Prints the ratio.
(2) Sharding: a generated data set (``geoloc.synth``, 256 px views) sharded with ``--dedup off`` and
    ``--dedup report`` (best of 2 each), the overhead of hashing, and the pairs found (the "gain").
(3) Distributions behind the default threshold, on the data of (2): bits/view (of 1024, averaged over
    the 4 views) between each of the first ``--copies`` train samples and its planted copies (JPEG
    quality 50/70/90, resized 256->240->256 / ->272->256, kept at 240 px, 240 px and quality 70), and
    between all pairs of distinct samples (with the closest pairs' states and distance in km).
(4) The same copies and pairs with the usual 64-bit pHash, to show why 1024 bits are used.
Record the figures and the machine in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from geoloc.sharding import dedup


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=66000, help="train samples for the matching part")
    p.add_argument("--n-test", type=int, default=16000, help="test samples for the matching part")
    p.add_argument("--naive-n", type=int, default=3000, help="subsample on which the naive baseline runs")
    p.add_argument("--data-train", type=int, default=2000, help="generated train samples to shard (0: skip)")
    p.add_argument("--data-test", type=int, default=500, help="generated test samples to shard")
    p.add_argument("--workers", type=int, default=2, help="shard_dataset --workers")
    p.add_argument("--copies", type=int, default=200, help="samples copied per copy kind for (3)")
    p.add_argument("--work-dir", default="", help="where the generated data goes (default: a temp dir)")
    return p.parse_args(argv)


def planted_hashes(n_train: int, n_test: int, seed: int = 0):
    """``(codes, present, query, (target, source) pairs)``: random hashes, 1% of the train samples near
    copies of test samples."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    codes = rng.integers(0, 2**64, size=(n, 4, dedup.WORDS), dtype=np.uint64)
    copies = rng.choice(n_train, size=max(1, n_train // 100), replace=False)
    sources = n_train + rng.integers(n_test, size=len(copies))
    for target, source in zip(copies, sources):
        codes[target] = codes[source]
        for v in range(4):
            for bit in rng.choice(64, size=rng.integers(0, 4), replace=False):  # coarse flips
                codes[target, v, 0] ^= np.uint64(1) << np.uint64(bit)
            for bit in rng.choice(960, size=rng.integers(10, 101), replace=False):  # the other 960 bits
                codes[target, v, 1 + bit // 64] ^= np.uint64(1) << np.uint64(bit % 64)
    present = np.ones((n, 4), dtype=bool)
    return codes, present, np.arange(n) < n_train, np.stack([copies, sources], 1)


def blocked_all_pairs(codes, present, query, block=256):
    """The naive baseline: every pair with a query sample; per view, a (block, n) slab of coarse-word
    XOR + popcount (contiguous 2-D numpy, the fastest plain all-pairs found here), then all bits of the
    pairs within the coarse bound."""
    n = len(codes)
    coarse_words = np.ascontiguousarray(codes[:, :, 0].T)  # (V, N)
    have = np.ascontiguousarray(present.T)  # (V, N)
    found = []
    for start in range(0, n, block):
        rows = np.arange(start, min(start + block, n))
        coarse = np.zeros((len(rows), n), dtype=np.int16)  # (B, N) differing coarse bits
        views = np.zeros((len(rows), n), dtype=np.int16)  # (B, N) shared views
        for v in range(codes.shape[1]):
            shared = have[v, rows, None] & have[v, None, :]
            coarse += np.where(shared, np.bitwise_count(coarse_words[v, rows, None] ^ coarse_words[v]), 0)
            views += shared
        ok = (coarse <= dedup.COARSE_PER_VIEW * views) & (views >= dedup.MIN_SHARED_VIEWS)
        ok &= (np.arange(n)[None, :] > rows[:, None]) & (query[rows, None] | query[None, :])
        i, j = np.nonzero(ok)
        found.append(
            dedup.check_pairs(
                codes,
                present,
                rows[i],
                j,
                dedup.DEFAULT_THRESHOLD,
                dedup.COARSE_PER_VIEW,
                dedup.MIN_SHARED_VIEWS,
            )
        )
    return tuple(np.concatenate(x).astype(np.int64) for x in zip(*found))


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - t


def query_pairs(n: int, n_query: int) -> float:
    """Pairs with at least one query sample: what both matchers are asked about."""
    return n * (n - 1) / 2 - (n - n_query) * (n - n_query - 1) / 2


def bench_matching(args) -> None:
    codes, present, query, pairs = planted_hashes(args.n_train, args.n_test)
    n = len(codes)
    found, fast = timed(dedup.near_pairs, codes, present, query)
    # the subsample holds 100 planted pairs (so agreement is tested on found pairs), the rest at random
    some = np.unique(pairs[:100].ravel())
    rest = np.setdiff1d(np.arange(n), some)
    sub = np.sort(
        np.r_[some, np.random.default_rng(1).choice(rest, size=args.naive_n - len(some), replace=False)]
    )
    c, p, q = codes[sub], present[sub], query[sub]
    small_fast, t_small_fast = timed(dedup.near_pairs, c, p, q)
    small_naive, t_naive = timed(blocked_all_pairs, c, p, q)
    assert all((a == b).all() for a, b in zip(small_fast, small_naive)), "near_pairs != brute force"
    naive_full = t_naive * query_pairs(n, int(query.sum())) / query_pairs(len(sub), int(q.sum()))
    print(f"(1) matching {args.n_train} train + {args.n_test} test samples x 4 views ({n * 4} hashes)")
    print(
        f"    planted copies {len(pairs)}, pairs found {len(found[0])} (copies of one test sample also pair)"
    )
    print(f"    near_pairs (banded, exact): {fast:.2f} s")
    print(
        f"    naive all-pairs on {len(sub)} samples: {t_naive:.2f} s (near_pairs there: {t_small_fast:.3f} s, "
        f"same {len(small_naive[0])} pairs)"
    )
    print(f"    naive extrapolated to {n} samples: {naive_full:.0f} s")
    print(f"    ratio naive / near_pairs: {naive_full / fast:.0f}x")


def bench_sharding(args) -> None:
    from geoloc.sharding import shard_dataset
    from geoloc.synth import generate_dataset

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_dedup_"))
    root = work / "data"
    if not (root / "train_ground_truth.csv").is_file():
        generate_dataset(root, n_train=args.data_train, n_test=args.data_test, seed=0, num_states=50)
    times, near = {}, None
    for _ in range(2):
        for mode in ("off", "report"):
            manifest, t = timed(
                shard_dataset, root, work / f"shards_{mode}", workers=args.workers, progress=False, dedup=mode
            )
            times[mode] = min(times.get(mode, t), t)
            near = manifest["near_duplicates"] if mode == "report" else near
    n = args.data_train + args.data_test
    print(
        f"(2) sharding {args.data_train} train + {args.data_test} test generated samples (256 px), "
        f"--workers {args.workers}, best of 2"
    )
    for mode, t in times.items():
        print(f"    --dedup {mode}: {t:.1f} s ({n / t:.0f} samples/s)")
    print(
        f"    hashing + matching overhead: {times['report'] / times['off']:.2f}x the off run "
        f"(+{times['report'] - times['off']:.1f} s)"
    )
    print(
        f"    pairs found: train-test {near['train_test']}, train-val {near['train_val']}, "
        f"train-train {near['train_train']}"
    )
    return root


COPY_KINDS = ("q50", "q70", "q90", "r240", "r272", "k240", "k240q70")


def copy_bytes(data: bytes, kind: str) -> bytes:
    """A copy of a JPEG: qNN re-encoded; rNNN resized to NNN and back (q75); k240 kept at 240 px (q85)."""
    from PIL import Image

    img, buf = Image.open(io.BytesIO(data)).convert("RGB"), io.BytesIO()
    if kind.startswith("q"):
        img.save(buf, format="JPEG", quality=int(kind[1:]))
    elif kind.startswith("r"):
        side = int(kind[1:])
        img.resize((side, side), Image.BICUBIC).resize(img.size, Image.BICUBIC).save(buf, "JPEG", quality=75)
    else:
        img.resize((240, 240), Image.BICUBIC).save(
            buf, format="JPEG", quality=70 if kind.endswith("q70") else 85
        )
    return buf.getvalue()


def sample_hashes(views: list[bytes]) -> np.ndarray:
    """``(V, WORDS)`` hash words of one sample's view bytes."""
    from PIL import Image

    rows = []
    for data in views:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            rows.append(np.frombuffer(dedup.view_hash(img), dtype="<u8"))
    return np.stack(rows)


def bits_per_view(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean differing bits per view between ``a`` ``(..., V, WORDS)`` and ``b``."""
    return np.bitwise_count(a ^ b).sum(-1).mean(-1)


def load_views(args, root: Path):
    """The generated set's table (train then test rows, with labels) and every sample's 4 view bytes."""
    import pandas as pd

    from geoloc import contract
    from geoloc.synth import ANSWERS_CSV

    table = pd.concat(
        [pd.read_csv(root / n, dtype={"sample_id": str}) for n in (contract.TRAIN_CSV, ANSWERS_CSV)]
    )
    folders = [contract.TRAIN_IMAGES] * args.data_train + [contract.TEST_IMAGES] * args.data_test
    views = [
        [(root / folder / f"img_{sid}_{v}.jpg").read_bytes() for v in contract.VIEWS]
        for sid, folder in zip(table["sample_id"], folders)
    ]
    return table, views


def all_pair_distances(codes: np.ndarray) -> np.ndarray:
    """``(N, N)`` mean differing bits per view, ``inf`` on and below the diagonal."""
    n = len(codes)
    dist = np.full((n, n), np.inf)
    for s in range(0, n, 128):
        dist[s : s + 128] = bits_per_view(codes[s : s + 128, None], codes[None])
    dist[np.tril_indices(n)] = np.inf
    return dist


def print_copies(codes, views, n_copies: int) -> None:
    for kind in COPY_KINDS:
        copies = np.stack([sample_hashes([copy_bytes(d, kind) for d in v]) for v in views[:n_copies]])
        d = bits_per_view(codes[:n_copies], copies)
        coarse = np.bitwise_count(codes[:n_copies, :, 0] ^ copies[:, :, 0]).mean(-1)
        found = (d <= dedup.DEFAULT_THRESHOLD) & (coarse <= dedup.COARSE_PER_VIEW)
        print(
            f"    copy {kind:8s}: mean {d.mean():6.1f}  p99 {np.percentile(d, 99):6.1f}  max {d.max():6.1f}  "
            f"(coarse max {coarse.max():.2f}/{dedup.COARSE_PER_VIEW}); found {100 * found.mean():.1f}%"
        )


def print_distinct(dist: np.ndarray, table) -> None:
    from geoloc.geo import haversine_km

    flat = dist[np.isfinite(dist)]
    print(
        f"    distinct pairs ({len(flat)}): min {flat.min():.1f}  0.001% {np.percentile(flat, 0.001):.1f}  "
        f"0.1% {np.percentile(flat, 0.1):.1f}  median {np.median(flat):.1f}; "
        f"<= threshold: {(flat <= dedup.DEFAULT_THRESHOLD).sum()}"
    )
    lat, lon, state = table["latitude"].to_numpy(), table["longitude"].to_numpy(), table["state"].to_numpy()
    for k in np.argsort(dist, axis=None)[:5]:
        i, j = divmod(int(k), len(dist))
        km = float(haversine_km(lat[i], lon[i], lat[j], lon[j]))
        print(f"    closest: {dist[i, j]:.1f} bits/view, {state[i]} / {state[j]}, {km:.1f} km apart")


def print_standard_phash(views, n_copies: int) -> None:
    """(4) The usual 64-bit pHash (``imagehash.phash`` defaults) on the same data, for comparison."""
    import imagehash
    from PIL import Image

    def words(vs):
        return np.array([[int(str(imagehash.phash(Image.open(io.BytesIO(d)))), 16) for d in vs]], np.uint64).T

    codes = np.stack([words(v) for v in views])  # (N, V, 1)
    worst = max(
        bits_per_view(
            codes[:n_copies], np.stack([words([copy_bytes(d, k) for d in v]) for v in views[:n_copies]])
        ).max()
        for k in ("q70", "r240", "k240")
    )
    dist = all_pair_distances(codes)
    print(
        f"(4) the usual 64-bit pHash: copies (q70, r240, k240) up to {worst:.2f} of 64 bits/view; distinct pairs "
        f"within that: {(dist <= worst).sum()} of {np.isfinite(dist).sum()}, min {dist.min():.2f}"
    )


def bench_distributions(args, root: Path) -> None:
    table, views = load_views(args, root)
    codes = np.stack([sample_hashes(v) for v in views])  # (N, V, WORDS)
    print(f"(3) bits/view (of 1024) on the data of (2); threshold {dedup.DEFAULT_THRESHOLD}")
    print_copies(codes, views, args.copies)
    print_distinct(all_pair_distances(codes), table)
    print_standard_phash(views, args.copies)


def main(argv=None) -> None:
    args = parse_args(argv)
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"numpy {np.__version__}"
    )
    bench_matching(args)
    if args.data_train:
        root = bench_sharding(args)
        bench_distributions(args, root)


if __name__ == "__main__":
    main()
