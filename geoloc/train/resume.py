"""What a resume may change: the run a checkpoint belongs to, and the check that ``--resume`` continues it.

Every checkpoint records its run (:func:`run_info`): the resolved config, the label encoder, the train
and val shard names with their sample counts, and the world size. ``--resume`` then:

- refuses another label set or another shard set (classes would be silently remapped, epochs mean
  other data);
- refuses a changed config key that the checkpointed state depends on (model, loss, learning rates,
  batch sizes, seeds, ...: the optimiser and scheduler would keep the OLD values while config.yaml
  records the new ones), naming each key with its old and new value;
- takes the new value of the keys in :data:`TAKEN` and :data:`TAKEN_SECTIONS` (how long to train, how
  often to log or save, where to cache, how many workers, how outputs are decoded), and says so;
- refuses another world size under DeepSpeed (its optimiser state is partitioned per rank); without
  DeepSpeed it warns (the data order then differs from the uninterrupted run).
"""

from __future__ import annotations

from geoloc.errors import CheckpointError

# config keys a resumed run may change; all others must equal the checkpoint's
TAKEN = frozenset({
    "train.epochs_frozen", "train.epochs_finetune", "train.patience", "train.save_every_steps",
    "train.keep_checkpoints", "train.log_every", "train.eval_batch_size", "train.cache_dir",
    "train.dist_timeout_s", "data.num_workers", "data.on_short_shard", "model.compile", "train.build_index",
})  # fmt: skip
TAKEN_SECTIONS = ("decode.",)  # how outputs are decoded never changes the trained state


def run_info(config: dict, manifest: dict, splits: dict[str, str], world_size: int, deepspeed: bool) -> dict:
    """The JSON description of a run that every checkpoint carries."""
    return {
        "config": config,
        "labels": manifest["label_encoder"],
        "shards": {role: manifest["splits"][split]["shards"] for role, split in splits.items()},
        "world_size": world_size,
        "deepspeed": deepspeed,
    }


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"train": {"seed": 0}}`` -> ``{"train.seed": 0}``."""
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        out |= flatten(value, f"{name}.") if isinstance(value, dict) else {name: value}
    return out


def config_changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """``(taken, refused)``: ``key: old -> new`` lines for every changed key, split by :data:`TAKEN`."""
    old, new = flatten(saved), flatten(current)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    lines = {k: f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed}
    taken = {k for k in changed if k in TAKEN or k.startswith(TAKEN_SECTIONS)}
    return [lines[k] for k in changed if k in taken], [lines[k] for k in changed if k not in taken]


def _shard_diff(saved: dict, current: dict) -> list[str]:
    lines = []
    for role in sorted(saved.keys() | current.keys()):
        old, new = saved.get(role, {}), current.get(role, {})
        gone, added = sorted(old.keys() - new.keys()), sorted(new.keys() - old.keys())
        recounted = sorted(k for k in old.keys() & new.keys() if old[k] != new[k])
        lines += [f"{role}: missing {gone[:5]}"] * bool(gone) + [f"{role}: new {added[:5]}"] * bool(added)
        lines += [f"{role}: other sample counts in {recounted[:5]}"] * bool(recounted)
    return lines


def check_resumable(path, saved: dict, current: dict) -> list[str]:
    """Raise :class:`CheckpointError` if checkpoint ``path`` (run ``saved``) cannot continue run
    ``current``; else return the notes to print (taken keys, a changed world size)."""
    hint = "resume with the same data and config, or start a new run from its weights with --init-from"
    if saved.get("labels") != current["labels"]:
        raise CheckpointError(
            f"{path}: trained on states {saved.get('labels', {}).get('state_indices')}, the shards' manifest "
            f"has {current['labels']['state_indices']}: the classes would be remapped; {hint}"
        )
    shards = _shard_diff(saved.get("shards", {}), current["shards"])
    if shards:
        raise CheckpointError(f"{path}: another shard set than this run's ({'; '.join(shards)}); {hint}")
    taken, refused = config_changes(saved.get("config", {}), current["config"])
    if refused:
        raise CheckpointError(
            f"{path}: the config differs in keys a resume keeps: {'; '.join(refused)}; {hint}"
        )
    notes = [f"resume takes the new {line}" for line in taken]
    if saved.get("world_size") != current["world_size"]:
        if current["deepspeed"]:
            raise CheckpointError(
                f"{path}: written by {saved.get('world_size')} DeepSpeed ranks, this run has "
                f"{current['world_size']}: ZeRO partitions cannot be redistributed; {hint}"
            )
        notes.append(
            f"resume on {current['world_size']} ranks of a run of {saved.get('world_size')}: the weights and "
            "optimiser continue exactly, the data order does not"
        )
    return notes
