"""``python -m geoloc.tune``: see :mod:`geoloc.tune.cli`."""

import sys

from geoloc.tune.cli import main

sys.exit(main())
