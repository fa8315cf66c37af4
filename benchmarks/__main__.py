"""``python -m benchmarks [options]``: the same as ``python benchmarks/bench.py [options]``."""

import sys

from benchmarks.cli import main

sys.exit(main())
