#!/usr/bin/env python3
"""What app mode's front costs a round, paired with and without it in one run:
``benchmarks/front_overhead.py`` (see there and docs/benchmarks.md for the options).

    .venv/bin/python scripts/bench_front.py --clients 3 --rounds 5 --pairs 2
"""

import sys

from benchmarks.front_overhead import main

if __name__ == "__main__":
    sys.exit(main())
