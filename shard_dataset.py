"""Shard a competition data root into WebDataset tars + manifest.json (see geoloc/sharding/).

    python shard_dataset.py --data-root ROOT --out DIR [--val-fraction 0.1] [--seed 0] \\
        [--samples-per-shard 1000] [--workers N] [--strict] [--allow-outside-root] \\
        [--dedup {report,drop,off}] [--dedup-threshold 128]
"""

from geoloc.sharding import main

if __name__ == "__main__":
    main()
