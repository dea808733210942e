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

Modules, in dependency order: ``specs`` (shard specs and the manifest), ``stats`` (:class:`LoadStats`),
``decoding`` (images, samples, batches), ``stages`` (the declared stage lists and each stage),
``loader`` (:class:`Loader` and its factories). Every public name is re-exported here: import from
``geoloc.data``. All modules log to the ``geoloc.data`` logger.
"""

from geoloc.data.decoding import IMAGE_SIZE, ImageDecodeError, collate, decode_image, decode_sample
from geoloc.data.loader import (
    Loader,
    drop_empty_shards,
    make_eval_loader,
    make_train_loader,
    suggest_samples_per_shard,
)
from geoloc.data.shardset import ShardSet, check_manifest
from geoloc.data.specs import read_manifest, resolve_shards
from geoloc.data.stages import (
    decode,
    eval_stages,
    read_tars,
    shard_list,
    shuffle_samples,
    shuffle_shards,
    split_by_rank,
    split_by_worker,
    to_batch,
    train_stages,
)
from geoloc.data.stats import LoadStats

__all__ = [
    "IMAGE_SIZE",
    "ImageDecodeError",
    "LoadStats",
    "Loader",
    "ShardSet",
    "check_manifest",
    "collate",
    "decode",
    "decode_image",
    "decode_sample",
    "drop_empty_shards",
    "eval_stages",
    "make_eval_loader",
    "make_train_loader",
    "read_manifest",
    "read_tars",
    "resolve_shards",
    "shard_list",
    "shuffle_samples",
    "shuffle_shards",
    "split_by_rank",
    "split_by_worker",
    "suggest_samples_per_shard",
    "to_batch",
    "train_stages",
]
