#!/usr/bin/env python3
"""Benchmark in-process, spawn and forkserver workers against Flower's Deployment Engine:
``benchmarks/bench.py`` (see there and docs/benchmarks.md for the options).

    .venv/bin/python scripts/bench.py --quick
"""

import sys

from benchmarks.bench import main

if __name__ == "__main__":
    sys.exit(main())
