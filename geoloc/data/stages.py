"""The declared stage lists of the train and eval pipelines, then each stage in pipeline order.

A stage is a generator function ``stage(src, **params)`` over the previous stage's items (the first
takes no ``src``); :func:`train_stages` and :func:`eval_stages` bind the parameters with ``partial``.
The stages run inside DataLoader workers, which pickle them: keep them module-level functions.
"""

from __future__ import annotations

import logging
import os
import random
from functools import partial
from itertools import islice

import webdataset as wds
from torch.utils.data import get_worker_info

from geoloc.data.decoding import collate, decode_sample
from geoloc.data.stats import LoadStats
from geoloc.errors import ShardError
from geoloc.labels import LabelEncoder

log = logging.getLogger(__package__)  # one logger name for the whole loader: "geoloc.data"


# ----------------------------------------------------------------------------- declared pipelines


def train_stages(
    urls, *, batch_size, epoch, seed, rank, world_size, shuffle_buffer, encoder, stats, expected=None,
    on_short="error",
):  # fmt: skip
    """Shuffled, repeated, full batches only; cut to an epoch by :class:`~geoloc.data.loader.Loader`."""
    return [
        partial(shard_list, urls),
        partial(shuffle_shards, seed=seed, epoch=epoch),
        partial(split_by_rank, rank=rank, world_size=world_size),
        split_by_worker,
        partial(read_tars, stats=stats, repeat=True, expected=expected, on_short=on_short),
        partial(shuffle_samples, bufsize=shuffle_buffer, seed=seed, epoch=epoch, rank=rank),
        partial(decode, encoder=encoder, stats=stats),
        partial(to_batch, batch_size=batch_size, partial_last=False),
    ]


def eval_stages(urls, *, batch_size, rank, world_size, encoder, stats, expected=None, on_short="error"):
    """Every sample once, in shard order, the last batch possibly short."""
    return [
        partial(shard_list, urls),
        partial(split_by_rank, rank=rank, world_size=world_size),
        split_by_worker,
        partial(read_tars, stats=stats, expected=expected, on_short=on_short),
        partial(decode, encoder=encoder, stats=stats),
        partial(to_batch, batch_size=batch_size, partial_last=True),
    ]


# ----------------------------------------------------------------------------- shard stages


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


# ----------------------------------------------------------------------------- sample stages


def read_tars(src, stats: LoadStats, repeat: bool = False, expected=None, on_short: str = "error"):
    """Shard URLs -> complete raw samples (dict of member bytes, with their ``.json``); errors go to ``stats``.

    A sample without its ``.json`` (a tar cut mid-sample) is counted and left out. ``expected`` maps shard
    file names to the manifest's sample counts: a shard yielding another number of complete samples
    (truncated, replaced) raises :class:`~geoloc.errors.ShardError` naming it, or with ``on_short="skip"``
    is read as it is, warned about and counted (``short_shards``), checked once per worker.
    ``repeat``: loop over the shards until a full pass yields nothing; then warn and end, so that this
    worker stops and the rank's other workers go on (:class:`~geoloc.data.loader.Loader` raises if the
    whole rank runs dry).
    """
    urls, checked = list(src), set()
    while urls:
        count = 0
        for url in urls:
            n = 0
            for sample in wds.tarfile_samples([{"url": url}], handler=stats.tar_error):
                if _complete(sample, stats):
                    n += 1
                    yield sample
            if url not in checked:
                checked.add(url)
                _check_count(url, n, expected, on_short, stats)
            count += n
        if repeat and count == 0:  # repeating would spin forever
            log.warning("no readable sample in a full pass over shards %s: this worker stops", urls)
        if not repeat or count == 0:
            return


def _complete(sample: dict, stats: LoadStats) -> bool:
    if "json" in sample:
        return True
    log.warning("%s: sample %r has no .json member (tar cut mid-sample?); left out", sample.get("__url__"),
                sample.get("__key__"))  # fmt: skip
    stats.add("incomplete_samples")
    return False


def _check_count(url: str, n: int, expected: dict | None, on_short: str, stats: LoadStats) -> None:
    """Compare a shard's complete samples with the manifest's count (see :func:`read_tars`)."""
    want = None if expected is None else expected.get(os.path.basename(url))
    if want is None or n == want:
        return
    what = f"{url}: {n} complete samples, the manifest says {want} (truncated or replaced shard?)"
    if on_short != "skip":
        raise ShardError(f"{what}; reshard, or train with data.on_short_shard=skip to use what is there")
    log.warning("%s; using what is there (data.on_short_shard=skip)", what)
    stats.add("short_shards")


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
    """Raw samples -> sample dicts (:func:`~geoloc.data.decoding.decode_sample`)."""
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
