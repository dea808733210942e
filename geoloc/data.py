"""Streaming loader: a declared list of small WebDataset stages from shard URLs to uint8 batch dicts.

Train stages (:func:`train_stages`)::

    shard_list -> shuffle_shards(seed, epoch) -> split_by_rank -> split_by_worker
      -> read_tars(repeat=True) -> shuffle_samples -> decode -> to_batch(full batches only)

Eval stages (:func:`eval_stages`) drop both shuffles and the repeat and keep the last short batch.

Guarantees (see ARCHITECTURE.md for the batch dict):

- Training: every rank yields exactly ``num_samples // (world_size * batch_size)`` full batches per epoch,
  whatever the shard sizes: each worker repeats its shards and :class:`Loader` cuts the stream. The shard
  order depends on (seed, epoch) only, so all ranks agree on it before the rank split; the sample
  buffer is seeded by (seed, epoch, rank, worker), so a run with the same (seed, epoch, rank,
  world_size, num_workers) yields the same batches: a resumed run can skip batches and follow the
  uninterrupted one. An epoch is thus a sample count, not an exact pass: with uneven shards a rank
  may see a few samples twice and miss others in one epoch (the next epoch reshuffles the shards). A rank
  whose shard count is not a multiple of its workers makes this worse and logs a warning saying how to
  reshard.
- Empty shards: those the manifest counts as empty are dropped before the rank split; a training worker
  whose shards yield nothing in a full pass warns and ends (the rank's other workers go on); a rank left
  with no sample at all raises, naming its shards.
- Evaluation: shards are split by rank, then by worker; every sample comes out exactly once across all
  ranks, a rank without a shard yields nothing.
- Bad data never stops a run silently: unreadable tar data and missing/undecodable views are logged and
  counted in :class:`LoadStats` (shared by the DataLoader workers); a sample with a bad view is kept
  with that view zeroed and masked out.
- Batches are in pinned memory when CUDA is available, so ``.to(device, non_blocking=True)`` overlaps.

Do NOT pass these loaders through ``accelerator.prepare``: it re-shards or dispatches an iterable
dataset and silently loses or duplicates samples (measured: 20 of 40, or 24 unique of 32). The rank
split happens here, from the ``rank`` and ``world_size`` given by the caller.
"""

from __future__ import annotations

import io
import json
import logging
import math
import multiprocessing as mp
import os
import random
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, get_worker_info

from geoloc.contract import VIEWS
from geoloc.labels import LabelEncoder

log = logging.getLogger(__name__)

IMAGE_SIZE = 256  # side of the uint8 views in a batch; the Preprocessor resizes on the device
_URL_SCHEMES = ("pipe:", "http://", "https://", "gs://", "s3://", "ais://", "hf://", "file:")


class ImageDecodeError(ValueError):
    """Image bytes that PIL cannot decode."""


# ----------------------------------------------------------------------------- shard specs


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


# ----------------------------------------------------------------------------- error counting


class LoadStats:
    """Counters shared by the main process and its DataLoader workers (shared memory)."""

    KINDS = ("samples", "tar_errors", "missing_views", "bad_views")

    def __init__(self):
        self._counts = mp.Array("q", len(self.KINDS))  # survives pickling to workers at start-up

    def add(self, kind: str, n: int = 1) -> None:
        with self._counts.get_lock():
            self._counts[self.KINDS.index(kind)] += n

    def as_dict(self) -> dict[str, int]:
        return dict(zip(self.KINDS, self._counts[:]))

    def tar_error(self, exn: Exception) -> bool:
        """WebDataset handler: log and count an unreadable shard or member, go on with the next."""
        log.warning("skipped unreadable shard data: %r", exn)
        self.add("tar_errors")
        return True

    def __repr__(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.as_dict().items())


# ----------------------------------------------------------------------------- decoding


