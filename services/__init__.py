"""Bouquet: a Flower federation whose clients train every round in a fresh worker process.

The package is shared by the server, client and monitor containers. Only the modules that
run inside worker processes (``services.task``) import torch.
"""

import os

# Flower sends usage telemetry over the internet unless told not to. Bouquet's traffic stays
# between its own processes and containers, so turn it off before any module imports flwr.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
