"""Train a geolocation model: frozen-backbone phase on cached embeddings, then fine-tuning.

    accelerate launch --config_file accelerate_configs/4xa100.yaml train.py --config cfg.yaml \
        --shards shards/ --output-dir runs/exp1 [--preset smoke] [--phase both] [--resume latest] [key=value ...]

`python train.py --help` explains every flag; the run writes `<output-dir>/model/` for infer.py.
"""

import sys

from geoloc.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
