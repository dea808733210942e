"""Several ``infer.py`` runs in ONE launch, so the layout matrix costs one launcher start per world size.

    accelerate launch ... tests/_infer_runs.py RUNS.json

``RUNS.json`` is a list of argv lists; each is a whole ``infer.py`` run on every rank (accelerator,
models, loader, predict, the gather, the outputs). Exits with the first non-zero status.
"""

import json
import sys
from pathlib import Path

import geoloc.distributed
from geoloc.infer.cli import main

if __name__ == "__main__":
    shutdown, geoloc.distributed.shutdown = (
        geoloc.distributed.shutdown,
        lambda: None,
    )  # one group for all runs
    for argv in json.loads(Path(sys.argv[1]).read_text()):
        code = main(argv)
        if code:
            sys.exit(code)
    shutdown()