def _decode_rgb(data: bytes, size: int, what: str = "image") -> np.ndarray:
    """Image bytes -> read-only uint8 ``(size, size, 3)`` RGB array (the channels-last layout PIL gives).

    Any failure becomes :class:`ImageDecodeError` naming ``what``: on bad bytes PIL's plugins raise
    OSError, ValueError, SyntaxError, but also struct.error, IndexError, EOFError, NotImplementedError...
    and one escaping here would kill a DataLoader worker.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img if img.mode == "RGB" else img.convert("RGB")  # L, CMYK, P, RGBA, ...
            if img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            return np.asarray(img)
    except Exception as err:  # noqa: BLE001 (see above; KeyboardInterrupt and SystemExit still pass)
        raise ImageDecodeError(
            f"cannot decode {what} ({len(data)} bytes): {_error_name(err)}: {err}"
        ) from None


def _error_name(err: Exception) -> str:
    """``ValueError``, ``struct.error``, ``PIL.UnidentifiedImageError``: the module unless a builtin."""
    kind = type(err)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"


def decode_image(data: bytes, size: int = IMAGE_SIZE, what: str = "image") -> torch.Tensor:
    """JPEG/PNG bytes (any mode: RGB, L, CMYK, ...) -> uint8 ``(3, size, size)``, resized if needed."""
    return torch.from_numpy(_decode_rgb(data, size, what).copy()).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def _label(meta: dict, encoder: LabelEncoder | None, name: str) -> int:
    if meta.get("state_idx") is None:
        return -1
    if encoder is None:
        raise ValueError(f"{name}: labelled sample but no label encoder given (use the manifest's)")
    try:
        return int(encoder.encode([meta["state_idx"]])[0])
    except KeyError as err:
        raise KeyError(f"{name}: {err.args[0]}") from None


def _latlon(meta: dict) -> torch.Tensor:
    lat, lon = meta.get("lat"), meta.get("lon")
    if lat is None or lon is None:
        return torch.full((2,), float("nan"))
    return torch.tensor([lat, lon], dtype=torch.float32)


def _decode_view(data: bytes | None, name: str, view: str, stats: LoadStats | None) -> np.ndarray | None:
    if data is None:
        log.info("%s: view %s missing", name, view)
        if stats is not None:
            stats.add("missing_views")
        return None
    try:
        return _decode_rgb(data, IMAGE_SIZE, f"{name} view {view}")
    except ImageDecodeError as err:
        log.warning("view masked out: %s", err)
        if stats is not None:
            stats.add("bad_views")
        return None


def decode_sample(sample: dict, encoder: LabelEncoder | None = None, stats: LoadStats | None = None) -> dict:
    """A raw WebDataset sample -> images ``(4, 3, 256, 256)`` uint8, view_mask ``(4,)``, label, ...

    A missing or undecodable view becomes zeros with ``view_mask`` False (logged, counted); the sample
    is always kept. ``label`` is the contiguous class of ``state_idx`` (-1 when null). ``images`` is a
    channels-last view (decoded pixels are copied once, in PIL's layout; the device makes it planar).
    """
    name = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    if "json" not in sample:
        raise ValueError(f"{name}: sample has no .json member")
    meta = json.loads(sample["json"])
    pixels = np.zeros((len(VIEWS), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)  # (4, H, W, 3)
    mask = [False] * len(VIEWS)
    for k, view in enumerate(VIEWS):
        rgb = _decode_view(sample.get(f"{view}.jpg"), name, view, stats)
        if rgb is not None:
            pixels[k], mask[k] = rgb, True
    if stats is not None:
        stats.add("samples")
    return {
        "images": torch.from_numpy(pixels).permute(0, 3, 1, 2),  # (4, 3, 256, 256), channels-last strides
        "view_mask": torch.tensor(mask),  # (4,)
        "label": _label(meta, encoder, name),
        "latlon": _latlon(meta),  # (2,) NaN when unlabelled
        "sample_id": str(meta.get("sample_id", sample.get("__key__"))),
    }


def _batch_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Empty tensor; in a DataLoader worker it lives in shared memory, as torch's default_collate does.

    Sending a batch to the main process otherwise copies it into fresh shared memory: measured 3x
    slower per batch than decoding it on a 2-core VM (BENCHMARKS.md).
    """
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


def collate(samples: list[dict]) -> dict:
    """Per-sample dicts from :func:`decode_sample` -> a batch dict (ARCHITECTURE.md)."""
    # stacked channels-last: one plain copy per sample; a (B, 4, 3, H, W) view of (B, 4, H, W, 3) memory
    hwc = [s["images"].permute(0, 2, 3, 1) for s in samples]  # (4, H, W, 3) each
    images = torch.stack(hwc, out=_batch_buffer((len(hwc), *hwc[0].shape), torch.uint8))
    images = images.permute(0, 1, 4, 2, 3)
    return {
        "images": images,  # (B, 4, 3, 256, 256) uint8
        "view_mask": torch.stack([s["view_mask"] for s in samples]),  # (B, 4)
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),  # (B,)
        "latlon": torch.stack([s["latlon"] for s in samples]),  # (B, 2)
        "sample_id": [s["sample_id"] for s in samples],
    }


