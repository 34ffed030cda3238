#!/usr/bin/env python3
"""Benchmark one Flower App on Flower's Deployment Engine, Bouquet app mode and Bouquet task mode:
``benchmarks/appmode.py`` (see there and docs/benchmarks.md for the options).

    .venv/bin/python scripts/bench_app.py --clients 3 --rounds 2
"""

import sys

from benchmarks.appmode import main

if __name__ == "__main__":
    sys.exit(main())
