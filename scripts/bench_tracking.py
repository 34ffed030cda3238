#!/usr/bin/env python3
"""What tracking costs a round, tracking on against off: ``benchmarks/tracking_overhead.py``
(see there and docs/tracking.md).

    .venv/bin/python scripts/bench_tracking.py --repeats 3
"""

import sys

from benchmarks.tracking_overhead import main

if __name__ == "__main__":
    sys.exit(main())