# ----------------------------------------------------------------------------- stages


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def shard_list(urls: list[str]):
    """First stage: the shard URLs, in the given order."""
    yield from urls


def shuffle_shards(src, seed: int, epoch: int):
    """Shuffle the whole shard list with a RNG seeded by (seed, epoch): identical on every rank."""
    urls = list(src)
    random.Random(f"shards-{seed}-{epoch}").shuffle(urls)
    yield from urls


def split_by_rank(src, rank: int, world_size: int):
    """Keep every ``world_size``-th shard starting at ``rank`` (rank given, not read from torch)."""
    yield from islice(src, rank, None, world_size)


def split_by_worker(src):
    """Keep this DataLoader worker's share of the rank's shards (all of them in the main process)."""
    worker, num_workers = _worker()
    yield from islice(src, worker, None, num_workers)


def read_tars(src, stats: LoadStats, repeat: bool = False):
    """Shard URLs -> raw samples (dict of member bytes); errors go to ``stats``.

    ``repeat``: loop over the shards until a full pass yields nothing; then warn and end, so that this
    worker stops and the rank's other workers go on (:class:`Loader` raises if the whole rank runs dry).
    """
    urls = list(src)
    while urls:
        count = 0
        for sample in wds.tarfile_samples(({"url": u} for u in urls), handler=stats.tar_error):
            count += 1
            yield sample
        if repeat and count == 0:  # repeating would spin forever
            log.warning("no readable sample in a full pass over shards %s: this worker stops", urls)
        if not repeat or count == 0:
            return


def shuffle_samples(src, bufsize: int, seed: int, epoch: int, rank: int):
    """Buffer shuffle seeded by (seed, epoch, rank, worker), so a rerun yields the same order."""
    if bufsize <= 1:
        yield from src
        return
    worker, _ = _worker()
    rng = random.Random(f"samples-{seed}-{epoch}-{rank}-{worker}")
    buf = []
    for sample in src:
        if len(buf) < bufsize:
            buf.append(sample)
            continue
        k = rng.randrange(bufsize)
        buf[k], sample = sample, buf[k]
        yield sample
    rng.shuffle(buf)
    yield from buf


def decode(src, encoder: LabelEncoder | None, stats: LoadStats):
    for sample in src:
        yield decode_sample(sample, encoder, stats)


def to_batch(src, batch_size: int, partial_last: bool):
    """Group decoded samples into batch dicts; the last short one only if ``partial_last``."""
    batch = []
    for sample in src:
        batch.append(sample)
        if len(batch) == batch_size:
            yield collate(batch)
            batch = []
    if batch and partial_last:
        yield collate(batch)


