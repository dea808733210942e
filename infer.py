"""Predict a competition submission (one model or an ensemble), validate one, or evaluate on val.

    accelerate launch infer.py --model RUN/model --shards shards/ --out submission.csv
    accelerate launch infer.py --model RUN/model --data-root ROOT --out submission.csv
    python infer.py --validate submission.csv --template ROOT/sample_submission.csv
    accelerate launch infer.py --eval --model RUN/model --shards shards/ --out-dir report/

`python infer.py --help` explains every flag.
"""

import sys

from geoloc.infer.cli import main

if __name__ == "__main__":
    sys.exit(main())
