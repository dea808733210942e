"""Geocell build time and exact kNN search time at the competition's scale, against baselines.

    OMP_NUM_THREADS=2 python bench/retrieval_cells.py [--points 66000] [--queries 16000] [--dim 768]

(a) cells: ``geoloc.geocells.build_geocells`` (nested in states, sizes 30..60) on ``--points`` points drawn
    inside 45 real state outlines with imbalanced counts, against one global scikit-learn ``KMeans`` with
    the same number of clusters (not nested, sizes unbounded): the plain way to get that many cells.
(b) search: top-5 cosine neighbours of ``--queries`` random queries in an index of ``--points`` x
    ``--dim`` embeddings on this CPU: ``EmbeddingIndex.search`` (chunked matmul + topk, 256 MB blocks)
    against scikit-learn ``NearestNeighbors(algorithm="brute", metric="cosine")``, FAISS ``IndexFlatIP``
    when installed, and (``--big-matmul``) one unchunked ``(Q, N)`` matmul + topk (Q x N x 4 bytes!).
    Every method must return the same neighbours; the agreement is printed.

Ratios are baseline time / our time (> 1: ours is faster). Record the figures in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def make_points(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(n, 2) points inside 45 states (Zipf-like counts, every state >= 1) and their state indices."""
    from geoloc.geography import STATE_NAMES, sample_points

    states = np.sort(rng.choice(50, size=45, replace=False))
    share = rng.permutation(1.0 / np.arange(1, 46) ** 0.8)
    counts = 1 + rng.multinomial(n - 45, share / share.sum())
    latlon = np.concatenate([sample_points(STATE_NAMES[s], c, rng) for s, c in zip(states, counts)])
    return latlon, np.repeat(states, counts)


def bench_cells(n: int, seed: int) -> None:
    from sklearn.cluster import KMeans

    from geoloc.geocells import build_geocells, to_unit

    latlon, state = make_points(n, np.random.default_rng(seed))
    build_geocells(latlon[:500], state[:500], 30, 60, seed=seed)  # warm-up: imports, thread pools
    (cells, _), ours = timed(lambda: build_geocells(latlon, state, 30, 60, seed=seed))
    k = cells.num_cells
    km, base = timed(lambda: KMeans(n_clusters=k, n_init=1, random_state=seed).fit(to_unit(latlon)))
    sizes = np.bincount(km.labels_, minlength=k)
    print(f"\n(a) geocells of {n} points in 45 states -> {k} cells")
    print(
        f"    build_geocells (nested, 30..60)   {ours:8.2f} s  sizes {cells.count.min()}..{cells.count.max()}"
    )
    print(f"    global KMeans, same K (baseline)  {base:8.2f} s  sizes {sizes.min()}..{sizes.max()}")
    print(f"    ratio baseline/ours               {base / ours:8.2f}")


def bench_search(n: int, q: int, dim: int, seed: int, big: bool) -> None:
    from sklearn.neighbors import NearestNeighbors

    from geoloc.retrieval import EmbeddingIndex

    g = torch.Generator().manual_seed(seed)
    emb, queries = torch.randn(n, dim, generator=g), torch.randn(q, dim, generator=g)
    index = EmbeddingIndex.build(emb, torch.zeros(n, dtype=torch.long), torch.zeros(n, 2))
    (_, ours_idx), ours = timed(lambda: index.search(queries, k=5))
    print(
        f"\n(b) top-5 cosine search, {q} queries x {n} items x {dim} dims, CPU, {torch.get_num_threads()} threads"
    )
    print(f"    EmbeddingIndex.search (chunked)   {ours:8.2f} s  {q / ours:9.0f} queries/s")
    nn = NearestNeighbors(n_neighbors=5, algorithm="brute", metric="cosine").fit(emb.numpy())
    (_, sk_idx), base = timed(lambda: nn.kneighbors(queries.numpy()))
    print(f"    sklearn brute cosine (baseline)   {base:8.2f} s  agree {_agree(ours_idx, sk_idx):.4f}")
    print(f"    ratio sklearn/ours                {base / ours:8.2f}")
    _other_backends(index, queries, ours, ours_idx, big)


def _other_backends(index, queries, ours: float, ours_idx, big: bool) -> None:
    try:
        import faiss  # noqa: F401

        (_, f_idx), t = timed(lambda: index.search(queries, k=5, backend="faiss"))
        print(
            f"    faiss IndexFlatIP                 {t:8.2f} s  agree {_agree(ours_idx, f_idx):.4f}  ratio {t / ours:.2f}"
        )
    except ImportError:
        print("    faiss not installed: skipped")
    if big:
        (_, b_idx), t = timed(lambda: index.search(queries, k=5, max_block_bytes=1 << 62))
        print(
            f"    one big matmul + topk             {t:8.2f} s  agree {_agree(ours_idx, b_idx):.4f}  ratio {t / ours:.2f}"
        )


def _agree(a, b) -> float:
    """Share of queries whose 5 neighbour sets are equal."""
    a, b = np.sort(np.asarray(a), 1), np.sort(np.asarray(b), 1)
    return float((a == b).all(1).mean())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", type=int, default=66000, help="training points (cells) = index items (search)")
    p.add_argument("--queries", type=int, default=16000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--big-matmul", action="store_true", help="also time one unchunked (Q, N) matmul")
    args = p.parse_args(argv)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    bench_cells(args.points, args.seed)
    bench_search(args.points, args.queries, args.dim, args.seed, args.big_matmul)


if __name__ == "__main__":
    main()
