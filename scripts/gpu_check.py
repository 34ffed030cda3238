#!/usr/bin/env python3
"""Check the real NVML path on a GPU machine, worker modes against in-process training:
``benchmarks/gpu_check.py`` (see there and docs/monitor.md for the options).

    .venv/bin/python scripts/gpu_check.py --clients 2,4 --rounds 3 --out docs/measurements
"""

import sys

from benchmarks.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
