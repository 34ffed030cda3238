#!/usr/bin/env python3
"""Draw <run folder>/report.html again: ``scripts/report.py results/<run-id> [--out FILE]``.

The monitor writes report.html itself at the end of every run; this redraws it, e.g. for a run
whose monitor was killed. It is ``python -m services.monitor.report`` under another name: the
builder lives in the package (installed into .venv by scripts/bootstrap.sh), so the monitor
image, which has no scripts/, draws the same page.
"""

import sys

from services.monitor.report import main

if __name__ == "__main__":
    sys.exit(main())