def train_stages(urls, *, batch_size, epoch, seed, rank, world_size, shuffle_buffer, encoder, stats):
    return [
        partial(shard_list, urls),
        partial(shuffle_shards, seed=seed, epoch=epoch),
        partial(split_by_rank, rank=rank, world_size=world_size),
        split_by_worker,
        partial(read_tars, stats=stats, repeat=True),
        partial(shuffle_samples, bufsize=shuffle_buffer, seed=seed, epoch=epoch, rank=rank),
        partial(decode, encoder=encoder, stats=stats),
        partial(to_batch, batch_size=batch_size, partial_last=False),
    ]


def eval_stages(urls, *, batch_size, rank, world_size, encoder, stats):
    return [
        partial(shard_list, urls),
        partial(split_by_rank, rank=rank, world_size=world_size),
        split_by_worker,
        partial(read_tars, stats=stats),
        partial(decode, encoder=encoder, stats=stats),
        partial(to_batch, batch_size=batch_size, partial_last=True),
    ]


# ----------------------------------------------------------------------------- loaders


class Loader:
    """Iterable of batch dicts over a stage list, run in ``num_workers`` DataLoader workers.

    ``num_batches`` (training) cuts the endless stream and gives ``len()``; if the stream ends sooner
    (no readable sample left in the rank's ``shards``) iterating raises. ``stats`` holds the counts.
    ``pin_memory`` (default: when CUDA is available) puts batches in page-locked memory, so that
    ``.to(device, non_blocking=True)`` is asynchronous.
    """

    def __init__(
        self,
        stages: list,
        num_workers: int,
        stats: LoadStats,
        num_batches: int | None = None,
        *,
        pin_memory: bool | None = None,
        shards: list[str] = (),
    ):
        self.pipeline = wds.DataPipeline(stages)
        self.num_workers = num_workers
        self.stats = stats
        self.num_batches = num_batches
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.shards = list(shards)

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("an eval loader has no length; count samples from the manifest")
        return self.num_batches

    def dataloader(self) -> DataLoader:
        # batch_size=None: the pipeline yields whole batches (collated in shared memory by the workers)
        return DataLoader(
            self.pipeline, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory
        )

    def __iter__(self):
        n = 0
        for n, batch in enumerate(islice(self.dataloader(), self.num_batches), start=1):
            yield batch
        stats = self.stats.as_dict()
        if stats["tar_errors"] or stats["bad_views"]:
            log.warning("data: unreadable shard data or views were skipped: %s", self.stats)
        if self.num_batches is not None and n < self.num_batches:
            raise RuntimeError(
                f"train data ran dry after {n} of {self.num_batches} batches: no readable sample in a "
                f"full pass over this rank's shards {self.shards}; see the warnings above"
            )


def _shard_list(shards) -> list[str]:
    """The shard URLs as a list. One string or path is refused: it would be read character by character,
    and which split of a directory it means is not known here."""
    if isinstance(shards, (str, os.PathLike)):
        raise TypeError(
            f"shards={str(shards)!r}: expected a list of shard URLs, got one string or path; "
            "pass resolve_shards(spec, split)"
        )
    return [str(s) for s in shards]


def _shards_of_rank(urls: list[str], rank: int, world_size: int) -> list[str]:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    return list(split_by_rank(urls, rank, world_size))


def drop_empty_shards(urls: list[str], shard_counts: dict[str, int] | None) -> list[str]:
    """``urls`` less those whose file name ``shard_counts`` maps to 0 samples (logged); unknown names stay.

    A DataLoader worker given only empty shards would have nothing to repeat.
    """
    empty = {u for u in urls if (shard_counts or {}).get(os.path.basename(u)) == 0}
    if empty:
        log.warning("skipped %d train shard(s) with 0 samples in the manifest: %s", len(empty), sorted(empty))
    return [u for u in urls if u not in empty]


