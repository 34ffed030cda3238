#!/usr/bin/env python3
"""Check the real NVML path on a GPU machine, worker modes against in-process training:
``benchmarks/gpu_check.py`` (see there and docs/monitor.md for the options).

    .venv/bin/python scripts/gpu_check.py --clients 2,4 --rounds 3 --out docs/measurements
"""

import sys

# table and client_counts are re-exported for tests/test_monitor.py, which loads this file by path.
from benchmarks.gpu_check import client_counts, main, table  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
