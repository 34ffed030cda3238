#!/usr/bin/env python3
"""Run a whole Bouquet federation on this machine: one server and N clients on 127.0.0.1.

    .venv/bin/python scripts/run_local.py --clients 5 --rounds 5 --dataset digits

The launcher itself is ``services/launcher.py`` (``python -m services.launcher`` is the same);
``scripts/bootstrap.sh`` installs the package into .venv, which is how this script finds it.
"""

import sys

from services.launcher import main

if __name__ == "__main__":
    sys.exit(main())