def suggest_samples_per_shard(num_samples: int, num_shards: int, parts: int) -> int | None:
    """A ``--samples-per-shard`` giving a multiple of ``parts`` shards, at least ``num_shards`` of them.

    The sharder writes ``ceil(num_samples / samples_per_shard)`` shards per split. None when no value
    gives such a count (fewer samples than ``parts``).
    """
    first = -(-max(num_shards, 1) // parts) * parts  # the next multiple of parts
    for count in range(first, num_samples + 1, parts):
        per_shard = -(-num_samples // count)  # ceil
        if -(-num_samples // per_shard) == count:
            return per_shard
    return None


def _warn_uneven_workers(
    rank: int, rank_shards: int, workers: int, world_size: int, num_samples: int, num_shards: int
):
    parts = world_size * workers
    per_shard = suggest_samples_per_shard(num_samples, num_shards, parts)
    hint = f": --samples-per-shard {per_shard} for {num_samples} samples" if per_shard else ""
    log.warning(
        "rank %d: %d train shards for %d DataLoader workers, not a multiple: workers with fewer shards "
        "repeat theirs sooner, so each epoch sees some samples twice and misses others. Reshard into a "
        "multiple of %d ranks x %d workers = %d shards%s",
        rank, rank_shards, workers, world_size, workers, parts, hint,
    )  # fmt: skip


def make_train_loader(
    shards: list[str],
    *,
    batch_size: int,
    num_samples: int,
    epoch: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    shuffle_buffer: int = 1000,
    encoder: LabelEncoder | None = None,
    shard_counts: dict[str, int] | None = None,
    pin_memory: bool | None = None,
) -> Loader:
    """Endless shuffled stream cut to ``num_samples // (world_size * batch_size)`` full batches per rank.

    ``encoder`` is the manifest's label encoder (``LabelEncoder.from_dict(manifest["label_encoder"])``);
    ``shard_counts`` its ``splits[split]["shards"]`` (``{file name: samples}``): empty shards are dropped
    before the rank split. ``pin_memory``: see :class:`Loader`.
    """
    urls = drop_empty_shards(_shard_list(shards), shard_counts)
    num_batches = num_samples // (world_size * batch_size)
    if num_batches == 0:
        raise ValueError(
            f"num_samples={num_samples} < world_size*batch_size={world_size * batch_size}: "
            "no full batch per rank; lower the batch size"
        )
    rank_urls = _shards_of_rank(list(shuffle_shards(urls, seed, epoch)), rank, world_size)  # as the stages do
    if not rank_urls:
        raise ValueError(
            f"{len(urls)} train shard(s) for {world_size} ranks: rank {rank} has none; "
            "reshard with a smaller --samples-per-shard"
        )
    workers = min(num_workers, len(rank_urls))
    if len(rank_urls) % max(workers, 1):  # 0 workers: the main process reads them all
        _warn_uneven_workers(rank, len(rank_urls), workers, world_size, num_samples, len(urls))
    stats = LoadStats()
    stages = train_stages(
        urls, batch_size=batch_size, epoch=epoch, seed=seed, rank=rank, world_size=world_size,
        shuffle_buffer=shuffle_buffer, encoder=encoder, stats=stats,
    )  # fmt: skip
    return Loader(stages, workers, stats, num_batches, pin_memory=pin_memory, shards=rank_urls)


def make_eval_loader(
    shards: list[str],
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    encoder: LabelEncoder | None = None,
    pin_memory: bool | None = None,
) -> Loader:
    """Every sample once across ranks, in shard order, last batch possibly short."""
    urls = _shard_list(shards)
    rank_urls = _shards_of_rank(urls, rank, world_size)
    stats = LoadStats()
    stages = eval_stages(
        urls, batch_size=batch_size, rank=rank, world_size=world_size, encoder=encoder, stats=stats
    )
    return Loader(stages, min(num_workers, len(rank_urls)), stats, pin_memory=pin_memory, shards=rank_urls)
