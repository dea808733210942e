"""Loaders: a stage list run in DataLoader workers, and the factories that check shards and ranks first.

:func:`make_train_loader` and :func:`make_eval_loader` refuse what would otherwise fail or mislead later
(one string for a shard list, a rank without shards, no full batch per rank), drop empty train shards and
warn when the shards split unevenly over the workers (:func:`suggest_samples_per_shard` says how to
reshard).
"""

from __future__ import annotations

import logging
import os
from itertools import islice

import torch
import webdataset as wds
from torch.utils.data import DataLoader

from geoloc.data.stages import eval_stages, shuffle_shards, split_by_rank, train_stages
from geoloc.data.stats import LoadStats
from geoloc.errors import ShardError
from geoloc.labels import LabelEncoder

log = logging.getLogger(__package__)  # one logger name for the whole loader: "geoloc.data"


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
        try:
            for n, batch in enumerate(islice(self.dataloader(), self.num_batches), start=1):
                yield batch
        except ShardError as err:  # re-raised by the DataLoader with the worker's traceback as text
            raise ShardError(_worker_message(err)) from None
        stats = self.stats.as_dict()
        if stats["tar_errors"] or stats["bad_views"] or stats["incomplete_samples"]:
            log.warning("data: unreadable shard data or views were skipped: %s", self.stats)
        if self.num_batches is not None and n < self.num_batches:
            raise RuntimeError(
                f"train data ran dry after {n} of {self.num_batches} batches: no readable sample in a "
                f"full pass over this rank's shards {self.shards}; see the warnings above"
            )


def _worker_message(err: Exception) -> str:
    """The original message of an error a DataLoader worker raised (torch wraps it in its traceback)."""
    text = str(err)
    marker = f"{type(err).__name__}: "
    return text.rsplit(marker, 1)[1].strip() if "Original Traceback" in text and marker in text else text


# ----------------------------------------------------------------------------- shard checks


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


# ----------------------------------------------------------------------------- factories


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
    on_short: str = "error",
) -> Loader:
    """Endless shuffled stream cut to ``num_samples // (world_size * batch_size)`` full batches per rank.

    ``encoder`` is the manifest's label encoder (``LabelEncoder.from_dict(manifest["label_encoder"])``);
    ``shard_counts`` its ``splits[split]["shards"]`` (``{file name: samples}``): empty shards are dropped
    before the rank split, and a shard holding another number of samples is an error or, with
    ``on_short="skip"``, a counted skip (``geoloc.data.stages.read_tars``). ``pin_memory``: see :class:`Loader`.
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
        shuffle_buffer=shuffle_buffer, encoder=encoder, stats=stats, expected=shard_counts, on_short=on_short,
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
    shard_counts: dict[str, int] | None = None,
    on_short: str = "error",
) -> Loader:
    """Every sample once across ranks, in shard order, last batch possibly short.

    ``shard_counts`` (the manifest's ``{file name: samples}``): a shard holding another number of complete
    samples raises naming it (``on_short="skip"``: counted and warned about instead)."""
    urls = _shard_list(shards)
    rank_urls = _shards_of_rank(urls, rank, world_size)
    stats = LoadStats()
    stages = eval_stages(
        urls, batch_size=batch_size, rank=rank, world_size=world_size, encoder=encoder, stats=stats,
        expected=shard_counts, on_short=on_short,
    )  # fmt: skip
    return Loader(stages, min(num_workers, len(rank_urls)), stats, pin_memory=pin_memory, shards=rank_urls)
