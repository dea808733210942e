"""Phase-1 embedding cache: every view's backbone embedding of the train and val splits, computed once.

With the backbone frozen, its output for a view never changes, so phase 1 trains fusion and heads on
``(N, V, D)`` tensors instead of running the backbone every epoch. The embeddings are computed with the
eval loader spread over all ranks (each sample exactly once), gathered by sample id onto every rank,
sorted by id (so the table does not depend on the number of ranks) and saved under
``cfg.train.cache_dir/<key>/<split>.pt``. The key hashes everything the numbers depend on: backbone
(name and file fingerprint, or the hub snapshot commit), pooling, input size, mean/std, compute dtype and
the shard manifest. When a head of the run reconstructs views (the ``vae`` head), each view's 16x16
thumbnail (``geoloc.heads.thumbnails``) is stored beside its embedding, so that head trains on the cache
too; such a cache has its own key (holding the thumbnail size), and a run without it keeps the cache it
had.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from geoloc.errors import TrainingError
from geoloc.faults import fault_point
from geoloc.heads import THUMB_SIZE, thumbnails

CACHE_VERSION = 1
DEFAULT_CACHE_DIR = "~/.cache/geoloc/embeddings"


@dataclass
class EmbeddingTable:
    """One split's per-view embeddings, rows sorted by sample id."""

    sample_id: list[str]
    emb: torch.Tensor  # (N, V, D) backbone output per view, zeros where a view is missing
    view_mask: torch.Tensor  # (N, V) bool
    label: torch.Tensor  # (N,) int64 contiguous class
    latlon: torch.Tensor  # (N, 2) float32 degrees
    thumb: torch.Tensor | None = None  # (N, V, 3, T, T) uint8 per view (zeros where missing), or None

    def __len__(self) -> int:
        return len(self.sample_id)

    def rows(self, index: torch.Tensor) -> dict:
        """A batch dict like the loader's, with ``emb`` (B, V, D) in place of ``images``."""
        return {
            "emb": self.emb[index],
            "view_mask": self.view_mask[index],
            "label": self.label[index],
            "latlon": self.latlon[index],
            "sample_id": [self.sample_id[i] for i in index.tolist()],
        } | ({} if self.thumb is None else {"thumb": self.thumb[index]})


# ----------------------------------------------------------------------------- key and files


