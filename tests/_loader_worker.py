"""One rank of the 2-process loader test (tests/test_data.py); writes what it saw to OUT/rank<r>.json.

    torchrun --standalone --nproc_per_node 2 tests/_loader_worker.py --shards DIR --out OUT

Every train batch is followed by an all_reduce, so unequal batch counts per rank would hang (and time
out) instead of passing.
"""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from geoloc import data as D
from geoloc.labels import LabelEncoder


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="directory with train-*.tar, val-*.tar, manifest.json")
    p.add_argument("--out", required=True, help="directory for rank<r>.json")
    p.add_argument("--batch-size", type=int, default=3, help="per-rank batch size")
    p.add_argument("--epochs", type=int, default=2, help="train epochs to run")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed")
    return p.parse_args()


def main():
    args = parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, f"expected 2 processes, got {world}"
    encoder = LabelEncoder.from_dict(D.read_manifest(args.shards)["label_encoder"])
    train = D.resolve_shards(args.shards, "train")
    num_samples = sum(1 for _ in D.read_tars(iter(train), D.LoadStats()))
    common = {"rank": rank, "world_size": world, "num_workers": 2, "encoder": encoder}
    result = {"rank": rank, "world_size": world, "train_ids": [], "shard_order": []}
    for epoch in range(args.epochs):
        loader = D.make_train_loader(
            train, batch_size=args.batch_size, num_samples=num_samples, epoch=epoch, seed=args.seed,
            shuffle_buffer=4, **common,
        )  # fmt: skip
        ids = []
        for batch in loader:
            dist.all_reduce(torch.ones(1))  # a collective per step, as DDP does
            ids += batch["sample_id"]
        result["train_ids"].append(ids)
        result["shard_order"].append([Path(u).name for u in D.shuffle_shards(iter(train), args.seed, epoch)])
    val = D.make_eval_loader(D.resolve_shards(args.shards, "val"), batch_size=2, **common)
    result["val_ids"] = [i for batch in val for i in batch["sample_id"]]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