def _backbone_fingerprint(backbone: str) -> list:
    """Names, sizes and mtimes of a local checkpoint's files, or a hub id's snapshot commit."""
    path = Path(backbone)
    if not path.is_dir():
        return ["snapshot", hub_snapshot(backbone)]
    return sorted((f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in path.iterdir() if f.is_file())


def hub_snapshot(repo_id: str) -> str | None:
    """The commit of the locally cached hub snapshot ``from_pretrained`` loads (``refs/main``), offline.

    The backbone is built before the cache key is needed, so the snapshot is in the HF cache; a new hub
    revision then gets a new key instead of reusing embeddings of the old weights. None if not cached.
    """
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")  # .../snapshots/<commit>/config.json
    return Path(found).parent.name if isinstance(found, str) else None


def cache_key(cfg, preprocess: dict, manifest: dict, dtype: torch.dtype) -> str:
    """A short hash of everything the cached numbers depend on."""
    payload = {
        "version": CACHE_VERSION,
        "backbone": cfg.model.backbone,
        "backbone_files": _backbone_fingerprint(cfg.model.backbone),
        "pooling": cfg.model.pooling,
        "preprocess": {k: preprocess[k] for k in ("image_size", "mean", "std")},
        "dtype": str(dtype),
        "manifest": hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest(),
    }
    if with_thumbnails(cfg):  # only then: a run without the vae head keeps its cache
        payload["thumbnail"] = THUMB_SIZE
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def with_thumbnails(cfg) -> bool:
    """Whether a head of ``cfg.model.heads`` reconstructs views (and the cache must hold thumbnails)."""
    from geoloc.heads import HEADS

    return any(HEADS[h].needs_thumbnails for h in cfg.model.heads)


def cache_root(cfg) -> Path:
    return Path(cfg.train.cache_dir or DEFAULT_CACHE_DIR).expanduser()


def save_table(table: EmbeddingTable, path: Path) -> None:
    """Write atomically (temp file + rename), so a crash never leaves a half-written cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(asdict(table), tmp)
    os.replace(tmp, path)


def load_table(path: Path) -> EmbeddingTable:
    return EmbeddingTable(**torch.load(path, map_location="cpu", weights_only=True))


# ----------------------------------------------------------------------------- computing


@torch.no_grad()
def embed_batches(
    model, loader, preprocessor, device, dtype: torch.dtype, bar: dict, thumbs: bool = False
) -> dict:
    """This rank's share of a split through ``model.forward_features`` -> dict of CPU tensors and ids
    (and each view's thumbnail with ``thumbs``).

    ``bar``: tqdm keywords (desc, total, disable).
    """
    parts = {"sample_id": [], "emb": [], "view_mask": [], "label": [], "latlon": []}
    if thumbs:
        parts["thumb"] = []
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    for batch in tqdm(loader, unit="batch", **bar):
        mask = batch["view_mask"].to(device, non_blocking=True)  # (B, V); pinned batches on CUDA
        images = batch["images"].to(device, non_blocking=True)  # (B, V, 3, S, S) uint8
        pixels = preprocessor(images)
        with autocast:
            parts["emb"].append(model.forward_features(pixels, mask).cpu())  # (B, V, D)
        if thumbs:  # a missing view's garbage stays out: (B, V, 3, T, T) uint8
            parts["thumb"].append((thumbnails(images) * mask[:, :, None, None, None]).cpu())
        for key in ("view_mask", "label", "latlon", "sample_id"):
            parts[key].append(batch[key])
        fault_point("cache.batch")  # crash tests: a cache half computed
    return parts


def eval_batches(count: int, batch_size: int, world_size: int) -> int:
    """Eval batches per rank for the progress bar: exact for even shards, an estimate otherwise."""
    return math.ceil(count / (batch_size * world_size))


def _cat(chunks: list, fallback: torch.Tensor) -> torch.Tensor:
    return torch.cat(chunks) if chunks else fallback


def _gather_rows(accelerator, local: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows ``(n_r, ...)`` in rank order -> ``(sum n_r, ...)`` on every rank.

    Tensors travel padded to the longest rank; bool/bf16 go as uint8/fp32, which gloo can reduce.
    """
    device = accelerator.device
    wire = local.to(torch.uint8) if local.dtype == torch.bool else local
    if device.type == "cpu" and wire.dtype == torch.bfloat16:
        wire = wire.float()  # exact: bf16 is a prefix of fp32
    counts = accelerator.gather(torch.tensor([local.shape[0]], device=device)).tolist()  # (world,)
    padded = accelerator.pad_across_processes(wire.to(device), dim=0)  # (max n_r, ...)
    everything = accelerator.gather(padded).cpu().split(padded.shape[0])  # world chunks
    return torch.cat([chunk[:n] for chunk, n in zip(everything, counts)]).to(local.dtype)


def gather_table(accelerator, parts: dict, emb_dim: int, num_views: int) -> EmbeddingTable:
    """Every rank's rows on every rank, sorted by sample id; a sample seen twice is an error."""
    from accelerate.utils import gather_object

    fallback = {
        "emb": torch.zeros(0, num_views, emb_dim),
        "view_mask": torch.zeros(0, num_views, dtype=torch.bool),
        "label": torch.zeros(0, dtype=torch.int64),
        "latlon": torch.zeros(0, 2),
    }
    if "thumb" in parts:
        fallback["thumb"] = torch.zeros(0, num_views, 3, THUMB_SIZE, THUMB_SIZE, dtype=torch.uint8)
    cols = {k: _gather_rows(accelerator, _cat(parts[k], v)) for k, v in fallback.items()}
    ids = [i for chunk in gather_object([[s for b in parts["sample_id"] for s in b]]) for i in chunk]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise RuntimeError(f"embedding cache: samples seen twice across ranks: {dup}")
    order = sorted(range(len(ids)), key=ids.__getitem__)
    index = torch.tensor(order, dtype=torch.long)
    return EmbeddingTable([ids[i] for i in order], **{k: v[index] for k, v in cols.items()})


def compute_tables(ctx, model, splits: tuple[str, ...]) -> dict[str, EmbeddingTable]:
    """Embed ``splits`` through the frozen backbone of ``model`` (eval mode), gathered on every rank."""
    acc, cfg = ctx.accelerator, ctx.cfg
    model.eval()
    ctx.preprocessor.eval()
    tables = {}
    for split in splits:
        loader = ctx.eval_loader(split, cfg.train.eval_batch_size)  # each shard's count checked
        total = eval_batches(ctx.counts[split], cfg.train.eval_batch_size, acc.num_processes)
        bar = {"desc": f"embed {split}", "total": total, "disable": not acc.is_main_process}
        thumbs = with_thumbnails(cfg)
        parts = embed_batches(model, loader, ctx.preprocessor, acc.device, ctx.eval_dtype, bar, thumbs)
        tables[split] = gather_table(acc, parts, model.embed_dim, ctx.num_views)
        short = (
            len(tables[split]) < ctx.counts[split] and split == "train" and cfg.data.on_short_shard == "skip"
        )
        if len(tables[split]) != ctx.counts[split] and not short:
            raise TrainingError(
                f"embedding cache: {len(tables[split])} {split} samples embedded, manifest has "
                f"{ctx.counts[split]} (see the loader warnings above)"
            )
    return tables


def load_or_compute(ctx, model, splits: tuple[str, ...] = ("train", "val")) -> dict[str, EmbeddingTable]:
    """Cached tables when every rank finds them, else compute and (local main processes) save them."""
    from accelerate.utils import gather_object

    folder = cache_root(ctx.cfg) / cache_key(ctx.cfg, ctx.preprocess, ctx.manifest, ctx.eval_dtype)
    paths = {s: folder / f"{s}.pt" for s in splits}
    if all(gather_object([all(p.is_file() for p in paths.values())])):  # every rank must agree
        return {s: load_table(p) for s, p in paths.items()}
    tables = compute_tables(ctx, model, splits)
    if ctx.accelerator.is_local_main_process:  # one writer per machine; rename makes races harmless
        for split, table in tables.items():
            save_table(table, paths[split])
    ctx.accelerator.wait_for_everyone()
    return tables


# ----------------------------------------------------------------------------- batching


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's row indices for one epoch: ``(steps, batch_size)``, the same ``steps`` on every rank.

    A permutation seeded by (seed, epoch) is wrapped around to fill ``ceil(n / (batch * world))`` full
    global batches, so every row is used at least once and no rank waits for another.
    """
    g = torch.Generator().manual_seed(hash_seed(seed, epoch))
    perm = torch.randperm(n, generator=g)
    steps = cached_steps(n, batch_size, world_size)
    need = steps * batch_size * world_size
    perm = perm.repeat(math.ceil(need / n))[:need]
    return perm.view(steps, world_size, batch_size)[:, rank]  # (steps, B)


def cached_steps(n: int, batch_size: int, world_size: int) -> int:
    """Batches per rank and epoch on a table of ``n`` rows (at least one)."""
    return max(1, math.ceil(n / (batch_size * world_size)))


def hash_seed(seed: int, epoch: int) -> int:
    """A generator seed from (seed, epoch) that differs for every pair."""
    return int(hashlib.sha256(f"cache-{seed}-{epoch}".encode()).hexdigest()[:15], 16)
